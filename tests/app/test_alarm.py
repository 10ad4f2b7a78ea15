"""The collapse alarm on synthetic curves, and on a real run that games its judge."""

import numpy as np
import pytest
import torch
from conftest import policy_weights
from mlflow.tracking import MlflowClient

from omnigrpo.app.alarm import CollapseAlarm, slope
from omnigrpo.app.driver import train
from omnigrpo.app.tracking import store_uri
from omnigrpo.config.loader import load_config

WATCHED = ["rewards=[{name: shapes}, {name: shapes, alias: w, watch: true, weight: 0}]"]


def _feed(alarm, rows):
    return [alarm.observe(row) for row in rows]


def test_collapse_is_raised_once_when_group_diversity_halves():
    cfg = load_config(None, ["alarm.window=3", "alarm.diversity_share=0.5", *WATCHED])
    alarm = CollapseAlarm(cfg.alarm, cfg.rewards)
    flat = {"reward/total/mean": 1.0, "reward/w/mean": 1.0}
    raised = _feed(alarm, [{**flat, "diversity/group": d} for d in [0.2, 0.2, 0.2, 0.15, 0.1, 0.1, 0.05, 0.05]])
    # windows of 3: first mean 0.2; the last-3 mean drops to 0.083 (< 0.1) at the 7th step, not before
    assert [bool(r) for r in raised] == [False] * 6 + [True, False]
    assert "collapse" in raised[6] and alarm.raised == ["collapse"]


def test_a_falling_watchdog_under_a_rising_reward_is_raised():
    cfg = load_config(None, ["alarm.window=4", "alarm.diversity_share=0", *WATCHED])
    alarm = CollapseAlarm(cfg.alarm, cfg.rewards)
    rows = [{"reward/total/mean": 0.5 + 0.1 * i, "reward/w/mean": w, "diversity/group": 0.1}
            for i, w in enumerate([0.5, 0.6, 0.6, 0.7, 0.6, 0.5, 0.4])]
    raised = _feed(alarm, rows)
    # slopes of the watchdog over windows of 4: +0.06 (steps 1-4), 0 (2-5), -0.07 (3-6), -0.1 (4-7)
    assert [bool(r) for r in raised] == [False, False, False, False, False, True, False]
    assert list(raised[5]) == ["watchdog_w"]
    assert slope([0.6, 0.7, 0.6, 0.5]) == pytest.approx(-0.04)


def test_the_alarm_history_survives_a_resume():
    cfg = load_config(None, ["alarm.window=2", *WATCHED])
    alarm = CollapseAlarm(cfg.alarm, cfg.rewards)
    _feed(alarm, [{"diversity/group": 0.2, "reward/total/mean": 1.0, "reward/w/mean": 1.0}] * 3)
    again = CollapseAlarm(cfg.alarm, cfg.rewards)
    again.restore(alarm.state())
    assert again.history == alarm.history and again.raised == alarm.raised


@pytest.mark.usefixtures("ray_cluster")
def test_a_lora_run_gaming_its_judge_raises_the_watchdog_alarm_stops_and_resumes_exactly(tiny_config, sft_path,
                                                                                         plugins, tmp_path):
    """Trained on redness, watched by one minus redness: as the reward rises the watchdog falls, the alarm is
    logged (metric and tag) and the run stops with a resumable checkpoint. Resumed, it goes on (the alarm, already
    raised, is not raised again) to the weights of an uninterrupted run: a LoRA run, whose checkpoints hold merged
    weights, so resuming must not apply the adapters twice."""
    steps = 16
    common = ("trainer.lr=3e-3", "trainer.kl_coef=0.0", "rollout.group_size=8", "eval.every=0",
              "eval.held_out=false", "tracking.image_every=0", "alarm.window=4", "trainer.diversity_bonus=0.1",
              "trainer.lora_rank=4", "rewards=[{name: 'red_reward:redness'}, {name: 'red_reward:not_red', "
              "alias: not_red, watch: true, weight: 0}]")
    cfg = tiny_config(*common, f"trainer.steps={steps}", "alarm.stop=true")
    summary = train(cfg)
    assert 4 <= summary["stopped_at"] < steps
    client = MlflowClient(store_uri(cfg.tracking, cfg.run.dir))
    run = client.get_run(summary["run_id"])
    assert "alarm/watchdog_not_red" in run.data.tags and run.info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(summary["run_id"], "alarm/watchdog_not_red")] == [
        summary["stopped_at"]]
    assert {"diversity/group", "diversity/batch", "reward/not_red/mean"} <= set(run.data.metrics)
    assert run.data.metrics["diversity/bonus_mean"] > 0  # the remedy's bonus, not part of the logged total
    total = [m.value for m in client.get_metric_history(summary["run_id"], "reward/total/mean")]
    watch = [m.value for m in client.get_metric_history(summary["run_id"], "reward/not_red/mean")]
    assert np.allclose(np.add(total, watch), 1.0)  # the watchdog is logged, never part of the total

    more = summary["stopped_at"] + 2
    resumed = train(tiny_config(*common, f"trainer.steps={more}", "alarm.stop=true", "run.resume=true"))
    assert resumed["run_id"] == summary["run_id"] and "stopped_at" not in resumed
    assert resumed["rollout_versions"] == [more]
    straight = train(tiny_config(*common, f"trainer.steps={more}", f"run.dir={tmp_path / 'straight'}"))
    a, b = policy_weights(straight["checkpoint"]), policy_weights(resumed["checkpoint"])
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(not torch.equal(a[k], policy_weights(summary["checkpoint"])[k]) for k in a)  # it did train on
