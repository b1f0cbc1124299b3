"""Preference objectives: DPO, IPO, ORPO, SimPO and KTO, as TRL computes them.

Every objective is a pure function of per-row log-probabilities (:class:`RowLogps`: the
sum of ``log p(token)`` over each row's answer tokens, their count, and for ORPO the
summed log-probabilities and count of every non-padding token of the row) of the trained
model and, for DPO, IPO and KTO, of the reference model. The rows of a paired batch are
``[chosen_0 .. chosen_{n-1}, rejected_0 .. rejected_{n-1}]`` (TRL's concatenated batch); a
KTO batch is ``[completion_0 .. completion_{n-1}, kl_0 .. kl_{n-1}]`` where ``kl_i`` is
prompt ``i`` with a completion of another row (TRL's mismatched pairs, for the KL estimate).

The formulas and defaults are TRL 1.16's (``trl.DPOTrainer``, ``trl.KTOTrainer``,
``trl.experimental.orpo.ORPOTrainer`` and ``trl.experimental.cpo.CPOTrainer``):

* ``dpo``: ``d = (pi_c - ref_c) - (pi_r - ref_r)`` (summed answer log-probs),
  ``loss = -(1 - eps) logsigmoid(beta d) - eps logsigmoid(-beta d)``; with ``eps = 0``
  (default) this is TRL's ``loss_type="sigmoid"``; ``eps > 0`` is conservative DPO
  (TRL < 1.0's ``label_smoothing`` on the sigmoid loss). ``beta = 0.1``.
* ``ipo``: the same log-ratios divided by each row's answer length,
  ``loss = (d_avg - 1 / (2 beta))^2`` (TRL's ``loss_type="ipo"``). ``beta = 0.1``.
* ``orpo``: no reference. ``log_odds = (a_c - a_r) - (log1mexp(a_c) - log1mexp(a_r))`` with
  ``a`` the per-token *average* answer log-prob, ``loss = nll - beta mean(logsigmoid(log_odds))``
  where ``nll`` is the token mean of the chosen rows' cross-entropy over every non-padding
  token (prompt included), pooled over the batch. ``beta = 0.1``.
* ``simpo``: no reference. ``loss = -(1 - eps) logsigmoid(beta (a_c - a_r) - gamma)
  - eps logsigmoid(-(...))`` with ``a`` the average answer log-prob, ``gamma = 0.5``
  (TRL's ``simpo_gamma``), plus ``cpo_alpha * nll`` (default 0: pure SimPO; CPOTrainer's
  own default is 1.0). ``beta = 0.1``.
* ``kto``: ``kl = max(0, mean(pi_kl - ref_kl))`` (no gradient),
  ``loss_i = w_d (1 - sigmoid(beta (r_i - kl)))`` for a desirable row and
  ``w_u (1 - sigmoid(beta (kl - r_i)))`` for an undesirable one, ``r = pi - ref`` summed,
  mean over the rows. ``beta = 0.1``, ``w_d = w_u = 1``.

Logged, with TRL's names: ``loss``, ``rewards/chosen``, ``rewards/rejected``,
``rewards/accuracies`` (paired methods), ``rewards/margins``, ``logps/chosen``,
``logps/rejected`` (ORPO adds ``nll_loss``, ``log_odds_ratio``, ``log_odds_chosen``; KTO ``kl``).
A reward is ``beta`` times the log-ratio to the reference (DPO, IPO, KTO) or ``beta`` times
the average log-prob (ORPO, SimPO).

Example:
    >>> import torch
    >>> obj = PreferenceObjective("dpo", beta=0.1)
    >>> pol = RowLogps(torch.tensor([-3.0, -5.0]), torch.tensor([2.0, 2.0]))
    >>> ref = RowLogps(torch.tensor([-4.0, -4.0]), torch.tensor([2.0, 2.0]))
    >>> out = obj.compute(pol, ref)
    >>> round(float(out.loss), 4), round(out.metrics["rewards/margins"], 4)
    (0.5981, 0.2)
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import attrs
import torch
import torch.nn.functional as F

from lema.domain.model import heads
from lema.domain.nn.matmul import backproject, project
from lema.errors import ConfigError

__all__ = ["METHODS", "PreferenceLoss", "PreferenceObjective", "RowLogps", "token_logps"]

METHODS = ("dpo", "ipo", "orpo", "simpo", "kto")
_REFERENCE = ("dpo", "ipo", "kto")
PAIR_LOGS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
             "logps/chosen", "logps/rejected")


@attrs.frozen
class RowLogps:
    """Per-row log-probabilities of one batch.

    Attributes:
        answer: ``(rows,)`` summed ``log p`` of each row's answer tokens.
        answer_tokens: ``(rows,)`` how many answer tokens each row has (float).
        full: ``(rows,)`` summed ``log p`` of every non-padding target (ORPO's NLL), or None.
        full_tokens: ``(rows,)`` their count, or None.
    """

    answer: torch.Tensor
    answer_tokens: torch.Tensor
    full: torch.Tensor | None = None
    full_tokens: torch.Tensor | None = None

    @property
    def average(self) -> torch.Tensor:
        """Per-token average answer log-prob (TRL's ``average_log_prob=True``)."""
        return self.answer / self.answer_tokens.clamp(min=1.0)


@attrs.frozen
class PreferenceLoss:
    """A batch's mean loss (differentiable) and its metrics (floats, no gradient)."""

    loss: torch.Tensor
    metrics: dict[str, float]


def _finite(name: str, value: Any, low: float | None = None, high: float | None = None) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {value!r} is not a number") from None
    if not math.isfinite(number) or (low is not None and number < low) or (high is not None and number > high):
        span = f" in [{low:g}, {high:g}]" if high is not None else (f" >= {low:g}" if low is not None else "")
        raise ConfigError(f"{name}: {value!r} must be a finite number{span}")
    return number


@attrs.frozen
class PreferenceObjective:
    """A preference objective and its hyperparameters (defaults: TRL's; see the module docstring).

    Args:
        method: ``dpo``, ``ipo``, ``orpo``, ``simpo`` or ``kto``.
        beta: the temperature (DPO/IPO/KTO: the deviation from the reference; ORPO: the
            weight of the odds-ratio term; SimPO: the reward scale).
        label_smoothing: DPO and SimPO: the probability that a preference is flipped (0..0.5).
        simpo_gamma: SimPO's target reward margin.
        cpo_alpha: SimPO: weight of an added NLL term on the chosen rows (0: pure SimPO).
        desirable_weight, undesirable_weight: KTO's weights of the two kinds of rows.

    Raises:
        ConfigError: an unknown method or a hyperparameter out of range.
    """

    method: str = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    cpo_alpha: float = 0.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def __attrs_post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"--method: {self.method!r} is not one of sft, {', '.join(METHODS)}")
        if not _finite("--beta", self.beta) > 0:
            raise ConfigError(f"--beta: {self.beta!r} must be positive")
        _finite("--label-smoothing", self.label_smoothing, 0.0, 0.5)
        if self.label_smoothing >= 0.5:
            raise ConfigError(f"--label-smoothing: {self.label_smoothing!r} must be below 0.5")
        _finite("--simpo-gamma", self.simpo_gamma)
        _finite("--cpo-alpha", self.cpo_alpha, 0.0)
        _finite("--desirable-weight", self.desirable_weight, 0.0)
        _finite("--undesirable-weight", self.undesirable_weight, 0.0)

    @property
    def name(self) -> str:
        return self.method

    @property
    def paired(self) -> bool:
        """Rows come as (chosen, rejected) pairs (all but KTO)."""
        return self.method != "kto"

    @property
    def needs_reference(self) -> bool:
        """Whether the loss needs the reference model's log-probs (DPO, IPO, KTO)."""
        return self.method in _REFERENCE

    @property
    def extra_forward_passes(self) -> int:
        """The reference model's forward (computed in the same streamed pass)."""
        return 1 if self.needs_reference else 0

    @property
    def needs_full(self) -> bool:
        """Whether the loss needs every non-padding token's log-prob (ORPO's NLL, SimPO's cpo_alpha)."""
        return self.method == "orpo" or (self.method == "simpo" and self.cpo_alpha > 0)

    @property
    def logs(self) -> tuple[str, ...]:
        if self.method == "orpo":
            return PAIR_LOGS + ("nll_loss", "log_odds_ratio", "log_odds_chosen")
        if self.method == "kto":
            return tuple(n for n in PAIR_LOGS if n != "rewards/accuracies") + ("kl",)
        return PAIR_LOGS

    def compute(self, policy: RowLogps, reference: RowLogps | None = None,
                desirable: torch.Tensor | None = None) -> PreferenceLoss:
        """The mean loss of a batch and its metrics.

        Args:
            policy: the trained model's row log-probs (with grad).
            reference: the reference model's (no grad); needed by DPO, IPO and KTO.
            desirable: KTO: ``(n,)`` bool, one per completion row (the first half of the rows).
        """
        if self.needs_reference and reference is None:
            raise ConfigError(f"{self.method} needs the reference model's log-probabilities")
        if self.method == "kto":
            if desirable is None:
                raise ConfigError("kto needs each completion's label (desirable or not)")
            return self._kto(policy, reference, desirable)  # type: ignore[arg-type]
        return self._paired(policy, reference)

    def _paired(self, policy: RowLogps, reference: RowLogps | None) -> PreferenceLoss:
        n = policy.answer.shape[0] // 2
        beta, eps = self.beta, self.label_smoothing
        pc, pr = policy.answer[:n], policy.answer[n:]
        extra: dict[str, float] = {}
        nll = None
        if self.needs_full:
            assert policy.full is not None and policy.full_tokens is not None
            nll = -policy.full[:n].sum() / policy.full_tokens[:n].sum().clamp(min=1.0)
        if self.method in ("dpo", "ipo"):
            assert reference is not None
            rc, rr = reference.answer[:n].detach(), reference.answer[n:].detach()
            chosen_ratio, rejected_ratio = pc - rc, pr - rr
            if self.method == "dpo":
                d = chosen_ratio - rejected_ratio
                losses = -F.logsigmoid(beta * d) * (1 - eps) - F.logsigmoid(-beta * d) * eps
            else:
                tokens = policy.answer_tokens.clamp(min=1.0)
                d = chosen_ratio / tokens[:n] - rejected_ratio / tokens[n:]
                losses = (d - 1 / (2 * beta)) ** 2
            loss = losses.mean()
            chosen_rewards, rejected_rewards = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
            logps_c, logps_r = pc, pr
        elif self.method == "orpo":
            assert nll is not None
            ac, ar = policy.average[:n].float(), policy.average[n:].float()
            log_odds = (ac - ar) - (_log1mexp(ac) - _log1mexp(ar))
            ratio = F.logsigmoid(log_odds)
            loss = nll - (beta * ratio).mean()
            chosen_rewards, rejected_rewards = beta * ac.detach(), beta * ar.detach()
            logps_c, logps_r = ac, ar
            extra = {"nll_loss": float(nll.detach()), "log_odds_ratio": float(ratio.detach().mean()),
                     "log_odds_chosen": float(log_odds.detach().mean())}
        else:  # simpo
            ac, ar = policy.average[:n], policy.average[n:]
            logits = (ac - ar) - self.simpo_gamma / beta
            losses = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
            loss = losses.mean() + (self.cpo_alpha * nll if nll is not None else 0.0)
            chosen_rewards, rejected_rewards = beta * ac.detach(), beta * ar.detach()
            logps_c, logps_r = ac, ar
            if nll is not None:
                extra = {"nll_loss": float(nll.detach())}
        metrics = {
            "loss": float(loss.detach()),
            "rewards/chosen": float(chosen_rewards.mean()),
            "rewards/rejected": float(rejected_rewards.mean()),
            "rewards/accuracies": float((chosen_rewards > rejected_rewards).float().mean()),
            "rewards/margins": float((chosen_rewards - rejected_rewards).mean()),
            "logps/chosen": float(logps_c.detach().mean()),
            "logps/rejected": float(logps_r.detach().mean()),
            **extra,
        }
        return PreferenceLoss(loss, metrics)

    def _kto(self, policy: RowLogps, reference: RowLogps, desirable: torch.Tensor) -> PreferenceLoss:
        n = policy.answer.shape[0] // 2
        beta = self.beta
        good = desirable.to(device=policy.answer.device, dtype=torch.bool).reshape(-1)
        if good.shape[0] != n:
            raise ConfigError(f"kto: {good.shape[0]} labels for {n} completion rows")
        kl = (policy.answer[n:].detach() - reference.answer[n:].detach()).mean().clamp(min=0)
        ratio = policy.answer[:n] - reference.answer[:n].detach()
        chosen = ratio[good]
        rejected = ratio[~good]
        losses = torch.cat((self.desirable_weight * (1 - torch.sigmoid(beta * (chosen - kl))),
                            self.undesirable_weight * (1 - torch.sigmoid(beta * (kl - rejected)))))
        loss = losses.nanmean()
        metrics: dict[str, float] = {"loss": float(loss.detach()), "kl": float(kl)}
        logps = policy.answer[:n].detach()
        if chosen.numel():
            metrics["rewards/chosen"] = float(beta * chosen.detach().sum() / chosen.numel())
            metrics["logps/chosen"] = float(logps[good].sum() / chosen.numel())
        if rejected.numel():
            metrics["rewards/rejected"] = float(beta * rejected.detach().sum() / rejected.numel())
            metrics["logps/rejected"] = float(logps[~good].sum() / rejected.numel())
        if chosen.numel() and rejected.numel():
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        return PreferenceLoss(loss, metrics)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable at both ends (TRL's ``log1mexp``)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class _ChunkedTokenLogps(torch.autograd.Function):
    """``log p(target)`` per position of ``h @ W.T``, gradients w.r.t. ``h`` computed chunk by chunk.

    ``log p_t`` depends only on row ``t`` of ``h``, so its gradient ``(onehot - softmax) @ W``
    is kept per row (``h``'s size) and scaled by the incoming per-position gradient in backward.
    """

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                need_h: bool, matmul_dtype: torch.dtype | None, cap: float | None) -> torch.Tensor:
        out = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        for start in range(0, h.shape[0], chunk):
            hc, tc = h[start:start + chunk], targets[start:start + chunk]
            logits = project(hc, weight, matmul_dtype=matmul_dtype)
            capped = (logits if cap is None else torch.tanh(logits / cap) * cap).float()
            del logits
            logp = torch.log_softmax(capped, dim=-1)
            valid = tc != heads.IGNORE_INDEX
            rows = torch.arange(tc.shape[0], device=tc.device)
            picked = logp[rows, tc.clamp(min=0)]
            out[start:start + chunk] = torch.where(valid, picked, torch.zeros_like(picked))
            if grad_h is None:
                del capped, logp  # before the next chunk's logits exist
                continue
            # through the soft-cap: 1 - (capped / c)^2, in place; then at most two (c, V) fp32
            # tensors live at a time, as in lema.domain.model.heads' chunked loss
            slope = None if cap is None else capped.div_(cap).square_().neg_().add_(1.0)
            del capped
            g = logp.exp_().neg_()  # -softmax, in place
            g[rows, tc.clamp(min=0)] += 1.0
            g *= valid[:, None]
            if slope is not None:
                g *= slope
                del slope
            grad_h[start:start + chunk] = backproject(g.to(h.dtype), weight, matmul_dtype=matmul_dtype)
            del g, logp
        if grad_h is not None:
            ctx.save_for_backward(grad_h)
        ctx.need_h = need_h
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        gh = None
        if ctx.need_h:
            (saved,) = ctx.saved_tensors
            gh = saved * grad_out[:, None].to(saved.dtype)
        return gh, None, None, None, None, None, None


def token_logps(spec: Any, head: Mapping[str, torch.Tensor], x: torch.Tensor, targets: torch.Tensor,
                chunk_tokens: int = heads.DEFAULT_CHUNK_TOKENS, matmul_dtype: torch.dtype | None = None
                ) -> torch.Tensor:
    """``(batch, seq)`` float32 ``log p(targets[b, t])`` at each position (0 where ignored).

    Differentiable with respect to ``x`` (not the head's weight: LoRA does not train it);
    one chunk of ``chunk_tokens`` positions' logits exists at a time.

    Raises:
        ConfigError: the head's weight requires grad.
    """
    h = heads.final_norm(spec, head, x)
    flat = h.reshape(-1, h.shape[-1])
    weight = head["lm_head.weight"].to(h.dtype)
    if torch.is_grad_enabled() and weight.requires_grad:
        raise ConfigError("preference objectives train LoRA adapters only, not lm_head")
    need_h = torch.is_grad_enabled() and flat.requires_grad
    out = _ChunkedTokenLogps.apply(flat, weight, targets.reshape(-1).to(flat.device), max(1, int(chunk_tokens)),
                                   need_h, matmul_dtype, heads.logit_softcap(spec))
    return out.reshape(targets.shape)


def row_logps(per_token: torch.Tensor, answer_mask: torch.Tensor, full_mask: torch.Tensor | None = None) -> RowLogps:
    """Sum a ``(batch, seq)`` per-position log-prob tensor into :class:`RowLogps`."""
    answer_mask = answer_mask.to(per_token.device)
    answer = (per_token * answer_mask).sum(dim=1)
    count = answer_mask.sum(dim=1).float()
    if full_mask is None:
        return RowLogps(answer, count)
    full_mask = full_mask.to(per_token.device)
    return RowLogps(answer, count, (per_token * full_mask).sum(dim=1), full_mask.sum(dim=1).float())
