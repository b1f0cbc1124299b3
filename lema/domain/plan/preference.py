"""The preference step's terms in the memory plan (DPO, IPO, ORPO, SimPO, KTO; pure).

A preference step (:mod:`lema.app.runtime.preference_pass`) trains on paired rows: the
shape's ``batch`` counts rows, two per pair (KTO: a completion and its KL row), and
``TrainingShape.preference`` says what the step adds to SFT over the same rows:

* ``"pairs"`` (ORPO, SimPO: no reference): the per-row log-prob buffers at the head;
* ``"reference"`` (DPO, IPO, KTO against the base model): also the reference's hidden
  state ``X = T h a``, moved along beside the policy's through the forward (no autograd, never
  checkpointed), and at the head the reference's no-grad chunked log-probs while ``x_L``
  and ``X`` are alive;
* ``"reference_adapter"``: the same, plus the frozen starting adapter (fp32, the LoRA
  parameters' size) on the device for the whole run.

The layer backward and the optimizer step are SFT's: the reference hidden state is gone by
then. Measured on ``CpuDevice`` (tests/integration/app/test_plan_accuracy.py).
"""

from __future__ import annotations

from lema.domain.plan import items as pi
from lema.domain.plan.items import MemoryItem, ModelFacts

KINDS = ("pairs", "reference", "reference_adapter")


def rows_per_example(preference: str | None) -> int:
    """Rows a training example takes: 2 for a preference step (a pair), 1 for SFT."""
    return 1 if preference is None else 2


def persistent(f: ModelFacts, lora_rank: int, preference: str | None) -> list[MemoryItem]:
    """The frozen reference adapter, when the reference is the starting adapter."""
    if preference != "reference_adapter":
        return []
    lora = pi.lora_parameters(f, lora_rank)
    return [MemoryItem("reference_adapter", lora * pi.FP32, f"the frozen starting adapter: {lora:,} fp32 parameters")]


def phases(f: ModelFacts, batch: int, seq: int, chunk_tokens: int, preference: str | None,
           sft: list[MemoryItem]) -> list[MemoryItem]:
    """SFT's phases (:func:`lema.domain.plan.assemble.activation_phases`) with the preference terms."""
    if preference is None:
        return sft
    t = batch * seq
    x = t * f.hidden * f.act_bytes
    reference = preference != "pairs"
    # per token: the reference's and the policy's fp32 log-probs and the latter's gradient
    logps = MemoryItem("row_logps", 3 * t * pi.FP32, "per-token log-probs: reference, policy + grad, 3 T 4")
    out = []
    for phase in sft:
        if phase.name == "forward" and reference:
            phase = pi.summed("forward", [phase, MemoryItem("reference_hidden", x, "the reference's T h a")])
        elif phase.name == "head":
            extra = [logps]
            if reference:  # the reference's no-grad head runs first, beside x_L and its own hidden state
                c = min(t, chunk_tokens)
                no_grad = x + 2 * t * f.hidden * f.act_bytes + 2 * c * f.vocab * pi.FP32
                head = next((p.bytes for p in phase.parts if p.name == "head"), 0)
                if no_grad > head:
                    extra.append(MemoryItem("reference_head", no_grad - head,
                                            "reference hidden T h a + its no-grad chunked head, beyond the policy's"))
            phase = pi.summed("head", [phase, *extra])
        out.append(phase)
    return out
