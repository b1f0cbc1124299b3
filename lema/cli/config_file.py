"""``--config run.yaml``: a command's options as YAML keys; flags on the command line win.

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


def _apply(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is None:
        return
    data = read_yaml(value)
    ctx.default_map = {**(ctx.default_map or {}), **to_default_map(ctx.command, data, value)}


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
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
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


def to_default_map(command: click.Command, data: dict[str, Any], path: str) -> dict[str, Any]:
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
        valid = sorted({p.opts[0].lstrip("-") for p in by_key.values()})
        raise ConfigError(f"--config: {path}: unknown option{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(map(repr, unknown))}; the options are {', '.join(valid)}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        param = by_key[str(key)]
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        if isinstance(param, click.Option) and param.secondary_opts and isinstance(value, bool):
            # --greedy/--sample style: the key names which side is true
            value = value if str(key).replace("_", "-") in [o.lstrip("-") for o in param.opts] or \
                str(key) == param.name else not value
        out[str(param.name)] = value
    return out
