"""Built-in model configs: the real ``config.json`` of well-known models, shipped as package data.

They let ``lema plan --model llama-2-70b`` answer before anything is downloaded. The files
live in ``lema/adapters/weights/builtin/*.json`` (a data folder); reading them is I/O, so it lives here.

Example:
    >>> find_builtin("meta-llama/Llama-2-7b-hf")
    'llama-2-7b'
    >>> builtin_config("llama-2-7b")["hidden_size"]
    4096
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

from lema.errors import ModelFormatError

# Hub ids (lower case) of each built-in config; the built-in name itself matches too.
_ALIASES: dict[str, tuple[str, ...]] = {
    "llama-2-7b": ("meta-llama/llama-2-7b-hf", "meta-llama/llama-2-7b-chat-hf", "nousresearch/llama-2-7b-hf",
                   "nousresearch/llama-2-7b-chat-hf", "llama-2-7b-hf"),
    "llama-2-13b": ("meta-llama/llama-2-13b-hf", "meta-llama/llama-2-13b-chat-hf", "nousresearch/llama-2-13b-hf",
                    "llama-2-13b-hf"),
    "llama-2-70b": ("meta-llama/llama-2-70b-hf", "meta-llama/llama-2-70b-chat-hf", "nousresearch/llama-2-70b-hf",
                    "llama-2-70b-hf"),
    "llama-3-8b": ("meta-llama/meta-llama-3-8b", "meta-llama/meta-llama-3-8b-instruct", "meta-llama-3-8b"),
    "llama-3-70b": ("meta-llama/meta-llama-3-70b", "meta-llama/meta-llama-3-70b-instruct", "meta-llama-3-70b"),
    "llama-3.1-8b": ("meta-llama/llama-3.1-8b", "meta-llama/llama-3.1-8b-instruct", "meta-llama/meta-llama-3.1-8b",
                     "meta-llama/meta-llama-3.1-8b-instruct", "meta-llama-3.1-8b"),
    "llama-3.1-70b": ("meta-llama/llama-3.1-70b", "meta-llama/llama-3.1-70b-instruct", "meta-llama/meta-llama-3.1-70b",
                      "meta-llama/meta-llama-3.1-70b-instruct", "meta-llama-3.1-70b"),
    "llama-3.1-405b": ("meta-llama/llama-3.1-405b", "meta-llama/llama-3.1-405b-instruct",
                       "meta-llama/meta-llama-3.1-405b", "meta-llama/meta-llama-3.1-405b-instruct",
                       "meta-llama-3.1-405b"),
    "mistral-7b": ("mistralai/mistral-7b-v0.1", "mistral-7b-v0.1"),
    "mixtral-8x7b": ("mistralai/mixtral-8x7b-v0.1", "mistralai/mixtral-8x7b-instruct-v0.1", "mixtral-8x7b-v0.1"),
    "qwen3-8b": ("qwen/qwen3-8b", "qwen/qwen3-8b-base"),
    "qwen3-32b": ("qwen/qwen3-32b",),
    "qwen3-30b-a3b": ("qwen/qwen3-30b-a3b", "qwen/qwen3-30b-a3b-base"),
    "gemma-2-9b": ("google/gemma-2-9b", "google/gemma-2-9b-it"),
    "gemma-3-12b": ("google/gemma-3-12b-pt", "google/gemma-3-12b-it"),
    "phi-3-mini": ("microsoft/phi-3-mini-4k-instruct", "phi-3-mini-4k-instruct"),
    "tinyllama-1.1b": ("tinyllama/tinyllama-1.1b-chat-v1.0", "tinyllama/tinyllama_v1.1",
                       "tinyllama/tinyllama-1.1b-intermediate-step-1431k-3t", "tinyllama-1.1b-chat-v1.0"),
    "qwen2.5-7b": ("qwen/qwen2.5-7b", "qwen/qwen2.5-7b-instruct"),
    "qwen2.5-0.5b": ("qwen/qwen2.5-0.5b", "qwen/qwen2.5-0.5b-instruct"),
    "gpt2": ("openai-community/gpt2",),
    "gpt2-medium": ("openai-community/gpt2-medium",),
    "gpt2-large": ("openai-community/gpt2-large",),
    "gpt2-xl": ("openai-community/gpt2-xl",),
}


@functools.lru_cache(maxsize=1)
def builtin_names() -> tuple[str, ...]:
    """The names of the built-in configs, sorted (``"gpt2"``, ``"llama-2-7b"``, ...)."""
    folder = resources.files("lema.adapters.weights").joinpath("builtin")
    return tuple(sorted(p.name[:-len(".json")] for p in folder.iterdir() if p.name.endswith(".json")))


def find_builtin(ref: str) -> str | None:
    """The built-in name a reference means (case-insensitive; Hub ids too), or None."""
    key = ref.strip().lower()
    names = builtin_names()
    if key in names:
        return key
    for name, aliases in _ALIASES.items():
        if key in aliases and name in names:
            return name
    return None


def builtin_config(name: str) -> dict[str, Any]:
    """The ``config.json`` dict of a built-in model.

    Raises:
        ModelFormatError: for a name that is not built in, listing the names that are.
    """
    found = find_builtin(name)
    if found is None:
        raise ModelFormatError(f"{name!r} is not a built-in model; built-in: {', '.join(builtin_names())}")
    text = resources.files("lema.adapters.weights").joinpath("builtin").joinpath(f"{found}.json").read_text(encoding="utf-8")
    return json.loads(text)
