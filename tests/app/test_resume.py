"""A run interrupted after step k and resumed ends where an uninterrupted run of the same seed ends."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch
from conftest import TINY, policy_weights
from mlflow.tracking import MlflowClient

from omnigrpo.app.driver import train
from omnigrpo.app.preflight import check_resume
from omnigrpo.app.tracking import store_uri
from omnigrpo.cli import main
from omnigrpo.config.loader import ConfigError, load_config

SHAPES = str(Path(__file__).parents[2] / "configs" / "shapes.yaml")


@pytest.mark.parametrize("lora", [0, 4], ids=["full", "lora"])
def test_resume_matches_an_uninterrupted_run(tiny_config, sft_path, tmp_path, lora):
    # with LoRA the checkpoint holds merged weights; resuming must not apply the adapters twice
    common = ("trainer.lr=3e-3", "eval.every=0", "tracking.image_every=0", "rollout.top_k=30",
              f"trainer.lora_rank={lora}")
    straight = train(tiny_config(*common, "trainer.steps=4", f"run.dir={tmp_path / 'straight'}"))

    first = train(tiny_config(*common, "trainer.steps=2", f"run.dir={tmp_path / 'cut'}"))  # "interrupted" at 2
    cfg = tiny_config(*common, "trainer.steps=4", f"run.dir={tmp_path / 'cut'}", "run.resume=true")
    resumed = train(cfg)

    assert resumed["run_id"] == first["run_id"]  # the same MLflow run continues
    assert resumed["rollout_versions"] == [4]
    a, b = policy_weights(straight["checkpoint"]), policy_weights(resumed["checkpoint"])
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(not torch.equal(a[k], policy_weights(first["checkpoint"])[k]) for k in a)  # it did train on

    client = MlflowClient(store_uri(cfg))
    steps = [m.step for m in client.get_metric_history(resumed["run_id"], "reward/total/mean")]
    assert sorted(steps) == [1, 2, 3, 4]  # every step logged exactly once
    assert client.get_run(resumed["run_id"]).info.status == "FINISHED"
    assert resumed["before"] == first["before"]


def test_resume_without_a_checkpoint_is_refused(tmp_path, capsys):
    code = main(["train", SHAPES, "run.resume=true", f"run.dir={tmp_path / 'run'}"])
    assert code == 2 and "run.resume: no checkpoint under" in capsys.readouterr().err
    assert not ray.is_initialized() and not (tmp_path / "run").exists()


def test_a_checkpoint_written_mid_update_is_not_resumed(tmp_path):
    root = tmp_path / "run" / "checkpoints" / "r1"
    (root / "step-000002").mkdir(parents=True)
    torch.save({"step": 2, "rollout_rng": [torch.zeros(1)]}, root / "step-000002" / "run_state.pt")
    (root / "step-000002" / "omnigrpo_step.json").write_text(json.dumps({"step": 2, "written_ns": 1}))
    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}", "run.resume=true"])
    assert check_resume(cfg)[0] == root / "step-000002"
    (root / "crash-000003").mkdir()  # written later, in the middle of an update
    (root / "crash-000003" / "omnigrpo_step.json").write_text(json.dumps({"step": 3, "written_ns": 2,
                                                                          "partial_update": True}))
    with pytest.raises(ConfigError, match="crash-000003, was written in the middle of an update and cannot be "
                                          "resumed exactly"):
        check_resume(cfg)


def test_a_stopped_run_resumes_to_the_weights_of_an_uninterrupted_one(tiny_config, sft_path, cache_dir, tmp_path):
    """SIGTERM (what ``omnigrpo stop`` and ``ray job stop`` send) lets the step finish and leaves a resumable
    checkpoint; resuming ends with the weights an uninterrupted run ends with."""
    steps = 12
    common = ("trainer.lr=3e-3", "eval.every=0", "tracking.image_every=0", f"model.path={sft_path}",
              f"trainer.steps={steps}", "tracking.experiment=stop")
    straight = train(tiny_config(*common, f"run.dir={tmp_path / 'straight'}"))
    cut = tmp_path / "cut"
    argv = [str(Path(sys.executable).parent / "omnigrpo"), "train", SHAPES, *TINY, *common,
            f"run.cache_dir={cache_dir}", f"run.dir={cut}"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client, deadline = MlflowClient(f"sqlite:///{cut / 'mlflow.db'}"), time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (cut / "mlflow.db").exists() and _logged(client) >= 2:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.2)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "stopped after step" in out, out[-3000:]
    stopped_at = _logged(client)
    assert 2 <= stopped_at < steps
    run = client.search_runs([client.get_experiment_by_name("stop").experiment_id])[0]
    assert run.info.status == "KILLED"

    resumed = train(tiny_config(*common, f"run.dir={cut}", "run.resume=true"))
    assert resumed["run_id"] == run.info.run_id and resumed["rollout_versions"] == [steps]
    a, b = policy_weights(straight["checkpoint"]), policy_weights(resumed["checkpoint"])
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "reward/total/mean")) == list(
        range(1, steps + 1))


def _logged(client: MlflowClient) -> int:
    exp = client.get_experiment_by_name("stop")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return len(client.get_metric_history(runs[0].info.run_id, "reward/total/mean")) if runs else 0
