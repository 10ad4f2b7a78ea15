"""Hybrid placement on a real local Ray cluster: the learner ranks sample, nothing is synced."""

import numpy as np
import pytest
import torch
from conftest import REFERENCE, TINY, metric_values, policy_weights
from mlflow.tracking import MlflowClient

from omnigrpo.app.driver import train
from omnigrpo.app.tracking import store_uri
from omnigrpo.config.loader import load_config
from omnigrpo.config.schema import Config

pytestmark = pytest.mark.usefixtures("ray_cluster")

STEPS = 12
TWO_RANKS = ("cluster.placement=hybrid", "cluster.learner_workers=2", "trainer.lr=3e-3", "trainer.kl_coef=0.0",
             "rollout.group_size=8", "eval.every=0", "eval.held_out=false", "tracking.image_every=0",
             "rollout.chunks=2", "rewards=[{name: 'red_reward:redness'}]")


@pytest.fixture(scope="module")
def two_ranks_run(_session_ray, sft_path, cache_dir, tmp_path_factory) -> tuple[Config, dict]:
    """``(config, summary)`` of :data:`STEPS` steps of two hybrid ranks trained on redness: a run that learns
    visibly, and the uninterrupted run a resumed one must end at."""
    run_dir = tmp_path_factory.mktemp("two_ranks") / "run"
    cfg = load_config(None, [*TINY, f"run.cache_dir={cache_dir}", f"run.dir={run_dir}", *TWO_RANKS,
                             f"trainer.steps={STEPS}"])
    return cfg, train(cfg)


def test_two_hybrid_ranks_raise_the_reward_without_syncing(two_ranks_run, sft_path):
    cfg, summary = two_ranks_run
    assert summary["rollout_versions"] == [STEPS, STEPS]  # both ranks sampled the last step with the last weights

    reward = metric_values(cfg, summary["run_id"], "reward/total/mean")
    assert len(reward) == STEPS and np.mean(reward[-3:]) > np.mean(reward[:3]) + 0.04, reward
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


def test_a_finished_hybrid_run_continued_matches_an_uninterrupted_one(two_ranks_run, tiny_config):
    """A run that finished at step 6, resumed with ``trainer.steps`` raised: the same MLflow run goes on, every
    step logged once, to the weights of the uninterrupted run."""
    _, straight = two_ranks_run
    first = train(tiny_config(*TWO_RANKS, f"trainer.steps={STEPS // 2}"))
    cfg = tiny_config(*TWO_RANKS, f"trainer.steps={STEPS}", "run.resume=true")
    resumed = train(cfg)
    assert resumed["run_id"] == first["run_id"] and resumed["rollout_versions"] == [STEPS, STEPS]
    a, b = policy_weights(straight["checkpoint"]), policy_weights(resumed["checkpoint"])
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(not torch.equal(a[k], policy_weights(first["checkpoint"])[k]) for k in a)
    client = MlflowClient(store_uri(cfg.tracking, cfg.run.dir))
    assert sorted(m.step for m in client.get_metric_history(first["run_id"], "reward/total/mean")) == list(
        range(1, STEPS + 1))
    assert client.get_run(first["run_id"]).info.status == "FINISHED"
