"""``lema generate --model PATH --prompt TEXT``: continue a prompt, printing tokens as they come.

The base weights stream through the device once per generated token (after one pass over
the prompt that fills the KV cache), so models larger than the device generate too.
Without ``--adapter`` the bare base model generates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from lema.errors import CheckpointError, ConfigError, DataError, ModelFormatError


@click.command("generate")
@click.option("--model", "model_path", required=True, metavar="PATH",
              help="LEMA .safetensors model file (from `lema convert`) or a local Hugging Face folder.")
@click.option("--adapter", metavar="DIR", help="LoRA checkpoint / peft adapter directory (default: the bare base).")
@click.option("--prompt", required=True, help="The text to continue.")
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=64, show_default=True,
              help="Most tokens to generate.")
@click.option("--temperature", type=float, default=None, help="Sampling temperature (> 0; default 1.0).")
@click.option("--top-k", type=click.IntRange(min=0), default=None,
              help="Sample among the K most likely tokens (0: all).")
@click.option("--top-p", type=float, default=None, help="Nucleus sampling: keep tokens up to this probability mass.")
@click.option("--seed", type=int, default=None, help="Seed for reproducible sampling.")
@click.option("--greedy/--sample", "greedy", default=None,
              help="Most likely token, or sample. Default: sample when --temperature, --top-k or --top-p is "
                   "given, else greedy.")
@click.option("--tokenizer", "tokenizer_dir", metavar="DIR",
              help="Tokenizer folder (default: the adapter's folder if it has one, else the model's).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where to compute.")
@click.option("--strategy", type=click.Choice(["streaming", "resident", "auto"]), default="streaming",
              show_default=True, help="Where the base weights live between uses.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto",
              show_default=True, help="Compute dtype (auto: the model file's).")
@click.option("--no-echo", is_flag=True, help="Print only the generated text, not the prompt.")
@click.option("--chat", is_flag=True,
              help="--prompt is a user message: render it with the chat template and print the reply.")
@click.option("--system", default=None, help="With --chat: a system message before the user's.")
@click.option("--chat-template", metavar="FILE|NAME", default=None,
              help="With --chat: the template (default: the tokenizer's; 'chatml', a Jinja file).")
def generate(model_path: str, adapter: str | None, prompt: str, max_new_tokens: int, temperature: float | None,
             top_k: int | None, top_p: float | None, seed: int | None, greedy: bool | None,
             tokenizer_dir: str | None, device: str, strategy: str, dtype: str, no_echo: bool, chat: bool,
             system: str | None, chat_template: str | None) -> None:
    """Generate text from --prompt with the base model (plus --adapter), streamed to stdout.

    Generation stops at the model's context length: a --max-new-tokens beyond it is
    capped, with a note on stderr.
    """
    from lema.config import check_seed
    from lema.domain.json_values import is_text

    if seed is not None:
        check_seed(seed, "--seed")
    if not is_text(prompt):
        raise ConfigError("--prompt: not valid text (it holds bytes that are not UTF-8, or an unpaired surrogate); "
                          "pass UTF-8 text")
    if not Path(model_path).expanduser().exists():
        raise ModelFormatError(f"--model: {model_path} does not exist; pass a .safetensors file made by "
                               "`lema convert` or a local model folder")
    if adapter is not None and not Path(adapter).expanduser().is_dir():
        raise CheckpointError(f"--adapter: {adapter} is not a directory; pass a checkpoint directory holding "
                              "adapter_config.json and adapter_model.safetensors")
    tokenizer = _tokenizer(tokenizer_dir, adapter, model_path)
    do_sample = greedy is False or (greedy is None and any(v is not None for v in (temperature, top_k, top_p)))

    from lema.app import bootstrap
    from lema.app.tools.generation import generate as run_generation
    from lema.app.training.model import LemaModel
    from lema.config import LemaConfig

    eos: list[int] = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if chat:
        ids, stops = chat_prompt_ids(tokenizer, prompt, system, chat_template)
        eos += [i for i in stops if i not in eos]
        no_echo = True
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise ConfigError("--prompt: the prompt encodes to no tokens; pass some text")
    from lema.app.training.run_inputs import resolve_model_arg

    # A folder of .bin weights is converted once into the cache, as `lema train` does.
    gbi_path, name_or_path = resolve_model_arg(model_path, echo=lambda line: click.echo(line, err=True))
    where = {"gbi_path": gbi_path} if gbi_path is not None else {"model_name_or_path": name_or_path}
    if gbi_path is not None and name_or_path is not None and not Path(model_path).expanduser().is_file():
        where["model_name_or_path"] = name_or_path  # the folder's config.json, beside the converted file
    # The context length comes from the header and config alone (no weights read yet).
    context = bootstrap.open_model(LemaConfig(**where)).spec.max_positions
    max_new_tokens = _cap_to_context(ids.shape[1], max_new_tokens, context)
    config = LemaConfig(**where, device=device, strategy=strategy, dtype=dtype, batch_size=1,
                        max_seq_len=ids.shape[1] + max(max_new_tokens, 1))
    model = LemaModel(config)
    try:
        if adapter is not None:
            model.load_adapter(adapter)
        printer = _TextStream(tokenizer, "" if no_echo else prompt)
        run_generation(model, ids, max_new_tokens, do_sample=do_sample,
                       temperature=1.0 if temperature is None else temperature,
                       top_k=0 if top_k is None else top_k, top_p=1.0 if top_p is None else top_p, seed=seed,
                       eos_token_id=eos or None, pad_token_id=tokenizer.pad_token_id,
                       stream=printer.add)
        printer.flush()
        if printer.wrote:
            click.echo()  # end the text's line
        else:  # the model ended its turn at once: no empty line on stdout, a note on stderr
            click.echo("note: the model generated no text (it ended its reply at once)", err=True)
    finally:
        model.close()


def _cap_to_context(prompt_tokens: int, max_new_tokens: int, context: int) -> int:
    """``max_new_tokens``, lowered (with a note on stderr) so prompt + new tokens fit the context."""
    if prompt_tokens >= context:
        raise ConfigError(f"--prompt: {prompt_tokens} tokens, but the model's context is {context} tokens; "
                          "shorten the prompt")
    room = context - prompt_tokens
    if max_new_tokens > room:
        click.echo(f"note: the model's context is {context} tokens and the prompt takes {prompt_tokens}: "
                   f"generating at most {room} new tokens (--max-new-tokens {max_new_tokens} is capped)", err=True)
        return room
    return max_new_tokens


def chat_prompt_ids(tokenizer: Any, prompt: str, system: str | None, chat_template: str | None) -> tuple[Any, list[int]]:
    """The ids of a one-turn conversation rendered with the generation prompt (no extra BOS:
    the template writes its own), and the tokens that end the reply."""
    from lema.data.chat import TemplateRefused, end_of_turn_ids, render_text, resolve_template

    template = resolve_template(tokenizer, chat_template)
    if template is None:
        raise ConfigError("--chat: the tokenizer has no chat template; pass one with --chat-template FILE "
                          "(or --chat-template chatml)")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    try:
        text = render_text(tokenizer, messages, template, add_generation_prompt=True)
    except TemplateRefused:
        raise
    except Exception as exc:  # noqa: BLE001 - a template raises what its author wrote (or a syntax error)
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"--chat: the chat template cannot render the prompt ({detail}); fix the template or "
                        "pass another with --chat-template") from None
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"], end_of_turn_ids(tokenizer,
                                                                                                         template)


def _tokenizer(tokenizer_dir: str | None, adapter: str | None, model_path: str) -> Any:
    from lema.data.tokenizer import find_tokenizer_dir, load_tokenizer

    if tokenizer_dir is not None:
        return load_tokenizer(tokenizer_dir)
    found = find_tokenizer_dir(adapter, model_path)
    if found is None:
        places = " or ".join(str(p) for p in (adapter, Path(model_path).expanduser().parent
                                              if Path(model_path).is_file() else model_path) if p)
        raise ConfigError(f"no tokenizer files (tokenizer.json, ...) in {places}; pass the tokenizer's folder "
                          "with --tokenizer DIR")
    return load_tokenizer(found)


class _TextStream:
    """Print the decoded text of the ids seen so far, holding back an unfinished UTF-8 character.

    ``prefix`` (the echoed prompt) is printed with the first text, so an error raised before
    the first token leaves stdout empty.
    """

    def __init__(self, tokenizer: Any, prefix: str = "") -> None:
        self.tokenizer = tokenizer
        self.prefix = prefix
        self.ids: list[int] = []
        self.printed = 0
        self.wrote = False  # anything on stdout (the prompt or text)

    def add(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a byte-level token split a character: wait for the rest
            return
        self._emit(text)

    def flush(self) -> None:
        self._emit(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _emit(self, text: str) -> None:
        if self.prefix:
            click.echo(self.prefix, nl=False)
            self.prefix = ""
            self.wrote = True
        if len(text) > self.printed:
            click.echo(text[self.printed:], nl=False)
            self.printed = len(text)
            self.wrote = True
