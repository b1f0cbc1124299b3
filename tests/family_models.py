"""Tiny random transformers models of every family, the references LEMA must agree with.

``build(name)`` gives the transformers ``*ForCausalLM`` (fp32, eval, randomised norms and
biases so every feature matters), ``files(name, root)`` its ``save_pretrained`` folder and
the LEMA file ``lema convert`` makes of it. The cases switch on what each family adds:
biases, ``head_dim`` independent of hidden / heads, sliding windows shorter than the test
sequences, soft-caps, ``query_pre_attn_scalar``, per-layer-type rope, partial rotary with
LongRoPE crossing its original length, mixtures of 4 experts with top-2 (a dense layer in
Qwen3-MoE), tied and untied heads.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

VOCAB = 128
FAMILIES = ("llama", "qwen3", "gemma2", "gemma3", "phi3", "olmo2", "mixtral", "qwen3_moe")


def _base_config(vocab: int = VOCAB, **kw: Any) -> dict[str, Any]:
    d = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=None)
    d.update(kw)
    return d


def config(name: str, vocab: int = VOCAB) -> Any:
    """The transformers config of a case (``vocab`` tokens)."""
    import transformers as T

    _base = functools.partial(_base_config, vocab)

    if name == "llama":  # every Llama option: q/k/v/o and MLP biases, head_dim != hidden / heads, yarn rope
        return T.LlamaConfig(**_base(attention_bias=True, mlp_bias=True, head_dim=24, rope_parameters={
            "rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 32}))
    if name == "qwen3":  # layer 1 slides (window 4), tied head, q/k/v/o biases
        return T.Qwen3Config(**_base(head_dim=24, use_sliding_window=True, sliding_window=4, max_window_layers=1,
                                     attention_bias=True, tie_word_embeddings=True))
    if name == "gemma2":
        return T.Gemma2Config(**_base(head_dim=24, sliding_window=4, query_pre_attn_scalar=20,
                                      attn_logit_softcapping=5.0, final_logit_softcapping=3.0))
    if name == "gemma3":
        return T.Gemma3TextConfig(**_base(
            head_dim=24, sliding_window=4, query_pre_attn_scalar=20, final_logit_softcapping=3.0,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}))
    if name == "phi3":  # partial rotary 0.75 (12 of 16 dims), LongRoPE switching at 16 tokens, window 5, tied
        rot = 12
        return T.Phi3Config(**_base(sliding_window=5, original_max_position_embeddings=16, tie_word_embeddings=True,
                                    rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                     "partial_rotary_factor": 0.75,
                                                     "short_factor": [1.0 + 0.1 * i for i in range(rot // 2)],
                                                     "long_factor": [1.5 + 0.3 * i for i in range(rot // 2)]}))
    if name == "olmo2":
        return T.Olmo2Config(**_base(attention_bias=True))
    if name == "mixtral":
        return T.MixtralConfig(**_base(num_local_experts=4, num_experts_per_tok=2, sliding_window=5, head_dim=24))
    if name == "qwen3_moe":  # layer 0 routed, layer 1 dense
        return T.Qwen3MoeConfig(**_base(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                        mlp_only_layers=[1], norm_topk_prob=True, head_dim=24,
                                        use_sliding_window=True, sliding_window=4))
    raise KeyError(name)


@functools.lru_cache(maxsize=None)
def build(name: str, seed: int = 0, vocab: int = VOCAB) -> Any:
    """The transformers model of a case, fp32, eval mode, randomised (cached: treat as read-only)."""
    import transformers as T

    cfg = config(name, vocab)
    torch.manual_seed(seed)
    attn = "eager" if name == "gemma2" else "sdpa"
    model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # larger than the init's values, norms away from their identity, so every term counts
        for key, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in key:
                p.copy_(noise * 0.2 + (0.0 if name.startswith("gemma") else 1.0))
            elif key.endswith("bias"):
                p.copy_(noise * 0.1)
            else:
                p.copy_(noise * 0.08)
    return model


def files(name: str, root: Path) -> tuple[Path, Path]:
    """``(hf_folder, lema_file)``: ``save_pretrained`` (experts per expert, as transformers 5
    writes them) and its conversion by ``lema convert``."""
    from lema.app.tools.convert import prepare_monolithic_safetensors

    folder, path = root / f"{name}-hf", root / f"{name}.safetensors"
    if not path.exists():
        build(name).save_pretrained(folder)
        prepare_monolithic_safetensors(folder, path, device="cpu")
    return folder, path


def batch(seed: int = 0, rows: int = 2, seq: int = 12, padded: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids, and with ``padded`` a mask whose second row is left-padded by 4."""
    ids = torch.randint(3, VOCAB, (rows, seq), generator=torch.Generator().manual_seed(seed))
    if not padded:
        return ids, None
    mask = torch.ones(rows, seq, dtype=torch.long)
    mask[1, :4] = 0
    return ids.masked_fill(mask == 0, 0), mask
