"""The GRPO objective as pure tensor functions: group advantages, clipped surrogate, k3 KL, aggregation.

Why: this is the math every result depends on, so it lives apart from DeepSpeed, Ray, models and any shaping of
the rewards (``omnigrpo.app.shaping``), where tests can check it against hand-computed values. Per token the loss
is ``-min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * k3``, ``ratio = exp(logp - old_logp)``,
``k3 = exp(ref - logp) - (ref - logp) - 1``, optionally weighted by truncated importance sampling (``tis_cap``);
token-mean averages over every valid token of the batch, seq-mean within each image first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omnigrpo.rollout.sampler import LOGPROB_FLOOR


@dataclass(frozen=True)
class Advantages:
    """A step's advantages and how many groups carried no signal."""

    values: torch.Tensor
    """``[N]`` float32 advantages, 0 for excluded samples and groups without spread."""
    zero_std_frac: float
    """Fraction of groups whose valid totals have no spread (no learning signal)."""


def advantages(rewards: torch.Tensor, group_size: int, valid: torch.Tensor, scale: bool = True, eps: float = 1e-6
               ) -> Advantages:
    """``(r - mean) / (std + eps)`` within each group of ``group_size`` contiguous samples (one prompt's), over its
    valid samples only; ``r - mean`` without ``scale`` (Dr.GRPO); std unbiased, as TRL's. Excluded samples, and
    groups with fewer than two valid samples or no spread, get 0.

    Args:
        rewards: ``[N]`` totals (any value, even NaN, where ``valid`` is False); N = G * group_size.
        valid: ``[N]`` bool, False for excluded samples (a required reward failed).
    """
    if len(rewards) % group_size:
        raise ValueError(f"{len(rewards)} rewards do not split into groups of {group_size}")
    ok = valid.bool().view(-1, group_size)
    r = torch.where(ok, rewards.float().view(-1, group_size), torch.nan)  # [G, k]
    n = ok.sum(1, keepdim=True)
    full = n == group_size  # all valid: torch's own mean and std, bit for bit as a loop over groups
    mean = torch.where(full, r.mean(1, keepdim=True), r.nanmean(1, keepdim=True))
    std = torch.where(full, r.std(1, keepdim=True), ((r - mean) ** 2).nansum(1, keepdim=True).div(n - 1).sqrt())
    spread = torch.where(ok, r, -torch.inf).amax(1, keepdim=True) > torch.where(ok, r, torch.inf).amin(1, keepdim=True)
    signal = spread & (n >= 2)
    adv = (r - mean) / (std + eps) if scale else r - mean
    return Advantages(torch.where(ok & signal, adv, 0.0).flatten(), int((~signal).sum()) / max(len(signal), 1))


@dataclass(frozen=True)
class LossTerms:
    """Per-token pieces of the GRPO loss, all ``[B, T]``."""

    loss: torch.Tensor
    kl: torch.Tensor
    ratio: torch.Tensor
    clipped: torch.Tensor


def grpo_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps_low: float,
    clip_eps_high: float,
    kl_coef: float,
    kl_weights: torch.Tensor | None = None,
) -> LossTerms:
    """Clipped surrogate plus k3 KL, per token.

    Args:
        logp, old_logp, ref_logp: ``[B, T]`` log-probs under the current, sampling and reference policy.
        advantages: ``[B]``.
        kl_weights: ``[B]`` per-sample weights of the KL term (``trainer.kl_uncertain_frac``); None: 1 for all.
            ``LossTerms.kl`` stays unweighted.
    """
    adv = advantages[:, None]
    ratio = torch.exp(logp - old_logp)
    clipped_ratio = ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    surrogate = torch.minimum(ratio * adv, clipped_ratio * adv)
    # A floored token (filtered out of the current policy's support) has no gradient and no
    # meaningful KL estimate; exp(ref + 30) would swamp the loss and the logged KL, so it counts 0.
    delta = torch.where(logp > LOGPROB_FLOOR, ref_logp - logp, torch.zeros_like(logp))
    kl = torch.exp(delta) - delta - 1.0
    clipped = ((ratio < 1.0 - clip_eps_low) & (adv < 0)) | ((ratio > 1.0 + clip_eps_high) & (adv > 0))
    penalty = kl if kl_weights is None else kl_weights.to(kl.dtype)[:, None] * kl
    return LossTerms(loss=-surrogate + kl_coef * penalty, kl=kl, ratio=ratio, clipped=clipped)


def tis_weights(proximal: torch.Tensor, sampler: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated importance sampling (TIS): per-token weights ``min(exp(proximal - sampler), cap)`` ``[B, T]`` (no
    gradient) and where the cap bit: the correction from the sampler's distribution to the learner's.

    >>> w, capped = tis_weights(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, -5.0]]), 2.0)
    >>> w.tolist(), capped.tolist()
    ([[1.0, 2.0]], [[False, True]])
    """
    raw = torch.exp((proximal - sampler).detach())
    return raw.clamp(max=cap), raw > cap


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, normaliser: float) -> torch.Tensor:
    """Sum a micro-batch's share of the mini-batch loss.

    ``normaliser`` is counted over the whole mini-batch, so summing the micro-batch results gives the
    exact mini-batch mean: valid tokens for ``token-mean``, valid sequences for ``seq-mean``.

    Args:
        per_token: ``[B, T]``; mask: ``[B, T]`` (1 for tokens that count).
    """
    mask = mask.to(per_token.dtype)
    if mode == "token-mean":
        return (per_token * mask).sum() / normaliser
    if mode == "seq-mean":
        per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)
        return per_seq.sum() / normaliser
    raise ValueError(f"unknown loss aggregation {mode!r}")


def normaliser(mask: torch.Tensor, mode: str) -> float:
    """Valid tokens (token-mean) or valid sequences (seq-mean) of a mini-batch mask ``[B, T]``; >= 1."""
    count = mask.sum() if mode == "token-mean" else (mask.sum(-1) > 0).sum()
    return max(float(count), 1.0)


def nonfinite_inputs(advantages: torch.Tensor, old_logprobs: torch.Tensor, valid: torch.Tensor) -> str:
    """Which input of an update is not finite in float32 on a valid sample (``""`` when none): advantages ``[N]``,
    the sampler's log-probs ``[N, T]``. Either makes the loss and every gradient non-finite, and the optimiser
    would then move (or silently not move) the weights; the learner skips such an update and counts it."""
    rows = valid.bool()
    bad = [name for name, x in (("advantages", advantages), ("sampler log-probs", old_logprobs))
           if not bool(torch.isfinite(x[rows].float()).all())]
    return " and ".join(bad)


def zero_gradient_loss(logp: torch.Tensor) -> torch.Tensor:
    """A loss of 0 whose gradient is exactly 0 for every parameter, built on ``logp`` ``[B, T]``: it stands in
    for a micro-batch whose loss is not finite, so every rank still runs its backward and optimiser step (the
    gradient all-reduce and DeepSpeed's accumulation count stay in step) and no NaN reaches the weights.
    ``nan_to_num``'s gradient is 0 where its input is not finite."""
    return (logp.nan_to_num(0.0, 0.0, 0.0) * 0.0).sum()
