"""Train a few steps of a mostly-sparse Llama-shaped model and report the anonymous memory peak.

The model file is a real safetensors header with holes for most decoder weights (zeros, no
disk used) and real bytes only where zeros would make every gradient zero: the embedding,
the head and the first and last layers (small random values) and the norms (ones). The
layers of zeros pass the residual stream through unchanged (their adapters get no gradient:
their inputs are zero), so the dense layers' adapters train on a signal that went through
the whole depth.

Run as a program (one process per measurement, so that the peaks are its own)::

    python -m tests.streamed_steps write --out /tmp/m.safetensors --layers 48 --hidden 5120 \\
        --intermediate 13824 --vocab 32000 --dtype BF16
    python -m tests.streamed_steps train --model /tmp/m.safetensors --steps 2 [--budget 4G] \\
        [--data-limit BYTES] --adapters /tmp/a.pt

``train`` prints one JSON line: ``anon_start`` (RssAnon before the model is opened: the
interpreter, torch), ``anon_peak`` (bytes: the largest RssAnon sampled every 5 ms, and at
the end), ``step_s`` (each step's seconds), ``loss``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.sparse_models import header_bytes, model_tensors

_BLOCK = 1 << 20  # bytes of random values repeated over a written tensor


def llama_config(layers: int, hidden: int, intermediate: int, vocab: int, heads: int) -> dict[str, Any]:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
            "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": heads, "vocab_size": vocab, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
            "hidden_act": "silu"}


def write_model(out: Path, config: dict[str, Any], dtype: str, dense: tuple[int, ...] = (0, -1)) -> int:
    """Write the sparse model (layers ``dense`` hold random values too); returns its size in bytes."""
    import torch

    from lema.domain.model.spec import DTYPE_BYTES, torch_dtype

    tensors = model_tensors(config, dtype)
    head, size = header_bytes(tensors, {"format": "pt", "config": json.dumps(config)})
    gen = torch.Generator().manual_seed(0)
    tdtype = torch_dtype(dtype)
    block = (torch.randn(_BLOCK // DTYPE_BYTES[dtype], generator=gen) * 0.02).to(tdtype).view(torch.uint8)
    ones = torch.ones(_BLOCK // DTYPE_BYTES[dtype], dtype=tdtype).view(torch.uint8)
    layers = config["num_hidden_layers"]
    real = tuple(f"layers.{i % layers}." for i in dense)
    with open(out, "wb") as f:
        f.write(head)
        f.truncate(len(head) + size)
        offset = len(head)
        for name, _dt, shape in tensors:
            nbytes = DTYPE_BYTES[dtype]
            for s in shape:
                nbytes *= s
            random = "embed" in name or "lm_head" in name or any(r in name for r in real)
            fill = ones if name.endswith("norm.weight") else block if random else None
            if fill is not None:
                raw = bytes(fill.numpy())
                for done in range(0, nbytes, len(raw)):
                    os.pwrite(f.fileno(), raw[:nbytes - done], offset + done)
            offset += nbytes
    return len(head) + size


def _anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def train(model: str, steps: int, budget: str | None, adapters: str | None, seq: int, strategy: str) -> dict:
    import torch

    from lema import LemaConfig, LemaModel, MemoryStrategy

    start_anon = _anon()
    peak = [start_anon]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.005):
            peak[0] = max(peak[0], _anon())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    times, losses = [], []
    try:
        config = LemaConfig(gbi_path=model, device="cpu", strategy=MemoryStrategy.parse(strategy), lora_rank=4,
                            vram_budget=budget, max_seq_len=seq, prefetch_distance=1)
        with LemaModel(config) as lema:
            lema.initialize_lora(seed=0)
            before = {k: v.detach().cpu().clone() for k, v in lema.require_lora().named_parameters()}
            # SGD: the adapters move by the gradients themselves (AdamW would turn a gradient
            # element as small as its rounding into a full learning-rate step either way).
            trainer = lema.get_trainer(torch.optim.SGD(lema.get_trainable_parameters(), lr=1.0))
            ids = torch.arange(1, seq + 1).remainder(lema.spec.vocab_size).unsqueeze(0)
            for _ in range(steps):
                start = time.perf_counter()
                _, loss = trainer.train_step(ids)
                times.append(time.perf_counter() - start)
                losses.append(float(loss))
            if adapters:
                torch.save({k: v.detach().cpu() - before[k] for k, v in lema.require_lora().named_parameters()},
                           adapters)
    finally:
        stop.set()
        sampler.join()
    peak[0] = max(peak[0], _anon())
    return {"anon_start": start_anon, "anon_peak": peak[0], "step_s": times, "loss": losses}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write")
    w.add_argument("--out", required=True)
    w.add_argument("--layers", type=int, default=48)
    w.add_argument("--hidden", type=int, default=5120)
    w.add_argument("--intermediate", type=int, default=13824)
    w.add_argument("--vocab", type=int, default=32000)
    w.add_argument("--heads", type=int, default=40)
    w.add_argument("--dtype", default="BF16")
    t = sub.add_parser("train")
    t.add_argument("--model", required=True)
    t.add_argument("--steps", type=int, default=2)
    t.add_argument("--budget", default=None, help="vram_budget (a CPU device with that capacity); none: in place")
    t.add_argument("--strategy", default="streaming")
    t.add_argument("--seq", type=int, default=16)
    t.add_argument("--adapters", default=None, help="save what training changed in the adapters here (torch.save of tensors)")
    t.add_argument("--data-limit", type=int, default=None,
                   help="RLIMIT_DATA in bytes above the data size at start (private writable memory)")
    args = parser.parse_args(argv)
    if args.command == "write":
        config = llama_config(args.layers, args.hidden, args.intermediate, args.vocab, args.heads)
        print(json.dumps({"bytes": write_model(Path(args.out), config, args.dtype)}))
        return
    if args.data_limit is not None:
        import torch  # noqa: F401  # its own data segment is not the run's

        import lema  # noqa: F401

        with open("/proc/self/status") as f:
            data = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))
        limit = data + args.data_limit
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    result = train(args.model, args.steps, args.budget, args.adapters, args.seq, args.strategy)
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
