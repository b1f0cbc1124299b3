"""``lema train --model PATH --data DATA --out DIR``: fine-tune a LoRA adapter from the shell.

This module parses the options (:mod:`lema.cli.train_options`, or a ``--config`` YAML file)
and prints; the run itself is :func:`lema.app.training.run_training.run_training`, the use
case the Python API calls too (the data is prepared by :mod:`lema.app.training.run_data`
and the steps run in :func:`lema.app.training.train_loop.train_loop`).

What the run leaves in ``DIR``:

* ``checkpoint-<step>/`` every ``--save-steps`` optimizer steps, and when Ctrl-C stops the
  run (peft adapter + optimizer/trainer state + tokenizer: resumable);
* ``final/``: the same, written when the run completes (the adapter to use);
* ``metrics.jsonl``: one JSON object per optimizer step (step, loss, lr, tokens_per_s,
  device_peak_bytes, ...) and one per evaluation (step, eval_loss, eval_perplexity);
* ``tensorboard/`` (``--report-to tensorboard``) and ``wandb/`` (``--report-to wandb``);
* ``train_args.json``: the options of the run, compared on ``--resume``.

``--resume`` continues from the complete checkpoint in ``DIR`` with the highest step
(``final`` or a ``checkpoint-<step>``, including the recovery copy an interrupted save
leaves): adapter, optimizer, LR schedule and RNG states (LoRA dropout's included) are
restored and the batches already consumed are skipped, so a resumed run ends with the same
adapter as a straight one (bit for bit on CPU). Without ``--resume`` ``DIR`` must be new or
empty (``--overwrite`` empties it first). While it runs, ``DIR/.lema.lock`` (holding the pid) keeps a second ``lema train``
out of ``DIR``.

Under ``torchrun --nproc-per-node N lema train ...`` every rank trains on its ``--batch``
rows of each ``N x --batch`` batch on its own device (``cuda:LOCAL_RANK``, or the CPU with
gloo); rank 0 prints, locks ``DIR``, writes metrics and checkpoints (docs/distributed.md).

Exit status: 0 done, 1 the plan does not fit (the message says what would) or a
non-finite loss stopped the run (after saving the last good step), 2 bad input, 130
stopped by Ctrl-C, 143 stopped by SIGTERM (both after saving a checkpoint).
"""

from __future__ import annotations

from typing import Any

import click

from lema.app.training.run_training import TrainOptions, run_training
from lema.cli.progress import TrainingProgress
from lema.cli.train_options import train_options

# -- the command -----------------------------------------------------------------------------


@click.command("train")
@train_options
@click.pass_context
def train(ctx: click.Context, **options: Any) -> None:
    """Fine-tune a LoRA adapter on --data and write it to --out.

    OUT gets checkpoint-<step>/ every --save-steps and on Ctrl-C or SIGTERM, final/ when
    the run completes (peft adapter + optimizer state + tokenizer), and metrics.jsonl.
    OUT must be new or empty; --resume continues the run in it exactly where it stopped,
    --overwrite replaces it. Every option can also be a key of --config run.yaml (TRL,
    transformers and axolotl YAML files are read too); flags override it.

    \b
    Example:
      lema train --model llama2_7b.safetensors --data chat.jsonl --out runs/a \\
                 --steps 1000 --batch 4 --seq 1024 --packing --eval-split 0.05 --eval-steps 100
    """
    data = tuple(options.pop("data"))  # --data given once or more
    options.update(data=data[0], more_data=data[1:])
    code = run_training(TrainOptions(**options), echo=click.echo, progress=TrainingProgress, hold_signals=True)
    if code:
        ctx.exit(code)
