"""What an update measured: per-rank sums during the update, merged over the learner ranks into step metrics.

Why: every learner rank sees only its share of a step's tokens, so it returns sums (never means) and the
driver divides once over the whole batch; the same figures then hold for any number of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from omnigrpo.trainers.batch import METRIC_PREFIX, Update
from omnigrpo.trainers.grpo import LossTerms

SUMS = ("kl", "entropy", "clip_frac", "tokens", "mismatch", "loss", "tis_capped")
"""The per-rank sums (``mismatch`` is a maximum)."""


class UpdateTally:
    """Sums over the valid tokens of an update's first epoch (later epochs revisit the same tokens)."""

    def __init__(self):
        self.sums = dict.fromkeys(SUMS, 0.0)

    @torch.no_grad()
    def add(self, terms: LossTerms, logp: torch.Tensor, entropy: torch.Tensor, capped: torch.Tensor,
            mask: torch.Tensor, loss: float, drawn: torch.Tensor | None) -> None:
        """One micro-batch: its per-token ``terms``, log-probs ``logp``, ``entropy`` and TIS ``capped`` ``[B, T]``
        over ``mask`` ``[B, T]``, its share of the mini-batch ``loss``, and (before the first optimiser step, where
        the learner holds the weights the batch was drawn with) the sampler's log-probs ``drawn`` ``[B, T]``."""
        s = self.sums
        s["kl"] += float((terms.kl * mask).sum())
        s["entropy"] += float((entropy * mask).sum())
        s["clip_frac"] += float((terms.clipped.float() * mask).sum())
        s["tis_capped"] += float((capped.float() * mask).sum())
        if drawn is not None:
            s["mismatch"] = max(s["mismatch"], float(((logp - drawn).abs() * mask).max()))
        s["tokens"] += float(mask.sum())
        s["loss"] += loss


@dataclass(frozen=True)
class RankUpdate:
    """One learner rank's part of an update, for :func:`merge_ranks`: the version it left, the mean staleness of
    the batch, and (unless ``skipped``) this rank's :class:`UpdateTally` sums, its micro-batches ``dropped`` for a
    non-finite loss, and what every rank shares: the loss normaliser, the global gradient norm, the learning
    rate. ``nonfinite``: a non-finite input (with ``skipped``) or gradient norm. ``ref_refreshes``: the KL
    reference's refreshes so far (None: ``trainer.ref_refresh_*`` off, not logged)."""

    version: int
    staleness: float
    skipped: bool = False
    nonfinite: bool = False
    sums: dict[str, float] = field(default_factory=dict)
    dropped: int = 0
    loss_norm: float = 1.0
    grad_norm: float = 0.0
    lr: float = 0.0
    ref_refreshes: int | None = None


def mean_kl(kl_sums: list[float], token_sums: list[float]) -> float:
    """``learner/kl`` from every rank's KL and token sums, in rank order: the learners decide a refresh of the
    reference on exactly the figure logged."""
    return sum(kl_sums) / max(sum(token_sums), 1.0)


def merge_ranks(parts: list[RankUpdate]) -> Update:
    """The step's update from every rank's ``Learner.train_step`` part."""
    head = parts[0]
    refreshes = {} if head.ref_refreshes is None else {"ref_refreshes": float(head.ref_refreshes)}
    if head.skipped:
        metrics = {"skipped_update": 1.0, "nonfinite": float(head.nonfinite), "staleness": head.staleness}
        return Update(head.version, _named(metrics | refreshes), skipped=True, nonfinite=head.nonfinite)
    total = {k: sum(p.sums[k] for p in parts) for k in SUMS}
    tokens = max(total["tokens"], 1.0)
    dropped = sum(p.dropped for p in parts)
    # the global gradient norm is the same on every rank; a dropped micro-batch is any rank's
    nonfinite = head.nonfinite or dropped > 0
    metrics = {
        "loss": total["loss"] / head.loss_norm,
        "skipped_update": 0.0,
        "nonfinite": float(nonfinite),
        "dropped_micro_batches": float(dropped),
        "kl": mean_kl([p.sums["kl"] for p in parts], [p.sums["tokens"] for p in parts]),
        "entropy": total["entropy"] / tokens,
        "clip_frac": total["clip_frac"] / tokens,
        "grad_norm": head.grad_norm,
        "lr": head.lr,
        "logprob_mismatch": max(p.sums["mismatch"] for p in parts),
        "tis_capped_frac": total["tis_capped"] / tokens,
        "staleness": head.staleness,
        **refreshes,
    }
    return Update(head.version, _named(metrics), nonfinite=nonfinite, dropped_micro_batches=dropped)


def _named(metrics: dict[str, float]) -> dict[str, float]:
    return {METRIC_PREFIX + k: v for k, v in metrics.items()}
