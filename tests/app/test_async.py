"""Asynchronous rollout with a fixed lag (``trainer.max_staleness``) on a real local Ray cluster."""

import numpy as np
import pytest
import torch
from conftest import TINY, metric_values, policy_weights

from omnigrpo.app import driver
from omnigrpo.app.driver import train
from omnigrpo.config.loader import ConfigError, load_config
from omnigrpo.config.schema import Config

STEPS = 10
LAG = ("cluster.placement=split", "trainer.max_staleness=2", "trainer.lr=3e-3", "trainer.kl_coef=0.0",
       "rollout.group_size=8", "eval.every=0", "eval.held_out=false", "tracking.image_every=0",
       "rewards=[{name: 'red_reward:redness'}]")


@pytest.fixture(scope="module")
def lag_run(_session_ray, sft_path, cache_dir, tmp_path_factory) -> tuple[Config, dict]:
    """``(config, summary)`` of :data:`STEPS` steps with a lag of two, trained on redness: a run that learns
    visibly, and the uninterrupted run a stopped and resumed one must end at."""
    run_dir = tmp_path_factory.mktemp("lag") / "run"
    cfg = load_config(None, [*TINY, f"run.cache_dir={cache_dir}", f"run.dir={run_dir}", *LAG, f"trainer.steps={STEPS}"])
    return cfg, train(cfg)


@pytest.mark.usefixtures("ray_cluster")
def test_a_lag_of_two_draws_every_batch_two_updates_behind_and_learns(lag_run, sft_path):
    cfg, summary = lag_run
    assert summary["rollout_versions"] == [STEPS]
    # batch s is drawn with the weights of step max(0, s - 3): the learner sees each 0, 1, then 2 updates old
    staleness = metric_values(cfg, summary["run_id"], "learner/staleness")
    assert staleness == [0.0, 1.0] + [2.0] * (STEPS - 2), staleness
    # the behaviour correction is on (tis_cap unset -> 2.0) and the ratio starts at the learner's policy
    assert all(0.0 <= v < 1.0 for v in metric_values(cfg, summary["run_id"], "learner/tis_capped_frac"))
    reward = metric_values(cfg, summary["run_id"], "reward/total/mean")
    assert np.mean(reward[-3:]) > np.mean(reward[:3]) + 0.04, reward
    start, final = policy_weights(sft_path), policy_weights(summary["checkpoint"])
    assert any(not torch.equal(start[k], final[k]) for k in start)


@pytest.mark.usefixtures("ray_cluster")
def test_a_stopped_async_run_resumes_with_its_batches_drawn_ahead(lag_run, tiny_config, monkeypatch):
    """The two batches drawn ahead at the stop go into the run state: the resumed run trains on them, not on fresh
    ones drawn with newer weights, and ends with the weights of an uninterrupted run."""
    _, straight = lag_run
    after_step = driver.Loop.after_step

    def stop_after_five(self, step):
        after_step(self, step)
        if step == STEPS // 2:
            driver.STOP.set()

    monkeypatch.setattr(driver.Loop, "after_step", stop_after_five)
    cut = train(tiny_config(*LAG, f"trainer.steps={STEPS}"))
    assert cut["stopped_at"] == STEPS // 2
    monkeypatch.setattr(driver.Loop, "after_step", after_step)
    cfg = tiny_config(*LAG, f"trainer.steps={STEPS}", "run.resume=true")
    resumed = train(cfg)

    a, b = policy_weights(straight["checkpoint"]), policy_weights(resumed["checkpoint"])
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert metric_values(cfg, resumed["run_id"], "learner/staleness") == [0.0, 1.0] + [2.0] * (STEPS - 2)


@pytest.mark.parametrize(("overrides", "recompute", "cap"), [
    ((), False, 0.0),
    (("trainer.max_staleness=1",), True, 2.0),
    (("trainer.max_staleness=1", "trainer.tis_cap=0"), True, 0.0),
    (("trainer.max_staleness=1", "trainer.old_logprobs=sampler", "trainer.tis_cap=0"), False, 0.0),
    (("trainer.old_logprobs=learner", "trainer.tis_cap=3"), True, 3.0),
])
def test_the_correction_resolves_from_the_lag(overrides, recompute, cap):
    tr = load_config(None, list(overrides)).trainer
    assert (tr.recompute_old, tr.resolved_tis_cap) == (recompute, cap)


def test_async_rollout_needs_rollout_actors_and_a_cap_needs_recomputed_log_probs():
    with pytest.raises(ConfigError, match="trainer.max_staleness: 1 needs rollout actors"):
        load_config(None, ["trainer.max_staleness=1", "cluster.placement=hybrid"])
    with pytest.raises(ConfigError, match="trainer.tis_cap: 2 needs trainer.old_logprobs: learner"):
        load_config(None, ["trainer.max_staleness=1", "trainer.old_logprobs=sampler"])
