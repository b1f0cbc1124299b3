"""The options of ``lema train`` (each one is also a key of ``--config run.yaml``)."""

from __future__ import annotations

from typing import Any, Callable

import click

from lema.cli.config_file import config_option

_FORMATS = ["auto", "text", "prompt-completion", "messages", "sharegpt", "alpaca"]

OPTIONS: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
    config_option,
    click.option("--model", "model_path", required=True, metavar="PATH",
                 help="A converted .safetensors file, or a Hugging Face model folder (.bin weights are converted "
                      "once into $LEMA_CACHE, default ~/.cache/lema)."),
    click.option("--data", required=True, metavar="DATA",
                 help="Training data: .jsonl, .json (lines or an array), .parquet, .csv, .txt, a folder of those, "
                      "a saved dataset folder, or a Hub dataset id owner/name[:split]."),
    click.option("--out", required=True, metavar="DIR", help="Where checkpoints and metrics.jsonl go."),
    click.option("--format", "data_format", type=click.Choice(_FORMATS), default="auto", show_default=True,
                 help="The data format (auto: from the fields: messages, conversations, instruction/output, "
                      "prompt/completion, text)."),
    click.option("--chat-template", metavar="FILE|NAME",
                 help="Chat template for chat data: a Jinja file, a tokenizer_config.json, or 'chatml' "
                      "(default: the tokenizer's own)."),
    click.option("--packing/--no-packing", default=False, show_default=True,
                 help="Several short examples per sequence, attention kept inside each."),
    click.option("--eval-data", metavar="DATA", help="Held-out data (any --data form) for the eval loss."),
    click.option("--eval-split", type=float, default=None, help="Hold out this fraction of --data, e.g. 0.05."),
    click.option("--eval-steps", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Evaluate every N optimizer steps (0: at the end only)."),
    click.option("--steps", type=click.IntRange(min=1), help="Optimizer steps to train (total, counting resumed ones)."),
    click.option("--epochs", type=click.IntRange(min=1), help="Passes over the data (default 1 when --steps is not given)."),
    click.option("--batch", type=click.IntRange(min=1), default=4, show_default=True,
                 help="Sequences (packed rows with --packing) per micro-batch (per rank under torchrun)."),
    click.option("--seq", type=click.IntRange(min=2), default=512, show_default=True, help="Tokens per sequence."),
    click.option("--lr", type=float, default=2e-4, show_default=True, help="Peak learning rate."),
    click.option("--optimizer", type=click.Choice(["adamw", "adamw8bit", "sgd"]), default="adamw", show_default=True,
                 help="adamw8bit: bitsandbytes' 8-bit AdamW (pip install 'lema[quant]')."),
    click.option("--weight-decay", type=click.FloatRange(min=0.0), default=0.0, show_default=True),
    click.option("--max-grad-norm", type=click.FloatRange(min=0.0), default=1.0, show_default=True,
                 help="Clip the LoRA gradients' global norm (0: no clipping)."),
    click.option("--rank", type=click.IntRange(min=1), default=16, show_default=True, help="LoRA rank."),
    click.option("--alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank)."),
    click.option("--lora-dropout", "--dropout", "lora_dropout", type=click.FloatRange(min=0.0, max=1.0, max_open=True),
                 default=0.0, show_default=True,
                 help="Dropout on the adapters' input (seeded by --seed; exact on --resume)."),
    click.option("--targets", metavar="A,B,...",
                 help="LoRA target modules, comma-separated (default: the family's; 'all-linear')."),
    click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto",
                 show_default=True, help="Compute dtype of the base weights (auto: the file's)."),
    click.option("--strategy", type=click.Choice(["streaming", "resident", "auto"]), default="streaming",
                 show_default=True, help="How base weights reach the device."),
    click.option("--vram", metavar="SIZE", help="Device memory budget, e.g. 8G (default: the device's capacity)."),
    click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True,
                 help="Micro-batches per optimizer step."),
    click.option("--save-steps", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Write DIR/checkpoint-<step> every N optimizer steps (0: only at the end)."),
    click.option("--save-total-limit", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Keep only the newest N checkpoint-<step> folders (0: all)."),
    click.option("--report-to", default="none", show_default=True, metavar="none|tensorboard|wandb",
                 help="Also log metrics to TensorBoard (event files in DIR/tensorboard) and/or wandb "
                      "(comma-separated)."),
    click.option("--run-name", default=None, help="The run's name for wandb (default: DIR's name)."),
    click.option("--resume", is_flag=True, help="Continue from the latest complete checkpoint in DIR."),
    click.option("--reset-optimizer", is_flag=True,
                 help="With --resume: start the optimizer fresh instead of from the checkpoint's state "
                      "(required when optimizer.safetensors is missing)."),
    click.option("--seed", type=int, default=0, show_default=True,
                 help="Seeds the adapter init, LoRA dropout, data order and packing."),
    click.option("--tokenizer", metavar="PATH", help="Tokenizer folder (default: the model's)."),
    click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
    click.option("--offload-activations/--no-offload-activations", "offload", default=None,
                 help="Keep the checkpointed layer inputs in host memory between each layer's forward and backward "
                      "(default: on when the memory plan needs it; the planner also tiles long sequences)."),
    click.option("--prefetch", type=click.IntRange(min=0), default=2, show_default=True,
                 help="Layers read ahead of the one computing."),
    click.option("--warmup", type=click.IntRange(min=0), default=0, show_default=True, help="Linear warmup steps."),
    click.option("--lr-schedule", type=click.Choice(["constant", "cosine", "linear"]), default="constant",
                 show_default=True),
    click.option("--max-line-size", default="1M", show_default=True, metavar="SIZE",
                 help="Longest line of a text or JSON data file accepted (bytes of text); longer lines are refused "
                      "before tokenizing."),
    click.option("--method", type=click.Choice(["sft", "dpo", "ipo", "orpo", "simpo", "kto"]), default="sft",
                 show_default=True,
                 help="The objective: sft (next-token), or preference tuning on prompt/chosen/rejected rows "
                      "(kto: prompt/completion/label), as TRL computes it."),
    click.option("--beta", type=float, default=None,
                 help="Preference methods: beta (default 0.1, TRL's; DPO/IPO/KTO: closeness to the reference)."),
    click.option("--label-smoothing", type=float, default=0.0, show_default=True,
                 help="dpo/simpo: probability that a preference is flipped (conservative DPO), in [0, 0.5)."),
    click.option("--simpo-gamma", type=float, default=0.5, show_default=True, help="simpo: the target reward margin."),
    click.option("--cpo-alpha", type=float, default=0.0, show_default=True,
                 help="simpo: weight of an NLL term on the chosen answers (0: pure SimPO)."),
    click.option("--desirable-weight", type=float, default=1.0, show_default=True, help="kto: weight of desirable rows."),
    click.option("--undesirable-weight", type=float, default=1.0, show_default=True,
                 help="kto: weight of undesirable rows."),
    click.option("--adapter", metavar="DIR",
                 help="Start from this peft adapter (a LEMA checkpoint or one peft wrote) with a fresh optimizer; "
                      "for dpo/ipo/kto it is also the frozen reference (default: a fresh adapter, the base as "
                      "reference)."),
    click.option("--precompute-ref", is_flag=True, default=False,
                 help="dpo/ipo/kto: compute the reference log-probs once per data set (a no-grad pass, cached beside "
                      "the run) instead of the reference forward in every training pass."),
    click.option("--data-cache/--no-data-cache", default=True, show_default=True,
                 help="Keep the tokenized data in $LEMA_CACHE/data for the next run on the same data."),
]


def train_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Apply every option of ``lema train`` to ``f`` (in the order listed in ``--help``)."""
    for option in reversed(OPTIONS):
        f = option(f)
    return f
