"""Attention of packed rows, right padding and sliding windows: LEMA's mask-free paths
against the dense ``(batch, 1, seq, seq)`` mask they replaced (issue 23).

For each case it times forward + backward of ``lema.domain.nn.attention.attend`` with the
context ``make_context`` builds, and with the same context given the dense mask
(``BlockSparse.dense``), and reports the peak memory of each on CUDA (on a CPU: time only)
and the relative difference of their outputs on the real tokens. Run:

    python benchmarks/attention_masks.py [--device cuda] [--seq 4096] [--batch 2] [--dtype bf16] [--repeat 5]

Expected: on CUDA, the mask-free paths keep flash attention and use no ``b s^2`` memory; on
a small CPU run (``--seq 512``) it finishes in under a minute.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attrs  # noqa: E402
import torch  # noqa: E402

from lema.domain.model.context import make_context  # noqa: E402
from lema.domain.model.spec import ModelSpec  # noqa: E402
from lema.domain.nn.attention import attend  # noqa: E402
from lema.domain.nn.context import BlockSparse, attention_masks, segment_ids  # noqa: E402


def _spec(window: int | None) -> ModelSpec:
    cfg = {"model_type": "mistral" if window else "llama", "hidden_size": 4096, "num_attention_heads": 32,
           "num_key_value_heads": 8, "num_hidden_layers": 1, "intermediate_size": 128, "vocab_size": 100}
    if window:
        cfg["sliding_window"] = window
    return ModelSpec.from_config(cfg, dtype="BF16")


def _cases(batch: int, seq: int):
    right = torch.ones(batch, seq, dtype=torch.long)
    right[-1, seq // 2:] = 0
    n = 8
    packed = torch.cat([torch.arange(seq // n)] * n + [torch.arange(seq - n * (seq // n))])[None].expand(batch, seq)
    return {"right_padding": dict(window=None, attention_mask=right),
            "packed_8": dict(window=None, position_ids=packed.contiguous()),
            "window_seq_over_8": dict(window=max(seq // 8, 1))}


def _run(q, k, v, ctx, kind, repeat, device):
    times, peak = [], 0
    for _ in range(repeat):
        qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = attend(qq, kk, vv, ctx, kind, scale=q.shape[-1] ** -0.5)
        out.float().square().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = max(peak, torch.cuda.max_memory_allocated())
        times.append(time.perf_counter() - start)
    return out.detach(), statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(args.batch, 32, args.seq, 128, generator=gen).to(device, dtype)
    k = torch.randn(args.batch, 8, args.seq, 128, generator=gen).to(device, dtype)
    v = torch.randn(args.batch, 8, args.seq, 128, generator=gen).to(device, dtype)
    for name, case in _cases(args.batch, args.seq).items():
        spec = _spec(case["window"])
        positions = case.get("position_ids")
        mask = case.get("attention_mask")
        ctx = make_context(spec, (args.batch, args.seq), attention_mask=mask, position_ids=positions,
                           segments=None if positions is None else segment_ids(positions), device=device, dtype=dtype)
        kind = "sliding_attention" if case["window"] else "full_attention"
        if kind not in ctx.masks:
            kind = "full_attention"
        lean, _ = ctx.masks[kind]
        if isinstance(lean, BlockSparse):
            dense = (lean.dense(device), None)
        else:
            dense = attention_masks(mask.to(device).bool(), args.seq, None, device) if mask is not None else (None, None)
        dense_ctx = attrs.evolve(ctx, masks={**ctx.masks, kind: dense})
        ours, t_ours, p_ours = _run(q, k, v, ctx, kind, args.repeat, device)
        ref, t_ref, p_ref = _run(q, k, v, dense_ctx, kind, args.repeat, device)
        real = torch.ones(args.batch, args.seq, dtype=torch.bool, device=device) if mask is None else \
            mask.to(device).bool()
        err = float((ours[real].double() - ref[real].double()).norm() / ref[real].double().norm())
        print(json.dumps({"case": name, "device": str(device), "seq": args.seq, "batch": args.batch,
                          "dtype": args.dtype, "mask_free": type(lean).__name__ if lean is not None else "None",
                          "seconds": round(t_ours, 5), "dense_seconds": round(t_ref, 5),
                          "peak_bytes": p_ours, "dense_peak_bytes": p_ref, "relative_difference": err}))


if __name__ == "__main__":
    main()
