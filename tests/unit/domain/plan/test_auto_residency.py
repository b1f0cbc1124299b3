"""AUTO's residency search (a binary search plus a short scan) equals trying every count."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lema.domain.model.spec import ModelSpec
from lema.domain.plan.assemble import _resident_prefix, _summary, auto_resident, build, facts_for
from lema.domain.plan.inputs import Budget, TrainingShape


def brute_force(summary, f, shape, budget) -> tuple[int, ...]:
    """The clearly correct version: the largest count that fits, trying each one."""
    n = f.n_layers
    best = 0
    for k in range(n + 2):
        if build(summary, f, shape, budget, _resident_prefix(n, k)).fits:
            best = k
    return _resident_prefix(n, best)


@settings(max_examples=60)
@given(st.integers(1, 12), st.sampled_from([(64, 100), (64, 5000), (32, 20000)]), st.booleans(),
       st.integers(0, 4), st.integers(1, 4), st.integers(1, 64), st.integers(1 << 16, 1 << 24),
       st.sampled_from(["llama", "gpt2"]))
def test_auto_residency_equals_trying_every_count(layers, dims, tied, prefetch, batch, seq, budget, family):
    hidden, vocab = dims
    if family == "llama":
        config = {"model_type": "llama", "hidden_size": hidden, "num_attention_heads": 4, "num_hidden_layers": layers,
                  "intermediate_size": 2 * hidden, "vocab_size": vocab, "tie_word_embeddings": tied}
    else:
        config = {"model_type": "gpt2", "n_embd": hidden, "n_head": 4, "n_layer": layers, "vocab_size": vocab,
                  "n_positions": 64}
    spec = ModelSpec.from_config(config, dtype="F16")
    shape = TrainingShape(batch=batch, seq=seq, lora_rank=4, strategy="auto", prefetch=prefetch, device_kind="cpu")
    f = facts_for(spec, shape)
    summary = _summary(spec, shape, f)
    assert auto_resident(summary, f, shape, Budget(budget)) == brute_force(summary, f, shape, Budget(budget))
