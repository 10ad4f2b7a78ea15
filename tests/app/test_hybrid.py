"""Hybrid placement on a real local Ray cluster: the learner ranks sample, nothing is synced."""

import numpy as np
import pytest
import torch
from conftest import REFERENCE, metric_values, policy_weights

from omnigrpo.app.driver import train

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_two_hybrid_ranks_raise_the_reward_without_syncing(tiny_config, sft_path):
    steps = 12
    cfg = tiny_config("cluster.placement=hybrid", "cluster.learner_workers=2", "trainer.lr=3e-3",
                      "trainer.kl_coef=0.0", "rollout.group_size=8", f"trainer.steps={steps}", "eval.every=0",
                      "eval.held_out=false", "tracking.image_every=0", "rollout.chunks=2",
                      "rewards=[{name: 'red_reward:redness'}]")
    summary = train(cfg)
    assert summary["rollout_versions"] == [steps, steps]  # both ranks sampled the last step with the last weights

    reward = metric_values(cfg, summary["run_id"], "reward/total/mean")
    assert len(reward) == steps and np.mean(reward[-3:]) > np.mean(reward[:3]) + 0.04, reward
    assert max(metric_values(cfg, summary["run_id"], "learner/logprob_mismatch")) < 1e-4  # sampler = learner weights
    assert set(metric_values(cfg, summary["run_id"], "sync/bytes")) == {0.0}
    assert set(metric_values(cfg, summary["run_id"], "sync/broadcast")) == {0.0}
    start, final = policy_weights(sft_path), policy_weights(summary["checkpoint"])
    assert any(not torch.equal(start[k], final[k]) for k in start)


def test_one_hybrid_rank_trains_as_a_colocated_run(tiny_config, reference_run):
    # the same seeds and weights: the learner sampling its own weights draws what a synced rollout actor draws
    colocated, a = reference_run
    hybrid = tiny_config(*REFERENCE, "cluster.placement=hybrid")
    b = train(hybrid)
    assert b["rollout_versions"] == [4]
    wa, wb = policy_weights(a["checkpoint"]), policy_weights(b["checkpoint"])
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    assert metric_values(hybrid, b["run_id"], "reward/total/mean") == pytest.approx(
        metric_values(colocated, a["run_id"], "reward/total/mean"), abs=1e-6)
    assert set(metric_values(hybrid, b["run_id"], "sync/bytes")) == {0.0}
    assert min(metric_values(colocated, a["run_id"], "sync/bytes")) > 0
    assert b["after"]["eval/reward_mean"] == pytest.approx(a["after"]["eval/reward_mean"], abs=1e-6)


def test_a_resumed_hybrid_run_matches_an_uninterrupted_one(tiny_config, sft_path, tmp_path):
    common = ("cluster.placement=hybrid", "cluster.learner_workers=2", "trainer.lr=3e-3", "eval.every=0",
              "eval.held_out=false", "tracking.image_every=0", "rollout.top_k=30")
    straight = train(tiny_config(*common, "trainer.steps=4", f"run.dir={tmp_path / 'straight'}"))
    first = train(tiny_config(*common, "trainer.steps=2", f"run.dir={tmp_path / 'cut'}"))
    resumed = train(tiny_config(*common, "trainer.steps=4", f"run.dir={tmp_path / 'cut'}", "run.resume=true"))
    assert resumed["run_id"] == first["run_id"] and resumed["rollout_versions"] == [4, 4]
    a, b = policy_weights(straight["checkpoint"]), policy_weights(resumed["checkpoint"])
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(not torch.equal(a[k], policy_weights(first["checkpoint"])[k]) for k in a)
