"""The options of ``lema train`` (each one is also a key of ``--config run.yaml``)."""

from __future__ import annotations

from typing import Any, Callable

import click

from lema.cli.config_file import config_format_option, config_option

_FORMATS = ["auto", "text", "prompt-completion", "messages", "sharegpt", "alpaca"]

# The field's (transformers', TRL's, axolotl's) names for LEMA's values.
OPTIMIZERS = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw", "adamw_apex_fused": "adamw",
              "adamw_bnb_8bit": "adamw8bit", "adamw_8bit": "adamw8bit", "paged_adamw_8bit": "adamw8bit",
              "paged_adamw_32bit": "adamw",
              "bnb_adamw_8bit": "adamw8bit"}
SCHEDULES = {"constant_with_warmup": "constant"}


class AliasChoice(click.Choice):
    """A choice that also takes the field's names for its values (``adamw_torch`` for ``adamw``)."""

    def __init__(self, choices: list[str], aliases: dict[str, str]) -> None:
        super().__init__(choices)
        self.aliases = aliases

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and value in self.aliases:
            return self.aliases[value]
        return super().convert(value, param, ctx)

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:  # type: ignore[override]
        return "[" + "|".join(map(str, self.choices)) + "]"

# How the data's fields map to LEMA's (the names of axolotl's and TRL's keys in brackets).
DATA_MAPPING: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
    click.option("--data-weights", metavar="W,W,...",
                 help="With several --data: the share of the examples drawn from each, e.g. 0.7,0.3 (each data "
                      "set is repeated or subsampled, seeded by --seed, so that the mix keeps the total number of "
                      "examples). Default: every example of each, once.")
    ,
    click.option("--data-epochs", metavar="E,E,...",
                 help="With several --data: passes over each in one epoch of the mix, e.g. 2,1 (every example of "
                      "the first twice; 0.5: a seeded half). Instead of --data-weights.")
    ,
    click.option("--messages-field", "--field-messages", "messages_field", metavar="NAME",
                 help="The field holding the conversation (axolotl's field_messages), e.g. dialog.")
    ,
    click.option("--role-key", metavar="NAME", help="The message key holding the role (axolotl's "
                                                    "message_property_mappings.role), e.g. speaker.")
    ,
    click.option("--content-key", metavar="NAME", help="The message key holding the text (axolotl's "
                                                       "message_property_mappings.content), e.g. text.")
    ,
    click.option("--roles", "role_names", metavar="NAME=ROLE,...",
                 help="The data's role names as system/user/assistant/tool, e.g. human=user,bot=assistant "
                      "(axolotl's roles).")
    ,
    click.option("--roles-to-train", default="assistant", show_default=True, metavar="ROLE,...",
                 help="The roles whose turns carry the loss in chat data (axolotl's roles_to_train).")
    ,
    click.option("--train-on-inputs/--no-train-on-inputs", default=False, show_default=True,
                 help="Loss on every token (prompts and user turns too), not only the completion or the trained "
                      "roles' turns (axolotl's train_on_inputs; TRL's completion_only_loss: false).")
    ,
    click.option("--text-field", "--dataset-text-field", "text_field", metavar="NAME",
                 help="The field holding plain text (TRL's dataset_text_field).")
    ,
    click.option("--prompt-field", metavar="NAME", help="The field holding the prompt (default: prompt).")
    ,
    click.option("--completion-field", metavar="NAME", help="The field holding the completion (default: completion).")
    ,
]

OPTIONS: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
    config_option,
    config_format_option,
    click.option("--model", "--model-name-or-path", "--base-model", "model_path", required=True, metavar="PATH",
                 help="A converted .safetensors file, or a Hugging Face model folder (.bin weights are converted "
                      "once into $LEMA_CACHE, default ~/.cache/lema)."),
    click.option("--data", "--dataset-name", "data", required=True, multiple=True, metavar="DATA",
                 help="Training data: .jsonl, .json (lines or an array), .parquet, .csv, .txt, a folder of those, "
                      "a saved dataset folder, or a Hub dataset id owner/name[:split]. Give it several times to "
                      "train on several data sets (mixed by --data-weights)."),
    click.option("--out", "--output-dir", "out", required=True, metavar="DIR",
                 help="Where checkpoints and metrics.jsonl go."),
    click.option("--format", "data_format", type=click.Choice(_FORMATS), default="auto", show_default=True,
                 help="The data format (auto: from the fields: messages, conversations, instruction/output, "
                      "prompt/completion, text)."),
    click.option("--chat-template", metavar="FILE|NAME",
                 help="Chat template for chat data: a Jinja file, a tokenizer_config.json, or 'chatml' "
                      "(default: the tokenizer's own)."),
    *DATA_MAPPING,
    click.option("--packing/--no-packing", "--sample-packing/--no-sample-packing", "packing", default=False,
                 show_default=True,
                 help="Several short examples per sequence, attention kept inside each."),
    click.option("--eval-data", metavar="DATA", help="Held-out data (any --data form) for the eval loss."),
    click.option("--eval-split", "--val-set-size", "eval_split", type=float, default=None,
                 help="Hold out this fraction of --data, e.g. 0.05."),
    click.option("--eval-steps", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Evaluate every N optimizer steps (0: at the end only)."),
    click.option("--steps", "--max-steps", "steps", type=click.IntRange(min=1),
                 help="Optimizer steps to train (total, counting resumed ones)."),
    click.option("--epochs", "--num-train-epochs", "--num-epochs", "epochs", type=click.IntRange(min=1),
                 help="Passes over the data (default 1 when --steps is not given)."),
    click.option("--batch", "--per-device-train-batch-size", "--micro-batch-size", "batch", type=click.IntRange(min=1),
                 default=4, show_default=True,
                 help="Sequences (packed rows with --packing) per micro-batch (per rank under torchrun)."),
    click.option("--seq", "--max-length", "--max-seq-length", "--sequence-len", "seq", type=click.IntRange(min=2),
                 default=512, show_default=True, help="Tokens per sequence."),
    click.option("--lr", "--learning-rate", "lr", type=float, default=2e-4, show_default=True,
                 help="Peak learning rate."),
    click.option("--optimizer", "--optim", "optimizer", type=AliasChoice(["adamw", "adamw8bit", "sgd"], OPTIMIZERS),
                 default="adamw", show_default=True,
                 help="adamw8bit: bitsandbytes' 8-bit AdamW (pip install 'lema[quant]'); the field's names "
                      "(adamw_torch, adamw_bnb_8bit, paged_adamw_8bit, ...) are accepted."),
    click.option("--weight-decay", type=click.FloatRange(min=0.0), default=0.0, show_default=True),
    click.option("--max-grad-norm", type=click.FloatRange(min=0.0), default=1.0, show_default=True,
                 help="Clip the LoRA gradients' global norm (0: no clipping)."),
    click.option("--rank", "--lora-r", "rank", type=click.IntRange(min=1), default=16, show_default=True,
                 help="LoRA rank."),
    click.option("--alpha", "--lora-alpha", "alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank)."),
    click.option("--lora-dropout", "--dropout", "lora_dropout", type=click.FloatRange(min=0.0, max=1.0, max_open=True),
                 default=0.0, show_default=True,
                 help="Dropout on the adapters' input (seeded by --seed; exact on --resume)."),
    click.option("--targets", "--lora-target-modules", "targets", metavar="A,B,...",
                 help="LoRA target modules, comma-separated (default: the family's; 'all-linear')."),
    click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto",
                 show_default=True, help="Compute dtype of the base weights (auto: the file's)."),
    click.option("--strategy", type=click.Choice(["streaming", "resident", "auto"]), default="streaming",
                 show_default=True, help="How base weights reach the device."),
    click.option("--vram", metavar="SIZE", help="Device memory budget, e.g. 8G (default: the device's capacity)."),
    click.option("--grad-accum", "--gradient-accumulation-steps", "grad_accum", type=click.IntRange(min=1), default=1,
                 show_default=True, help="Micro-batches per optimizer step."),
    click.option("--save-steps", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Write DIR/checkpoint-<step> every N optimizer steps (0: only at the end)."),
    click.option("--evals-per-epoch", type=click.IntRange(min=1), default=None,
                 help="Evaluate N times per epoch (instead of --eval-steps; axolotl's evals_per_epoch)."),
    click.option("--saves-per-epoch", type=click.IntRange(min=1), default=None,
                 help="Write a checkpoint N times per epoch (instead of --save-steps; axolotl's saves_per_epoch)."),
    click.option("--save-total-limit", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Keep only the newest N checkpoint-<step> folders (0: all)."),
    click.option("--report-to", default="none", show_default=True, metavar="none|tensorboard|wandb",
                 help="Also log metrics to TensorBoard (event files in DIR/tensorboard) and/or wandb "
                      "(comma-separated)."),
    click.option("--run-name", default=None, help="The run's name for wandb (default: DIR's name)."),
    click.option("--resume", "--resume-from-checkpoint", "resume", is_flag=True,
                 help="Continue from the latest complete checkpoint in DIR."),
    click.option("--overwrite", "--overwrite-output-dir", "overwrite", is_flag=True,
                 help="Replace what an earlier run left in DIR (without it DIR must be new or empty)."),
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
    click.option("--prefetch", type=click.IntRange(min=0), default=None,
                 help="Layers read ahead of the one computing (default: with --strategy auto the plan chooses "
                      "0..4 by predicted step time, otherwise 2)."),
    click.option("--warmup", "--warmup-steps", "warmup", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Linear warmup steps."),
    click.option("--warmup-ratio", type=click.FloatRange(min=0.0, max=1.0, max_open=True), default=None,
                 help="Warmup as a fraction of the optimizer steps (rounded up), instead of --warmup."),
    click.option("--lr-schedule", "--lr-scheduler-type", "--lr-scheduler", "lr_schedule",
                 type=AliasChoice(["constant", "cosine", "linear"], SCHEDULES), default="constant",
                 show_default=True, help="The LR after warmup (constant_with_warmup is constant here: --warmup "
                                         "applies to every schedule)."),
    click.option("--logging-steps", type=click.IntRange(min=1), default=None,
                 help="Write a metrics.jsonl record and log a line every N optimizer steps (the loss: the mean "
                      "over those steps). Default: a record every step, about ten log lines per run."),
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
