"""Bytes of RAM per token of a tokenized ~10M-token corpus: LEMA's store vs Python tuples.

Writes a JSONL corpus (paragraphs of the shipped corpus, shuffled, ~10M tokens with the
demo's 512-token byte-level BPE), tokenizes it once into the data cache (``lema train``'s
path: :func:`lema.data.loading.load_data`), then measures in fresh child processes how
far the resident memory rose (``VmRSS`` after, minus before, file-backed pages included)
when holding every token, per token:

* LEMA, cached store memory-mapped and read whole (what ``lema train`` does on a cache hit);
* LEMA, store loaded into RAM (``np.load`` without mmap);
* LEMA, the same store iterated as padded batches for one epoch (the training loop's view);
* the previous representation: every example as ``Example`` tuples of Python ints
  (input ids and labels), as ``read_examples`` held them before.

    python benchmarks/data_memory.py [--tokens 10000000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import gc, json, sys, numpy as np
sys.path.insert(0, sys.argv[3])
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
from lema.data.store import TokenStore, Example, IGNORE_INDEX
from lema.data.examples import batches
import torch
gc.collect()
before = rss()
mode = sys.argv[2]
store = TokenStore.load(sys.argv[1], mmap=(mode != "ram"))
if mode in ("mmap", "ram"):
    held = int(store.tokens.sum(dtype=np.int64)) + int(store.mask.sum(dtype=np.int64)) + int(store.offsets[-1])
elif mode == "batches":
    n = 0
    for b in batches(store, 64, 0, shuffle=True, seed=0):
        n += int(b["attention_mask"].sum())
    held = n
else:  # the previous representation: tuples of Python ints
    held = []
    for i in range(len(store)):
        ids, mask = store.arrays(i)
        ids = ids.tolist()
        held.append(Example(tuple(ids), tuple(t if m else IGNORE_INDEX for t, m in zip(ids, mask.tolist()))))
gc.collect()
after = rss()
print(json.dumps({"rss_delta": after - before, "tokens": store.n_tokens, "examples": len(store),
                  "array_bytes": store.nbytes}))
"""


def cpu_model() -> str:
    """``lscpu``'s model name, and whether the CPU has AVX512-BF16."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    return f"{name or platform.machine()} ({'with' if 'avx512_bf16' in info else 'no'} AVX512-BF16)"


def write_corpus(path: Path, tokens: int, tokenizer) -> int:
    """Shuffled paragraphs of the shipped corpus as {"text": ...} lines, until ~``tokens`` tokens."""
    from lema.data.examples import shipped_corpus

    paragraphs = [p.strip() for p in shipped_corpus().split("\n\n") if p.strip()]
    lengths = [len(ids) + 1 for ids in tokenizer(paragraphs)["input_ids"]]  # BOS + text, then EOS
    rng = random.Random(0)
    total = 0
    with open(path, "w", encoding="utf-8") as f:
        while total < tokens:
            i = rng.randrange(len(paragraphs))
            f.write(json.dumps({"text": paragraphs[i]}) + "\n")
            total += lengths[i]
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=10_000_000)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from lema.data.loading import DataOptions, load_data
    from lema.data.tokenizer import load_tokenizer

    work = Path(args.workdir or tempfile.mkdtemp(prefix="lema-data-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(ROOT / "lema" / "data" / "demo")
    corpus = work / "corpus.jsonl"
    write_corpus(corpus, args.tokens, tok)
    t0 = time.perf_counter()
    data = load_data(corpus, tok, DataOptions(seq=512, cache_dir=work / "cache"))
    seconds = time.perf_counter() - t0
    store = data.store
    (entry,) = [p for p in (work / "cache").iterdir() if not p.name.startswith(".")]
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"corpus: {corpus.stat().st_size / 2**20:.1f} MiB of JSONL, {len(store):,} examples, "
          f"{store.n_tokens:,} tokens; tokenized and cached in {seconds:.1f} s "
          f"({store.n_tokens / seconds:,.0f} tokens/s)")
    print(f"store arrays: {store.nbytes:,} bytes = {store.nbytes / store.n_tokens:.2f} bytes/token "
          f"(int32 ids, uint8 loss mask, int64 offsets)")
    results = {}
    for mode in ("mmap", "ram", "batches", "tuples"):
        out = subprocess.run([sys.executable, "-c", CHILD, str(entry), mode, str(ROOT)], capture_output=True,
                             text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results[mode] = r["rss_delta"] / r["tokens"]
        print(f"{mode:>8}: RSS +{r['rss_delta'] / 2**20:8.1f} MiB = {results[mode]:6.2f} bytes/token")
    print(f"ratio tuples / store in RAM: {results['tuples'] / results['ram']:.1f}x; "
          f"tuples / memory-mapped store: {results['tuples'] / results['mmap']:.1f}x")


if __name__ == "__main__":
    main()
