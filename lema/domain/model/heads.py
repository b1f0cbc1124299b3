"""The head: final norm, output projection (soft-capped where the family caps its logits)
and a chunked cross-entropy.

:func:`head_loss` never holds the full ``(batch, seq, vocab)`` fp32 logits, neither in the
forward nor in the backward pass: it walks the tokens in chunks, and while computing each
chunk's loss it also computes that chunk's gradient with respect to the hidden states
(``(softmax - onehot) @ W``), keeping only that ``(tokens, hidden)`` gradient for the
backward pass. Peak extra memory is one chunk's logits and probabilities.

Targets are already shifted (``targets[:, t]`` is the token that should follow position
``t``); build them from transformers-style labels with :func:`shift_labels`.

Example:
    >>> import torch
    >>> labels = torch.tensor([[5, 6, 7, -100]])
    >>> shift_labels(labels)
    tensor([[   6,    7, -100, -100]])
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from lema.domain.families import registry
from lema.domain.nn.matmul import backproject, project
from lema.domain.model.spec import ModelSpec

IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 1024


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Targets for next-token prediction: ``targets[:, t] = labels[:, t + 1]``, last = ignored.

    Same shift as transformers' ``ForCausalLMLoss``.
    """
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def final_norm(spec: ModelSpec, weights: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The family's final norm (RMSNorm, Gemma's ``1 + w`` norm, GPT-2's LayerNorm), in ``x``'s dtype."""
    return registry.family(spec.family).final_norm(registry.params_of(spec), weights, x)


def logit_softcap(spec: ModelSpec) -> float | None:
    """The family's final logit soft-cap (Gemma: ``logits = tanh(logits / cap) * cap``), or None."""
    return registry.params_of(spec).final_softcap


def _capped(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return logits if cap is None else torch.tanh(logits / cap) * cap


def head_logits(spec: ModelSpec, weights: Mapping[str, torch.Tensor], x: torch.Tensor,
                matmul_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Logits ``(batch, seq, vocab)`` as float32 (projected and soft-capped in ``x``'s dtype,
    then upcast, like transformers).

    ``matmul_dtype`` computes the projection in a wider dtype (see :mod:`lema.domain.nn.matmul`).
    """
    h = final_norm(spec, weights, x)
    logits = project(h, weights["lm_head.weight"].to(h.dtype), matmul_dtype=matmul_dtype)
    return _capped(logits, logit_softcap(spec)).float()


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``sum(cross_entropy(h @ W.T, targets))`` with gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                need_h: bool, need_w: bool, matmul_dtype: torch.dtype | None, cap: float | None) -> torch.Tensor:
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, h.shape[0], chunk):
            hc, tc = h[start:start + chunk], targets[start:start + chunk]
            logits = _capped(project(hc, weight, matmul_dtype=matmul_dtype), cap).float()
            loss += F.cross_entropy(logits, tc, ignore_index=IGNORE_INDEX, reduction="sum")
            if not (need_h or need_w):
                del logits  # before the next chunk's logits exist
                continue
            # d(sum CE)/d logits = softmax - onehot on counted rows, 0 on ignored rows.
            probs = torch.softmax(logits, dim=-1)
            # through the soft-cap: d(c tanh(z / c))/dz = 1 - (capped / c)^2 (computed in place)
            slope = None if cap is None else logits.div_(cap).square_().neg_().add_(1.0)
            del logits
            valid = tc != IGNORE_INDEX
            probs[torch.arange(tc.shape[0], device=tc.device), tc.clamp(min=0)] -= 1.0
            probs *= valid[:, None]
            if slope is not None:
                probs *= slope
                del slope
            g = probs.to(h.dtype)
            if grad_h is not None:
                grad_h[start:start + chunk] = backproject(g, weight, matmul_dtype=matmul_dtype)
            if grad_w is not None:
                grad_w += (g.t() @ hc).float()
            del probs, g  # one chunk's logits at a time: these go before the next chunk's arrive
        ctx.save_for_backward(*(t for t in (grad_h, grad_w) if t is not None))
        ctx.flags = (need_h, need_w)
        ctx.w_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        saved = list(ctx.saved_tensors)
        need_h, need_w = ctx.flags
        gh = gw = None
        if need_h:
            gh = saved.pop(0)
            gh = gh * grad_out.to(gh.dtype)
        if need_w:
            gw = (saved.pop(0) * grad_out).to(ctx.w_dtype)
        return gh, gw, None, None, None, None, None, None


def head_loss(spec: ModelSpec, weights: Mapping[str, torch.Tensor], x: torch.Tensor, targets: torch.Tensor,
              chunk_tokens: int = DEFAULT_CHUNK_TOKENS, matmul_dtype: torch.dtype | None = None,
              n_tokens: int | None = None) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy and the number of counted tokens.

    ``loss_sum / n_tokens`` equals transformers' ``model(input_ids, labels=labels).loss`` when
    ``targets = shift_labels(labels)``. Differentiable with respect to ``x`` (and
    ``lm_head.weight`` if it requires grad) without keeping any chunk's logits alive.

    Args:
        spec: the model.
        weights: the head unit's tensors (``norm.weight``/``ln_f.*`` and ``lm_head.weight``).
        x: ``(batch, seq, hidden)`` output of the last decoder layer.
        targets: ``(batch, seq)`` shifted targets; ``-100`` is ignored.
        matmul_dtype: compute the products in this wider dtype (see :mod:`lema.domain.nn.matmul`).
        chunk_tokens: tokens per chunk; peak extra memory is about
            ``chunk_tokens * vocab * 8`` bytes (fp32 logits and probabilities).
        n_tokens: the number of targets that are not ``-100``, when the caller counted them on
            the host (a prepared batch does); None counts them here, which reads ``targets``
            (a host wait when they live on a GPU).

    Returns:
        ``(loss_sum, n_tokens)``: a float32 scalar tensor and a Python int.
    """
    h = final_norm(spec, weights, x)
    flat = h.reshape(-1, h.shape[-1])
    weight = weights["lm_head.weight"].to(h.dtype)
    need_h = torch.is_grad_enabled() and flat.requires_grad
    need_w = torch.is_grad_enabled() and weight.requires_grad
    loss = _ChunkedLinearCrossEntropy.apply(flat, weight, targets.reshape(-1).to(flat.device),
                                            max(1, int(chunk_tokens)), need_h, need_w, matmul_dtype,
                                            logit_softcap(spec))
    return loss, int((targets != IGNORE_INDEX).sum()) if n_tokens is None else n_tokens
