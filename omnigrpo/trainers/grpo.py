"""The GRPO objective as pure tensor functions: group advantages, clipped surrogate, k3 KL, aggregation.

Why: this is the math every result depends on, so it lives apart from DeepSpeed, Ray and models, where tests can
check it against hand-computed values. Advantages are ``(r - mean_g) / (std_g + eps)`` over a group's valid samples
(without the scale: Dr.GRPO; optionally with a baseline per look, ``strata``); the per-token loss is
``-min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * k3``, optionally weighted by truncated
importance sampling, then averaged per token or per sequence (docs/design.md, "The GRPO step").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omnigrpo.rollout.sampler import LOGPROB_FLOOR


@dataclass(frozen=True)
class Advantages:
    """A step's advantages and what went into them."""

    values: torch.Tensor
    """``[N]`` float32 advantages, 0 for excluded samples and groups without spread."""
    zero_std_frac: float
    """Fraction of groups whose valid totals have no spread (no learning signal)."""
    bonus: torch.Tensor
    """``[N]`` float64 diversity bonus added to each sample's total (0 where none was paid)."""


def advantages(rewards: torch.Tensor, group_size: int, valid: torch.Tensor, scale: bool = True, bonus: float = 0.0,
               distances: torch.Tensor | None = None, eps: float = 1e-6, strata: torch.Tensor | None = None
               ) -> Advantages:
    """Group-normalised advantages of contiguous groups of ``group_size`` samples, with the diversity bonus.

    Args:
        rewards: ``[N]`` total rewards (any value, even NaN, where ``valid`` is False); N = G * group_size.
        valid: ``[N]`` bool, False for excluded samples.
        bonus: ``trainer.diversity_bonus``: each *good* sample (valid, total at or above its group's mean valid
            total) gains ``bonus`` times its mean distance to the group's other good samples; gated because
            variety only counts where the image does what was asked.
        distances: ``[N, N]`` distances between the samples (needed when ``bonus`` > 0; only the blocks within
            a group are read).
        strata: ``[N]`` long look labels (``trainer.baseline_by``), -1 where a sample has none.
    """
    if len(rewards) % group_size:
        raise ValueError(f"{len(rewards)} rewards do not split into groups of {group_size}")
    r = rewards.double().view(-1, group_size)
    ok = valid.bool().view(-1, group_size)
    paid = torch.zeros_like(r)
    if bonus:
        paid = bonus * _spread_among_good(r, ok, _within_groups(distances, group_size))
    totals = torch.where(ok, r + paid, 0.0).float()
    n = ok.sum(1, keepdim=True)
    masked = torch.where(ok, totals, torch.nan)
    full = n == group_size  # the usual case: torch's own mean and std, as a per-group loop would compute them
    centred = masked - torch.where(full, totals.mean(1, keepdim=True), torch.nanmean(masked, 1, keepdim=True))
    std = torch.where(full, totals.std(1, keepdim=True),
                      torch.sqrt(torch.nansum(centred**2, 1, keepdim=True) / (n - 1).clamp_min(1)))
    spread = torch.where(ok, totals, -torch.inf).amax(1, keepdim=True) > torch.where(ok, totals, torch.inf).amin(
        1, keepdim=True)
    signal = spread & (n >= 2)
    alone = torch.zeros_like(ok)
    if strata is not None:
        centred, alone = _centred_by_stratum(totals, ok, strata.view(-1, group_size), centred)
    adv = centred / (std + eps) if scale else centred
    values = torch.where(ok & signal & ~alone, adv, 0.0).flatten()
    return Advantages(values, int((~signal).sum()) / max(len(signal), 1), paid.flatten())


def _centred_by_stratum(totals: torch.Tensor, ok: torch.Tensor, labels: torch.Tensor, centred: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``[G, k]`` totals centred on the mean of their valid siblings of the same label (labelled samples; -1 keeps
    ``centred``), and which labelled samples are the only valid one of their label in their group."""
    alone = torch.zeros_like(ok)
    for label in labels.unique().tolist():
        if label < 0:
            continue
        member = ok & (labels == label)
        count = member.sum(1, keepdim=True)
        mean = torch.where(member, totals, 0.0).sum(1, keepdim=True) / count.clamp_min(1)
        centred = torch.where(member, totals - mean, centred)
        alone |= member & (count < 2)
    return centred, alone


def _within_groups(d: torch.Tensor, k: int) -> torch.Tensor:
    """The diagonal blocks ``[G, k, k]`` of a distance matrix ``[G * k, G * k]``."""
    g = d.shape[0] // k
    return d.view(g, k, g, k).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def _spread_among_good(r: torch.Tensor, ok: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``[G, k]``: each good sample's mean distance to its group's other good samples (0 without any, and for
    samples that are not good)."""
    mean = torch.nanmean(torch.where(ok, r, torch.nan), 1, keepdim=True)
    good = ok & (r >= mean - 1e-9)
    siblings = good[:, None, :] & ~torch.eye(r.shape[1], dtype=torch.bool)
    counts = siblings.sum(-1)
    spread = (blocks.double() * siblings).sum(-1) / counts.clamp_min(1)
    return torch.where(good & (counts > 0), spread, 0.0)


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
) -> LossTerms:
    """Clipped surrogate plus k3 KL, per token.

    Args:
        logp, old_logp, ref_logp: ``[B, T]`` log-probs under the current, sampling and reference policy.
        advantages: ``[B]``.
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
    return LossTerms(loss=-surrogate + kl_coef * kl, kl=kl, ratio=ratio, clipped=clipped)


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
