"""The GRPO objective as pure tensor functions: group advantages, clipped surrogate, k3 KL, aggregation.

Why: this is the math every result depends on, so it lives apart from DeepSpeed, Ray and models,
where tests can check it against hand-computed values.

- Advantage of sample i in group g: ``(r_i - mean_g) / (std_g + eps)``; with ``scale=False`` only
  ``r_i - mean_g`` (Dr.GRPO). Statistics use only the group's *valid* samples (a sample whose
  required reward failed is excluded and gets advantage 0 and no loss); ``std`` is the unbiased
  sample std (as TRL). A group with fewer than two valid samples carries no signal: advantage 0.
- Per token: ``-min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * k3``, with
  ``ratio = exp(logp - old_logp)`` and ``k3 = exp(ref - logp) - (ref - logp) - 1``.
- Optionally (``trainer.tis_cap``) each token's loss is weighted by ``min(exp(old - sampler), cap)``: the
  learner's recomputed old log-probs against the sampler's (truncated importance sampling).
- token-mean averages over every valid token of the batch (long images weigh more); seq-mean
  averages within each image, then over images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omnigrpo.rollout.sampler import LOGPROB_FLOOR


def group_advantages(
    rewards: torch.Tensor, group: torch.Tensor, valid: torch.Tensor, scale: bool = True, eps: float = 1e-6
) -> tuple[torch.Tensor, float]:
    """Group-normalised advantages.

    Args:
        rewards: ``[N]`` total rewards (any value where ``valid`` is False).
        group: ``[N]`` group index of each sample (0 .. G-1).
        valid: ``[N]`` bool, False for excluded samples.

    Returns:
        advantages ``[N]`` (0 where invalid) and the fraction of groups whose valid rewards have zero
        spread (no learning signal).
    """
    adv = torch.zeros_like(rewards, dtype=torch.float32)
    groups = torch.unique(group)
    flat = 0
    for g in groups:
        idx = (group == g) & valid
        r = rewards[idx].float()
        if r.numel() < 2 or torch.all(r == r[0]):
            flat += 1
            continue
        centred = r - r.mean()
        adv[idx] = centred / (r.std() + eps) if scale else centred
    return adv, flat / max(len(groups), 1)


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


def truncated_importance_weights(proximal: torch.Tensor, behaviour: torch.Tensor,
                                 cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token weights ``min(exp(proximal - behaviour), cap)`` ``[B, T]`` (no gradient) and where the cap
    bit: the correction from the sampler's distribution (``behaviour``) to the learner's (``proximal``).

    >>> w, capped = truncated_importance_weights(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, -5.0]]), 2.0)
    >>> w.tolist(), capped.tolist()
    ([[1.0, 2.0]], [[False, True]])
    """
    raw = torch.exp((proximal - behaviour).detach())
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
