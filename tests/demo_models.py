"""Builders shared by the training-CLI and demo tests: a byte tokenizer and a tiny Llama.

Both are cached per test session (building the tokenizer costs a second or two); tests copy
the saved folders into their own ``tmp_path`` when they need to write beside them.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from lema.data.examples import shipped_corpus

TINY_VOCAB = 300


@functools.lru_cache(maxsize=None)
def byte_tokenizer(vocab_size: int = TINY_VOCAB) -> Any:
    """A byte-level BPE trained on the first 8 KB of the shipped corpus."""
    from lema.data.tokenizer import build_byte_tokenizer

    return build_byte_tokenizer(shipped_corpus()[:8000], vocab_size=vocab_size)


def tiny_llama_folder(folder: Path, *, hidden: int = 32, layers: int = 2, seed: int = 0,
                      weights: str = "safetensors") -> Path:
    """Save a random tiny Llama (transformers' own) plus the byte tokenizer into ``folder``.

    Args:
        weights: ``"safetensors"`` (what ``save_pretrained`` writes) or ``"bin"`` (the legacy
            ``pytorch_model.bin`` layout, to exercise conversion).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer()
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden + 8, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                         max_position_embeddings=512, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    if weights == "safetensors":
        model.save_pretrained(folder)
    else:
        config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    tok.save_pretrained(folder)
    return folder


def write_data(folder: Path) -> dict[str, Path]:
    """One small file of each training-data format; returns ``{"txt": ..., "text": ..., "pc": ...}``."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus = shipped_corpus()
    paragraphs = [p for p in corpus.split("\n\n") if p.strip()]
    txt = folder / "train.txt"
    txt.write_text("\n\n".join(paragraphs[:6]), encoding="utf-8")
    text = folder / "train.jsonl"
    text.write_text("\n".join(json.dumps({"text": p}) for p in paragraphs[6:14]) + "\n", encoding="utf-8")
    pc = folder / "pairs.jsonl"
    rows = [{"prompt": f"Question: what comes after {i}?\nAnswer:", "completion": f" {i + 1}"} for i in range(12)]
    pc.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return {"txt": txt, "text": text, "pc": pc}


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
