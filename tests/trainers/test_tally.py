"""Learner ranks' parts merge into one typed update: sums over every rank's tokens, the figures under ``learner/``."""

import dataclasses

import pytest

from omnigrpo.trainers.batch import Update
from omnigrpo.trainers.tally import RankUpdate, merge_ranks


def _part(tokens: float, kl: float, loss: float, mismatch: float, dropped: int = 0) -> RankUpdate:
    sums = {"kl": kl, "entropy": 2 * tokens, "clip_frac": 1.0, "tokens": tokens, "mismatch": mismatch, "loss": loss,
            "tis_capped": 0.0}
    return RankUpdate(3, 0.5, sums=sums, dropped=dropped, loss_norm=4.0, grad_norm=0.7, lr=1e-3)


def test_two_ranks_merge_into_one_update_over_all_their_tokens():
    update = merge_ranks([_part(10, 1.0, 1.0, 0.1), _part(30, 3.0, 2.0, 0.3, dropped=1)])
    assert update.version == 3 and not update.skipped and update.nonfinite and update.dropped_micro_batches == 1
    assert update.metrics == pytest.approx({
        "learner/loss": 3.0 / 4.0, "learner/kl": 4.0 / 40, "learner/entropy": 2.0, "learner/clip_frac": 2.0 / 40,
        "learner/grad_norm": 0.7, "learner/lr": 1e-3, "learner/logprob_mismatch": 0.3, "learner/tis_capped_frac": 0.0,
        "learner/staleness": 0.5, "learner/skipped_update": 0.0, "learner/nonfinite": 1.0,
        "learner/dropped_micro_batches": 1.0})


def test_a_non_finite_gradient_norm_marks_the_update_it_still_took():
    part = dataclasses.replace(_part(10, 1.0, 1.0, 0.0), nonfinite=True, grad_norm=float("inf"))
    update = merge_ranks([part])
    assert update.nonfinite and not update.skipped and update.dropped_micro_batches == 0
    assert update.metrics["learner/nonfinite"] == 1.0 and update.metrics["learner/grad_norm"] == float("inf")


def test_a_skipped_update_reports_only_that_it_was_skipped_and_is_frozen():
    update = merge_ranks([RankUpdate(2, 0.0, skipped=True, nonfinite=True)] * 2)
    assert update == Update(2, {"learner/skipped_update": 1.0, "learner/nonfinite": 1.0, "learner/staleness": 0.0},
                            skipped=True, nonfinite=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        update.version = 3
