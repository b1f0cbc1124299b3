"""``--config run.yaml``: a command's options as YAML keys; flags on the command line win.

Files in the field's shapes are read too (TRL / transformers ``TrainingArguments`` and
axolotl YAML, detected from their keys or named with ``--config-format``): their keys are
mapped to the command's options, or refused with the reason, by
:mod:`lema.cli.field_names`; an unknown key is refused with the closest names.

Every option of the command is a key, spelled as the flag without ``--`` (``grad-accum``
or ``grad_accum``); lists become comma-separated values (``targets: [q_proj, v_proj]``);
flags take ``true``/``false``. Relative paths are relative to the working directory, as
on the command line. The values become the command's defaults (click's ``default_map``),
so any flag given on the command line overrides its key.

Example ``run.yaml``::

    model: llama2_7b.safetensors
    data: chat.jsonl
    out: runs/chat
    steps: 1000
    lr: 2.0e-4
    packing: true
    report-to: tensorboard
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click

from lema.errors import ConfigError, missing_extra


def config_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--config FILE`` to a click command (read before every other option)."""
    return click.option("--config", "config_file", metavar="FILE.yaml", is_eager=True, expose_value=False,
                        callback=_apply,
                        help="A YAML file with the command's options as keys; flags given here override it.")(f)


def config_format_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--config-format`` (which names the file's keys follow: LEMA's, TRL/transformers', axolotl's)."""
    from lema.cli.field_names import FORMATS

    return click.option("--config-format", "config_format", type=click.Choice(FORMATS), default="auto",
                        is_eager=True, expose_value=False, callback=_format, show_default=True,
                        help="Whose key names --config uses: lema, hf / trl (TrainingArguments, SFTConfig) or "
                             "axolotl; auto: detected from the keys.")(f)


def _format(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    ctx.meta["lema.config_format"] = value or "auto"
    _update(ctx)


def _apply(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is None:
        return
    ctx.meta["lema.config"] = (value, read_yaml(value))
    _update(ctx)


def _update(ctx: click.Context) -> None:
    """The file's keys as the command's defaults, once both the file and its format are known
    (the two eager options run in the order they were given)."""
    if "lema.config" not in ctx.meta:
        return
    has_format = any(p.name == "config_format" for p in ctx.command.params)
    if has_format and "lema.config_format" not in ctx.meta:
        return
    from lema.cli.field_names import detect, translate

    path, data = ctx.meta.pop("lema.config")
    fmt = ctx.meta.get("lema.config_format", "lema")
    if fmt == "auto":
        fmt = detect(data)
    notes: list[str] = []
    mapped = translate(data, fmt, path, notes)
    ctx.default_map = {**(ctx.default_map or {}), **to_default_map(ctx.command, mapped, path, fmt=fmt)}
    for note in notes:  # keys accepted without effect: said, not silently dropped
        click.echo(f"note: {note}", err=True)


def read_yaml(path: str) -> dict[str, Any]:
    """The mapping in a YAML file.

    Raises:
        ConfigError: a missing file, invalid YAML, or a document that is not a mapping.
    """
    try:
        import yaml
    except ImportError:
        raise missing_extra("pyyaml", "yaml", "--config") from None
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"--config: {p}: no such file")
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"--config: {p} is larger than {MAX_CONFIG_BYTES // 1024} KiB; a run's options fit in "
                              "a few lines: pass the YAML file of options")
        data = yaml.load(raw.decode("utf-8"), Loader=_loader_class(yaml, p))  # noqa: S506 - a SafeLoader
    except UnicodeDecodeError:
        raise ConfigError(f"--config: {p} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"--config: {p}: invalid YAML{where} ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {p}: expected a mapping of option: value, got a {type(data).__name__}")
    return data


# A run's options are a few dozen short lines; the bounds leave room for any honest file.
MAX_CONFIG_BYTES = 256 * 1024
MAX_DEPTH = 20


def _loader_class(yaml: Any, path: Path) -> Any:
    """A SafeLoader (no Python tags: no code runs) that also refuses anchors and aliases
    (a 444-byte alias bomb expands to gigabytes), nesting deeper than :data:`MAX_DEPTH`
    (deep nesting ends in a RecursionError) and duplicate keys (the second value would
    silently win)."""

    class Loader(yaml.SafeLoader):  # type: ignore[name-defined,misc]
        _depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                line = event.start_mark.line + 1
                raise ConfigError(f"--config: {path}: line {line}: YAML anchors and aliases (&name, *name) are not "
                                  "accepted in an options file; write each value out")
            self._depth += 1
            try:
                if self._depth > MAX_DEPTH:
                    raise ConfigError(f"--config: {path}: line {event.start_mark.line + 1}: nested deeper than "
                                      f"{MAX_DEPTH} levels; an options file is a flat mapping of option: value")
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, (list, dict)):
                    raise ConfigError(f"--config: {path}: line {key_node.start_mark.line + 1}: a key must be an "
                                      "option name")
                if key in seen:
                    raise ConfigError(f"--config: {path}: line {key_node.start_mark.line + 1}: {key!r} is given "
                                      "twice; keep one")
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return Loader


def _check_value(param: click.Parameter, key: str, value: Any, path: str) -> None:
    """A YAML value an option can take: a scalar of the option's kind (or a list of scalars)."""
    flag = isinstance(param, click.Option) and (param.is_flag or bool(param.secondary_opts))
    where = f"--config: {path}: {key}"
    if value is None:
        raise ConfigError(f"{where}: null is not a value; give one, or remove the key to use the default")
    if isinstance(value, dict):
        raise ConfigError(f"{where}: a mapping is not a value of this option; give a single value")
    if isinstance(value, (list, tuple)):
        if not value or any(isinstance(v, (list, tuple, dict, bool)) or v is None for v in value):
            raise ConfigError(f"{where}: a list of option values must hold plain names or numbers")
        return
    if flag and not isinstance(value, bool):
        raise ConfigError(f"{where}: {value!r} is not true or false")
    if not flag and isinstance(value, bool):
        raise ConfigError(f"{where}: {str(value).lower()} is not a value of this option (it takes "
                          f"{getattr(param.type, 'name', 'a value')}, not true or false)")
    if isinstance(value, float) and value != value:
        raise ConfigError(f"{where}: .nan is not a number")
    if not isinstance(value, (str, int, float)):  # dates, binary: YAML types no option takes
        raise ConfigError(f"{where}: {value!r} is not a value of this option; write it as a string")


def to_default_map(command: click.Command, data: dict[str, Any], path: str, fmt: str = "lema") -> dict[str, Any]:
    """YAML keys -> click parameter names and values.

    Raises:
        ConfigError: keys that are no option of ``command`` (all of them, with the valid ones).
    """
    by_key: dict[str, click.Parameter] = {}
    for param in command.params:
        if not isinstance(param, click.Option) or param.name in (None, "config_file", "help"):
            continue
        for opt in [*param.opts, *param.secondary_opts]:
            key = opt.lstrip("-")
            by_key[key] = param
            by_key[key.replace("-", "_")] = param
        by_key[str(param.name)] = param
    unknown = [str(k) for k in data if str(k) not in by_key]
    if unknown:
        from lema.cli.field_names import did_you_mean, known_keys

        valid = sorted({p.opts[0].lstrip("-") for p in by_key.values()})
        names = [*by_key, *known_keys(fmt)]
        described = ", ".join(repr(k) + did_you_mean(k, names) for k in unknown)
        read_as = "" if fmt == "lema" else f" (read with {fmt}'s key names)"
        raise ConfigError(f"--config: {path}{read_as}: unknown option{'s' if len(unknown) > 1 else ''} "
                          f"{described}; the options are {', '.join(valid)}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        param = by_key[str(key)]
        _check_value(param, str(key), value, path)
        if isinstance(param, click.Option) and param.multiple:
            value = [str(v) for v in value] if isinstance(value, (list, tuple)) else [value]
        elif isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        if isinstance(param, click.Option) and param.secondary_opts and isinstance(value, bool):
            # --greedy/--sample style: the key names which side is true
            value = value if str(key).replace("_", "-") in [o.lstrip("-") for o in param.opts] or \
                str(key) == param.name else not value
        out[str(param.name)] = value
    return out
