"""Write a random model of a given architecture as a monolithic safetensors file, fast.

The values are a small random block repeated (scaled like an initialised model), so writing
a 13 GB Llama-2-7B-shaped file is bounded by the disk, not the random number generator.

    python benchmarks/write_random_model.py --model llama-2-7b --dtype float16 --out /tmp/l7b.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from lema.adapters.weights.builtin_models import builtin_config
from lema.adapters.weights.safetensors_writer import open_safetensors_writer
from lema.domain.families import registry as arch
from lema.domain.model.spec import dtype_code, torch_dtype


def write_random_model(config: dict, out: str, dtype: str = "float16", seed: int = 0) -> int:
    """Write every tensor the config implies; returns the bytes written."""
    dims = arch.dims_of(config)
    tdtype = torch_dtype(dtype_code(dtype))
    config = dict(config, dtype=str(tdtype).removeprefix("torch."))
    names = []
    for e in arch.expected_tensors(config):
        for name in e.names[:1]:
            names.append((name, e.shape))
    if dims.tied_embeddings:  # both names present, as `lema convert` writes
        names.append((next(e.names[1] for e in arch.expected_tensors(config) if e.key == "lm_head.weight"),
                      (dims.vocab_size, dims.hidden_size)))
        names = list(dict(names).items())
    gen = torch.Generator().manual_seed(seed)
    block = (torch.randn(1 << 22, generator=gen) * 0.02).to(tdtype)
    total = 0
    entries = [(n, dtype_code(dtype), s) for n, s in names]
    with open_safetensors_writer(out, entries, metadata={"config": json.dumps(config), "format": "pt"}) as writer:
        for name, shape in names:
            numel = 1
            for s in shape:
                numel *= s
            reps = -(-numel // block.numel())
            data = block.repeat(reps)[:numel].view(shape) if reps > 1 else block[:numel].view(shape)
            if name.endswith("norm.weight") or ".ln_" in name:
                data = torch.ones(shape, dtype=tdtype)
            writer.write(name, data)
            total += data.numel() * data.element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-2-7b", help="a built-in model name (lema plan --list-models)")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    start = time.perf_counter()
    n = write_random_model(builtin_config(args.model), args.out, args.dtype)
    seconds = time.perf_counter() - start
    print(f"wrote {n / 1e9:.2f} GB to {args.out} in {seconds:.1f} s ({n / 1e9 / seconds:.2f} GB/s)")
    os.sync()


if __name__ == "__main__":
    main()
