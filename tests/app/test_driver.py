"""A whole run on a real local Ray cluster: DeepSpeed learner, weight sync, MLflow store; judges that fail."""

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, leftovers
from mlflow.tracking import MlflowClient

from omnigrpo.app.driver import train
from omnigrpo.app.failure import RunFailed
from omnigrpo.app.tracking import store_uri
from omnigrpo.cli import main
from omnigrpo.config.loader import ConfigError
from omnigrpo.rollout.families.builtin import WorldPolicy
from omnigrpo.trainers.checkpoint import latest_resumable

SHAPES = str(Path(__file__).parents[2] / "configs" / "shapes.yaml")

STEP_METRICS = [
    "reward/shapes/mean", "reward/shapes/std", "reward/flaky_judge:first_is_nan/mean", "reward/total/mean",
    "reward/vivid:saturation/mean", "reward/vivid:PaletteMatch/mean", "reward/ocr/mean", "reward/clip/mean",
    "reward/failed", "grpo/zero_std_frac", "learner/kl", "learner/entropy", "learner/clip_frac", "learner/grad_norm",
    "learner/lr",
    "timing/rollout_s", "timing/reward_s", "timing/learn_s", "timing/sync_s", "throughput/samples_per_s",
]


def test_a_short_run_trains_syncs_and_logs(feature_run, sft_path):
    cfg, summary = feature_run
    assert summary["rollout_versions"] == [3]  # the rollout side holds the weights of update 3
    final = WorldPolicy.from_pretrained(summary["checkpoint"])
    start = WorldPolicy.from_pretrained(sft_path)
    changed = [not torch.equal(a, b) for a, b in zip(final.model.parameters(), start.model.parameters(),
                                                      strict=True)]
    assert any(changed)

    client = MlflowClient(store_uri(cfg.tracking, cfg.run.dir))
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.lr"] == "0.001" and run.data.params["rewards.3.weight"] == "0.5"
    for key in STEP_METRICS:
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == [1, 2, 3], key
    # one excluded sample per call of the flaky judge, counted: 2 chunks x 2 reward workers calls per step
    for key in ("reward/failed", "reward/flaky_judge:first_is_nan/failed"):
        assert [m.value for m in client.get_metric_history(run.info.run_id, key)] == [4.0] * 3, key
    evals = client.get_metric_history(run.info.run_id, "eval/strict_acc")
    assert sorted(m.step for m in evals) == [0, 2, 3]
    assert all(0.0 <= m.value <= 1.0 for m in evals)
    best_of_2 = client.get_metric_history(run.info.run_id, "eval/strict_acc_pass_at_2")  # 2 samples per prompt
    assert sorted(m.step for m in best_of_2) == [0, 2, 3]
    assert all(math.isfinite(m.value) for m in client.get_metric_history(run.info.run_id, "learner/kl"))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "summary.json", "images"} <= artifacts
    assert any("samples" in a.path for a in client.list_artifacts(run.info.run_id, "images"))
    assert Path(summary["checkpoint"]) == Path(cfg.run.dir).resolve() / "checkpoints" / run.info.run_id / "step-000003"


@pytest.mark.usefixtures("ray_cluster")
def test_judges_load_and_dry_run_in_their_actors_and_a_failure_ends_the_run_at_start_up(cache_dir, sft_path, plugins,
                                                                                      tmp_path, capsys):
    """Judges load in the reward actors (on their devices), so a judge that cannot score is found after the cluster
    started: an ``omnigrpo:`` line naming its config key, exit status 2, no traceback, nothing trained, nothing left
    reserved (a judge that cannot even be built: tests/rewards/test_worker.py). ``sft_path``: the tiny SFT start
    the run finds cached."""
    where = tmp_path / "built_in_pid"
    rewards = (f"rewards=[{{name: 'located_judge:located', kwargs: {{path: '{where}'}}}}, "
               "{name: 'broken_judge:score'}]")
    assert main(["train", SHAPES, *TINY, f"run.cache_dir={cache_dir}", rewards, f"run.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "omnigrpo: rewards.1: reward 'broken_judge:score' returned 1 scores for 2 images in its dry run" in err
    assert "Traceback" not in err, err
    assert int(where.read_text()) != os.getpid()  # built in a reward actor, never on the driver
    assert not leftovers() and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.usefixtures("ray_cluster")  # whose workers know this driver's pid (the judge dies only in an actor)
def test_a_crash_leaves_a_checkpoint_and_a_failed_run(tiny_config, sft_path, plugins):
    cfg = tiny_config("trainer.steps=4", "eval.every=0", "cluster.max_restarts=0",
                      "rewards=[{name: shapes}, {name: 'dying_judge:dies_on_second_batch'}]")
    with pytest.raises(RunFailed, match=r"step 2 \(rollout\): reward actor 0 died and the run already replaced 0 "
                                        r"actor\(s\), cluster.max_restarts = 0; its last error: .*; crash checkpoint "
                                        r".*crash-000001 \(resume with --resume\); traceback in .*failure.log"):
        train(cfg)
    assert "RoleLost" in (Path(cfg.run.dir) / "failure.log").read_text()  # the whole traceback, beside the run
    client = MlflowClient(store_uri(cfg.tracking, cfg.run.dir))
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    checkpoints = sorted((Path(cfg.run.dir) / "checkpoints" / runs[0].info.run_id).iterdir())
    assert [p.name for p in checkpoints] == ["crash-000001"]  # the one update that completed is saved
    info = json.loads((checkpoints[0] / "omnigrpo_step.json").read_text())
    assert info.pop("written_ns") > 0 and info == {"step": 1, "version": 1, "partial_update": False, "learners": 1}
    WorldPolicy.from_pretrained(checkpoints[0])  # and loads
    # the crash came while judging step 2: the checkpoint carries step 1's run state, so --resume continues it
    assert torch.load(checkpoints[0] / "run_state.pt", weights_only=True)["step"] == 1
    assert latest_resumable(Path(cfg.run.dir) / "checkpoints") == checkpoints[0]


@pytest.mark.usefixtures("ray_cluster")
def test_updates_skipped_in_a_row_stop_the_run_resumably_and_say_why(tiny_config, sft_path, plugins):
    cfg = tiny_config("trainer.steps=8", "eval.held_out=false", "trainer.max_skipped_updates=2",
                      "rewards=[{name: shapes}, {name: 'my_rewards:lost_after_start'}]")
    summary = train(cfg)
    assert summary["stopped_at"] == 2
    assert "2 updates in a row were skipped or not finite, the last at step 2" in summary["reason"]
    assert "judge backend lost" in summary["reason"]
    checkpoint = Path(summary["checkpoint"])
    assert latest_resumable(Path(cfg.run.dir) / "checkpoints") == checkpoint
    assert torch.load(checkpoint / "run_state.pt", weights_only=True)["step"] == 2
    client = MlflowClient(store_uri(cfg.tracking, cfg.run.dir))
    history = client.get_metric_history(summary["run_id"], "learner/skipped_update")
    assert [m.value for m in history] == [1.0, 1.0] and client.get_run(summary["run_id"]).info.status == "KILLED"


@pytest.mark.usefixtures("ray_cluster")
def test_a_judge_stuck_in_its_dry_run_is_named_after_the_setup_timeout_and_sigterm_ends_it(tiny_config, sft_path,
                                                                                          plugins, tmp_path):
    cfg = tiny_config("cluster.setup_timeout_s=20", "rewards=[{name: 'my_rewards:stuck_in_dry_run'}]")
    with pytest.raises(ConfigError, match="cluster.setup_timeout_s: .*reward actor 0.* did not finish setting up "
                                          "within 20 s"):
        train(cfg)
    marker = tmp_path / "stuck"
    cfg = tiny_config("cluster.setup_timeout_s=0",
                      f"rewards=[{{name: 'my_rewards:stuck_in_dry_run', kwargs: {{marker: '{marker}'}}}}]")

    def terminate() -> None:
        deadline = time.monotonic() + 120
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate, daemon=True).start()
    with pytest.raises(SystemExit):  # no timeout set: only the signal ends this start-up
        train(cfg, stop_on_sigterm=True)
    assert marker.exists() and not (Path(cfg.run.dir) / "checkpoints").exists()
