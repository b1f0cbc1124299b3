"""Peak RAM of `prepare_monolithic_safetensors` on a ~1 GB sharded bf16 Llama-shaped model.

Writes a random sharded Hugging Face folder (safetensors shards + index + config.json),
then converts it in fresh child processes and reports how far each child's resident memory
rose above its level after imports (peak VmHWM, reset after the imports, minus VmRSS),
next to the model size and the largest tensor. A naive conversion that loads every shard
into one state dict and saves it runs the same way, for reference.

    python benchmarks/convert_memory.py [--workdir DIR] [--layers 8] [--hidden 2048]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch
from safetensors.torch import save_file

MiB = 1024 * 1024

SETUP = ("import glob, importlib.util, torch; from safetensors.torch import load_file, save_file; "
         "from lema.utils.model_utils import prepare_monolithic_safetensors as convert; "
         # bitsandbytes (for --quantize) is imported before the measurement, like torch
         "importlib.util.find_spec('bitsandbytes') and __import__('lema.adapters.weights.bnb', fromlist=['x'])"
         ".functional()")
CHILDREN = {
    "lema convert (bf16 kept)": "convert(sys.argv[1], sys.argv[2], device='cpu')",
    "lema convert --dtype float16": "convert(sys.argv[1], sys.argv[2], device='cpu', dtype='float16')",
    "lema convert --dtype float32": "convert(sys.argv[1], sys.argv[2], device='cpu', dtype='float32')",
    "lema convert --quantize nf4": "convert(sys.argv[1], sys.argv[2], device='cpu', quantize='nf4')",
    "lema convert --quantize int8": "convert(sys.argv[1], sys.argv[2], device='cpu', quantize='int8')",
    "naive: load all shards, save_file": (
        "sd = {}\n"
        "for f in sorted(glob.glob(sys.argv[1] + '/*.safetensors')): sd.update(load_file(f))\n"
        "save_file(sd, sys.argv[2], metadata={'format': 'pt'})"),
}


def write_sharded_model(folder: Path, hidden: int, layers: int, inter: int, vocab: int, shard_bytes: int) -> tuple[int, int]:
    """A random bf16 Llama folder written shard by shard; returns (total bytes, largest tensor bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": hidden // 128,
              "num_key_value_heads": hidden // 128, "vocab_size": vocab, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
        shapes += [(p + f"self_attn.{n}_proj.weight", (hidden, hidden)) for n in "qkvo"]
        shapes += [(p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, inter))]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    gen = torch.Generator().manual_seed(0)
    block = (torch.randn(1 << 20, generator=gen) * 0.02).to(torch.bfloat16)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = math.prod(shape) * 2
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    weight_map, total = {}, 0
    for k, group in enumerate(groups, start=1):
        file = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            numel = math.prod(shape)
            tensors[name] = block.repeat(-(-numel // block.numel()))[:numel].view(shape)
            weight_map[name] = file
            total += numel * 2
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total, max(math.prod(s) * 2 for _, s in shapes)


def peak_rss_of_child(setup: str, code: str, *args: str) -> tuple[int, int, float]:
    """Run ``setup`` then ``code`` in a fresh interpreter.

    Returns (RSS after ``setup``, peak RSS while ``code`` ran, wall seconds of ``code``), in
    bytes. The peak is the kernel's VmHWM, reset after ``setup`` by writing 5 to
    /proc/self/clear_refs, so the transient peak of importing torch does not hide it.
    """
    script = textwrap.dedent(f"""
        import sys, time
        {setup}
        def status(key):
            for line in open('/proc/self/status'):
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        base = status('VmRSS:')
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        start = time.perf_counter()
    """) + code + "\nprint(base, status('VmHWM:'), time.perf_counter() - start)\n"
    out = subprocess.run([sys.executable, "-c", script, *args], check=True, capture_output=True, text=True)
    base, peak, wall = out.stdout.strip().splitlines()[-1].split()
    return int(base), int(peak), float(wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="where to write the model (default: a temp dir)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard-mib", type=int, default=256)
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--only", default=None, help="run only the rows whose label contains this")
    args = parser.parse_args()
    if sys.platform != "linux":
        sys.exit("ru_maxrss units differ off Linux; run on Linux")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lema-convert-bench-"))
    try:
        total, largest = write_sharded_model(work / "src", args.hidden, args.layers, args.intermediate,
                                             args.vocab, args.shard_mib * MiB)
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
              f"torch {torch.__version__}")
        print(f"model: Llama-shaped bf16, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}: "
              f"{total / MiB:.0f} MiB in {len(list((work / 'src').glob('*.safetensors')))} shards; "
              f"largest tensor {largest / MiB:.0f} MiB")
        print(f"{'run':34s} {'RSS before':>11s} {'peak RSS':>10s} {'peak - before':>14s} "
              f"{'/ largest tensor':>16s} {'/ model':>8s} {'wall':>7s}")
        for label, code in CHILDREN.items():
            if (args.skip_naive and label.startswith("naive")) or (args.only and args.only not in label):
                continue
            out = work / "out.safetensors"
            base, peak, wall = peak_rss_of_child(SETUP, code, str(work / "src"), str(out))
            grow = peak - base
            print(f"{label:34s} {base / MiB:7.0f} MiB {peak / MiB:6.0f} MiB {grow / MiB:10.0f} MiB "
                  f"{grow / largest:16.2f} {grow / total:8.2f} {wall:6.1f}s")
            out.unlink(missing_ok=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
