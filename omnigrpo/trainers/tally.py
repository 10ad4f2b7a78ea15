"""What an update measured: per-rank sums during the update, merged over the learner ranks into step metrics.

Why: every learner rank sees only its share of a step's tokens, so it returns sums (never means) and the
driver divides once over the whole batch; the same figures then hold for any number of ranks.
"""

from __future__ import annotations

import torch

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

    def partial(self) -> dict[str, float]:
        """This rank's sums, keyed ``sum/<name>`` for :func:`merge_metrics`."""
        return {f"sum/{k}": v for k, v in self.sums.items()}


def merge_metrics(parts: list[dict[str, float]]) -> dict[str, float]:
    """The step's learner metrics from every rank's ``Learner.train_step`` result."""
    head = parts[0]
    if head["grpo/skipped_update"]:
        return dict(head)
    total = {k: sum(p[k] for p in parts) for k in head if k.startswith("sum/")}
    tokens = max(total["sum/tokens"], 1.0)
    return {
        "loss": total["sum/loss"] / head["loss_norm"],
        "grpo/skipped_update": 0.0,
        # the global gradient norm is the same on every rank; a dropped micro-batch is any rank's
        "grpo/nonfinite": float(bool(head["grpo/nonfinite"] or total["sum/dropped"])),
        "grpo/dropped_micro_batches": total["sum/dropped"],
        "kl": total["sum/kl"] / tokens,
        "entropy": total["sum/entropy"] / tokens,
        "clip_frac": total["sum/clip_frac"] / tokens,
        "grad_norm": head["grad_norm"],  # the global norm: the same on every rank
        "lr": head["lr"],
        "grpo/logprob_mismatch": max(p["sum/mismatch"] for p in parts),
        "grpo/tis_capped_frac": total["sum/tis_capped"] / tokens,
        "async/staleness": head["async/staleness"],
        "version": head["version"],
    }
