"""A run interrupted after step k and resumed ends where an uninterrupted run of the same seed ends (also: a LoRA
run stopped by its alarm, ``test_alarm.py``; a finished hybrid run continued, ``test_hybrid.py``)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REFERENCE, TINY, layered, leftovers, metric_values, policy_weights
from mlflow.tracking import MlflowClient

from omnigrpo.app.driver import train
from omnigrpo.app.preflight import check_resume
from omnigrpo.cli import main
from omnigrpo.config.loader import ConfigError, load_config
from omnigrpo.trainers.checkpoint import REFERENCE_DIR

SHAPES = str(Path(__file__).parents[2] / "configs" / "shapes.yaml")


def test_resume_without_a_checkpoint_is_refused(tmp_path, capsys):
    code = main(["train", SHAPES, "run.resume=true", f"run.dir={tmp_path / 'run'}"])
    assert code == 2 and "run.resume: no checkpoint under" in capsys.readouterr().err
    assert not leftovers() and not (tmp_path / "run").exists()


def test_a_checkpoint_written_mid_update_is_not_resumed(tmp_path):
    root = tmp_path / "run" / "checkpoints" / "r1"
    (root / "step-000002").mkdir(parents=True)
    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}", "run.resume=true", f"run.cache_dir={tmp_path / 'cache'}"])
    torch.save({"step": 2, "version": 2, "rollout_rng": [torch.zeros(1)], "run_id": "r1", "cursor": "{}",
                "reference_path": str(tmp_path / "cache" / "sft" / "start")}, root / "step-000002" / "run_state.pt")
    (root / "step-000002" / "omnigrpo_step.json").write_text(json.dumps({"step": 2, "written_ns": 1}))
    with pytest.raises(ConfigError, match="step-000002/config.json cannot be read"):  # weights, not only a state
        check_resume(cfg)
    shape = {"model_type": "qwen2", "hidden_size": cfg.model.hidden_size, "num_hidden_layers": cfg.model.num_layers,
             "num_attention_heads": cfg.model.num_heads, "num_key_value_heads": cfg.model.num_kv_heads,
             "intermediate_size": cfg.model.intermediate_size}
    (root / "step-000002" / "config.json").write_text(json.dumps(shape))
    with pytest.raises(ConfigError, match="is no whole builtin checkpoint: it lacks policy.json"):
        check_resume(cfg)
    for name in ("policy.json", "codebook.json"):
        (root / "step-000002" / name).write_text("{}")
    np.save(root / "step-000002" / "codebook.npy", np.zeros((4, 3), dtype=np.float32))
    assert check_resume(cfg)[0] == root / "step-000002"
    (root / "crash-000003").mkdir()  # written later, in the middle of an update
    (root / "crash-000003" / "omnigrpo_step.json").write_text(json.dumps({"step": 3, "written_ns": 2,
                                                                          "partial_update": True}))
    with pytest.raises(ConfigError, match="crash-000003, was written in the middle of an update and cannot be "
                                          "resumed exactly"):
        check_resume(cfg)


def test_a_checkpoint_must_carry_the_reference_its_learner_refreshed(tiny_config, sft_path):
    """A checkpoint written after a refresh of the KL reference (counted in ``learner_state.pt``) holds the reference
    as a policy folder of the configured model; a folder no refresh accounts for is refused too."""
    import shutil

    cfg = tiny_config("run.resume=true")
    step = Path(cfg.run.dir) / "checkpoints" / "r1" / "step-000002"
    shutil.copytree(sft_path, step)
    (step / "omnigrpo_step.json").write_text(json.dumps({"step": 2, "written_ns": 1, "version": 2}))
    torch.save({"step": 2, "version": 2, "rollout_rng": [None] * cfg.samplers, "run_id": "r1", "cursor": "{}",
                "reference_path": str(sft_path)}, step / "run_state.pt")
    torch.save({"shuffle": torch.Generator().get_state(), "version": 2, "ref_refreshes": 1},
               step / "learner_state.pt")
    with pytest.raises(ConfigError, match=f"after 1 refresh\\(es\\) of the KL reference but holds no {REFERENCE_DIR}/"):
        check_resume(cfg)
    shutil.copytree(sft_path, step / REFERENCE_DIR)
    assert check_resume(cfg)[0] == step.resolve()
    (step / REFERENCE_DIR / "config.json").write_text(json.dumps({"model_type": "janus"}))
    with pytest.raises(ConfigError, match=f"run.resume: .*{REFERENCE_DIR}: .*'janus' model"):
        check_resume(cfg)
    torch.save({"shuffle": torch.Generator().get_state(), "version": 2}, step / "learner_state.pt")
    with pytest.raises(ConfigError, match="is a KL reference, but learner_state.pt counts no refresh of it"):
        check_resume(cfg)


@pytest.mark.usefixtures("ray_cluster")
def test_a_stopped_run_resumes_to_the_weights_of_an_uninterrupted_one(reference_run, tiny_config, cache_dir,
                                                                      tmp_path, plugins):
    """SIGTERM (what ``omnigrpo stop`` and ``ray job stop`` send) lets the step finish and leaves a resumable
    checkpoint; resuming continues the same MLflow run, every step logged once, and ends with the weights and the
    step-0 evaluation of an uninterrupted run. The run is ``omnigrpo train`` in a process of its own, with a
    cluster of its own that it shuts down; a weight-0 reward sends the signal while step 2 is being judged (its
    3rd call: the step-0 evaluation, steps 1 and 2). The KL reference, refreshed after step 2, resumes with it."""
    straight_cfg, straight = reference_run
    stopper = "rewards=[{name: shapes}, {name: 'saboteur:stops_the_driver', weight: 0, kwargs: {call: 3}}]"
    cut = tmp_path / "run"
    argv = [str(Path(sys.executable).parent / "omnigrpo"), "train", SHAPES, *layered(TINY, REFERENCE), stopper,
            f"run.cache_dir={cache_dir}", f"run.dir={cut}"]
    # the driver's pid reaches the reward actors through the environment its cluster starts with
    proc = subprocess.run(["sh", "-c", 'OMNIGRPO_TEST_DRIVER_PID=$$ exec "$@"', "sh", *argv], capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "stopped after step 2" in out, out[-3000:]
    client = MlflowClient(f"sqlite:///{cut / 'mlflow.db'}")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "KILLED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "reward/total/mean")) == [1, 2]
    stopped = policy_weights(cut / "checkpoints" / run.info.run_id / "step-000002")
    assert (cut / "checkpoints" / run.info.run_id / "step-000002" / REFERENCE_DIR / "model.safetensors").is_file()

    never = stopper.replace("call: 3", "call: 0")  # the same rewards; this driver is not signalled
    resumed = train(tiny_config(*REFERENCE, never, f"run.dir={cut}", "run.resume=true"))
    assert resumed["run_id"] == run.info.run_id and resumed["rollout_versions"] == [4]
    a, b = policy_weights(straight["checkpoint"]), policy_weights(resumed["checkpoint"])
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(not torch.equal(a[k], stopped[k]) for k in a)  # it did train on
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "reward/total/mean")) == [1, 2, 3, 4]
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert resumed["before"] == straight["before"]  # the stopped run's step-0 evaluation, carried over
    cfg = tiny_config(f"run.dir={cut}")
    assert metric_values(cfg, run.info.run_id, "learner/ref_refreshes") == [0, 1, 1, 2]
    kl = metric_values(cfg, run.info.run_id, "learner/kl")  # step 4's against the reference of step 2
    assert kl[0] == kl[2] == 0 < kl[3]  # each step right after a refresh starts at the reference
    assert kl == pytest.approx(metric_values(straight_cfg, straight["run_id"], "learner/kl"), rel=1e-4)
