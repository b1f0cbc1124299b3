"""``lema demo``: a chat fine-tune of a model several times larger than the device, in
about a minute (50-80 s on a quiet 2-core CPU), with no network.

1. Open the chat data and the tokenizer shipped with LEMA (``lema/data/demo``: a library
   help desk; a byte-level BPE with a chat template).
2. Build a Llama-family model with random weights (fixed seed) and write it as the one
   ``.safetensors`` file LEMA streams from.
3. Plan the run against a device budget a few times smaller than the weights: the CPU
   device is given that capacity and refuses to hold more.
4. Fine-tune a LoRA adapter with STREAMING (each step reads every layer from the mmap'd
   file, as it would for a 70B model), packed sequences, the loss on the assistant's
   tokens only, and the held-out loss every few steps.
5. Print the held-out loss and a reply to a held-out question before and after, the
   measured device peak against the weights, and where the peft adapter is.

Everything lands in ``--out`` (default ``./lema-demo``): ``base/`` (model + tokenizer),
``data/`` (the conversations), ``final/`` (the adapter) and ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
import click

SIZES = {
    # hidden, layers, heads, kv heads, intermediate, LoRA rank, seq
    "tiny": (256, 12, 8, 4, 688, 4, 96),
    "small": (512, 10, 8, 4, 1376, 8, 128),
}
# The random base: transformers' usual init (std 0.02) for the layers, but unit-scale
# token embeddings, so the residual stream keeps each token's identity (instead of being
# drowned by the layers' random outputs), and a head wide enough for confident logits.
INIT_STD, EMBED_STD, HEAD_STD = 0.02, 1.0, 0.06
QUESTION = 0  # the held-out conversation whose question the demo asks before and after


@attrs.frozen(kw_only=True)
class DemoSettings:
    """The demo's training run."""

    size: str = "small"
    steps: int = 120
    lr: float = 3e-3
    seed: int = 0

    @property
    def eval_every(self) -> int:
        """Held-out loss every 20 steps (every half of a shorter run)."""
        return min(20, max(1, self.steps // 2))


def demo_assets() -> Path:
    """The folder of the shipped chat data and tokenizer (``lema/data/demo``)."""
    from importlib import resources

    return Path(str(resources.files("lema") / "data" / "demo"))


def build_base_model(folder: Path, tokenizer: Any, size: str, seed: int) -> Path:
    """Write ``folder/model.safetensors`` (monolithic, config in its metadata), ``config.json``
    and the tokenizer files; returns the ``.safetensors`` path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from lema.app.tools.convert import prepare_monolithic_safetensors

    hidden, layers, heads, kv, inter = SIZES[size][:5]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, vocab_size=len(tokenizer),
                         max_position_embeddings=1024, tie_word_embeddings=False, initializer_range=INIT_STD,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, EMBED_STD)
        model.lm_head.weight.normal_(0.0, HEAD_STD)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # its "Writing model shards" bar would interleave our lines
        try:
            model.save_pretrained(tmp)
        finally:
            if shown:
                hf_logging.enable_progress_bar()
        out = prepare_monolithic_safetensors(tmp, folder / "model.safetensors", device="cpu")
        shutil.copyfile(Path(tmp) / "config.json", folder / "config.json")
    tokenizer.save_pretrained(folder)
    return out


def reply(model: Any, tokenizer: Any, question: str, system: str | None, new_tokens: int = 32) -> str:
    """The model's greedy reply to ``question``, rendered with the chat template."""
    from lema.app.tools.generation import generate
    from lema.cli.generate_cmd import chat_prompt_ids

    ids, stops = chat_prompt_ids(tokenizer, question, system, None)
    out = generate(model, ids, max_new_tokens=new_tokens, eos_token_id=[tokenizer.eos_token_id, *stops])
    text = tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    # An untrained model's bytes need not be printable text.
    return " ".join("".join(c if c.isprintable() else "\ufffd" for c in text).split())


def budget_for(plan_bytes: int) -> int:
    """The device budget the demo runs under: the plan rounded up to a whole MiB (plus 2%)."""
    mib = 1 << 20
    return math.ceil(plan_bytes * 1.02 / mib) * mib


@click.command("demo")
@click.option("--out", default="lema-demo", show_default=True, metavar="DIR", help="Where everything is written.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help=f"Optimizer steps (default {DemoSettings().steps}).")
@click.option("--size", type=click.Choice(sorted(SIZES)), default="small", show_default=True,
              help="small: hidden 512, 10 layers (~30M parameters, 113 MiB); tiny: hidden 256, 12 layers.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Run in a non-empty --out, replacing the demo's files there.")
def demo(out: str, steps: int | None, size: str, seed: int, overwrite: bool) -> None:
    """Chat-tune a LoRA adapter on a model several times larger than the device budget."""
    from lema.adapters.checkpoints.atomic import atomic_write_text
    from lema.adapters.devices.cpu import CpuDevice
    from lema.app import bootstrap
    from lema.app.training.model import LemaModel
    from lema.app.outputs import check_output
    from lema.app.training.run_data import prepare_data
    from lema.app.training.run_folder import FINAL, METRICS
    from lema.app.training.train_loop import LoopOptions, evaluate, make_optimizer, plan_summary, train_loop
    from lema.cli.progress import TrainingProgress
    from lema.config import LemaConfig, check_seed
    from lema.data.tokenizer import load_tokenizer
    from lema.domain.units import format_size
    from lema.errors import OutputError

    check_seed(seed, "--seed")
    settings = DemoSettings(size=size, seed=seed, **({} if steps is None else {"steps": steps}))
    rank, seq = SIZES[size][5:]
    began = time.perf_counter()
    root = Path(out).expanduser().absolute()  # absolute: the checkpoint records these paths
    if root.exists() and not root.is_dir():
        raise OutputError(f"--out {out} is a file; pass a folder")
    check_output(root, option="--out", overwrite=overwrite)
    data_dir, base_dir = root / "data", root / "base"
    data_dir.mkdir(parents=True, exist_ok=True)
    assets = demo_assets()
    for name in ("train.jsonl", "heldout.jsonl"):
        atomic_write_text(data_dir / name, (assets / name).read_text(encoding="utf-8"))
    tokenizer = load_tokenizer(assets)
    held_rows = [json.loads(line) for line in (data_dir / "heldout.jsonl").read_text(encoding="utf-8").splitlines()]
    system, question = (held_rows[QUESTION]["messages"][0]["content"], held_rows[QUESTION]["messages"][1]["content"])
    data = prepare_data(str(data_dir / "train.jsonl"), tokenizer, seq=seq, packing=True,
                        eval_data=str(data_dir / "heldout.jsonl"), seed=seed, cache=False)
    click.echo(f"1/5 data (shipped with LEMA): a library help desk; {len(data.store)} training conversations, "
               f"{len(data.eval_examples)} held out; byte-level BPE tokenizer ({len(tokenizer)} tokens) "
               "with a chat template")
    for line in data.lines:
        click.echo(f"      {line}")

    hidden, layers = SIZES[size][:2]
    click.echo(f"2/5 base model: Llama-family, hidden {hidden}, {layers} layers, random weights (seed {seed})")
    weights = build_base_model(base_dir, tokenizer, size, seed)
    runtime = dict(model_name_or_path=str(base_dir), gbi_path=str(weights), strategy="streaming", device="cpu",
                   lora_rank=rank, batch_size=1, max_seq_len=seq, prefetch_distance=0, seed=seed)
    unbounded = LemaConfig(**runtime)  # planned without a budget: what the run needs
    spec = bootstrap.open_model(unbounded).spec
    # planned for the CPU standing in for a smaller device (weights through slots), as it will run
    needed = bootstrap.make_plan(unbounded, spec, CpuDevice(direct_reads=True, record_timeline=False)).device_total
    weight_bytes, budget = spec.weight_bytes, budget_for(needed)
    model = LemaModel(LemaConfig(**runtime, vram_budget=budget))
    try:
        model.initialize_lora()
        click.echo(f"3/5 plan: weights {format_size(weight_bytes)} on disk, streamed one layer at a time; device "
                   f"budget {format_size(budget)} (the CPU device's capacity): the model is "
                   f"{weight_bytes / budget:.1f}x the device")
        click.echo(f"      {plan_summary(model)}")
        opts = LoopOptions(out=root, steps=settings.steps, batch=1, seq=seq, lr=settings.lr, seed=seed,
                           lr_schedule="cosine", warmup=max(1, settings.steps // 20), eval_steps=settings.eval_every)
        for old in (root / FINAL, root / METRICS):  # the demo's own files of an earlier run (--overwrite)
            if old.is_dir():
                shutil.rmtree(old)
            elif old.exists():
                old.unlink()
        optimizer, scheduler = make_optimizer(model, opts)
        trainer = model.get_trainer(optimizer, scheduler=scheduler)
        pad = tokenizer.pad_token_id
        before = evaluate(trainer, data.eval_examples, pad, opts)["loss"]
        before_reply = reply(model, tokenizer, question, system)
        click.echo(f"4/5 fine-tuning: {settings.steps} steps of {seq} packed tokens, lr {settings.lr:g}, LoRA rank "
                   f"{rank} on {', '.join(model.lora_spec.targets)}; held-out loss every {settings.eval_every} steps")
        click.echo(f"step 0/{settings.steps}  eval_loss {before:.4f}")
        result = train_loop(model, trainer, data.items, pad, opts, base_dir, echo=click.echo,
                            progress=TrainingProgress, collate_fn=data.collate_fn, eval_examples=data.eval_examples,
                            hold_signals=True)
        if result.interrupted:
            click.echo(f"interrupted at step {result.steps_done}: saved {result.checkpoint}")
            click.get_current_context().exit(143 if result.signal == "SIGTERM" else 130)
        rows = [json.loads(line) for line in (root / METRICS).read_text(encoding="utf-8").splitlines()]
        after = [r["eval_loss"] for r in rows if "eval_loss" in r][-1]
        peak = max(r["device_peak_bytes"] for r in rows if r.get("device_peak_bytes"))
        after_reply = reply(model, tokenizer, question, system)
    finally:
        model.close()
    click.echo("")
    click.echo(f"5/5 held-out loss: before {before:.3f} -> after {after:.3f} "
               f"({'fell' if after < before else 'did not fall'} by {before - after:.3f})")
    click.echo(f"question (held out): {question!r}")
    click.echo(f"reply before: {before_reply!r}")
    click.echo(f"reply after:  {after_reply!r}")
    click.echo(f"measured device peak {format_size(peak)} (budget {format_size(budget)}): the weights "
               f"({format_size(weight_bytes)}) are {weight_bytes / peak:.1f}x what the device held")
    click.echo(f"adapter (peft format): {result.checkpoint}   metrics: {root / METRICS}")
    click.echo(f"the same run from the shell: lema train --model {weights} --data {data_dir / 'train.jsonl'} "
               f"--eval-data {data_dir / 'heldout.jsonl'} --eval-steps {settings.eval_every} --out {root / 'run'} "
               f"--steps {settings.steps} --batch 1 --seq {seq} --packing --lr {settings.lr:g} --rank {rank} "
               f"--lr-schedule cosine --warmup {opts.warmup} --prefetch 0 --vram {budget} --device cpu --seed {seed}")
    click.echo(f"then: lema generate --model {weights} --adapter {result.checkpoint} --chat --system {system!r} "
               f"--prompt {question!r}")
    click.echo(f"demo finished in {time.perf_counter() - began:.0f} s")
