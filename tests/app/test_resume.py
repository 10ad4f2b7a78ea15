"""A run interrupted after step k and resumed ends where an uninterrupted run of the same seed ends."""

import pytest
import torch
from mlflow.tracking import MlflowClient

from omnigrpo.app.driver import train
from omnigrpo.app.tracking import store_uri
from omnigrpo.rollout.families.builtin import WorldPolicy


def _weights(path):
    return WorldPolicy.from_pretrained(path).model.state_dict()


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
    a, b = _weights(straight["checkpoint"]), _weights(resumed["checkpoint"])
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(not torch.equal(a[k], _weights(first["checkpoint"])[k]) for k in a)  # it did train on

    client = MlflowClient(store_uri(cfg))
    steps = [m.step for m in client.get_metric_history(resumed["run_id"], "reward/total/mean")]
    assert sorted(steps) == [1, 2, 3, 4]  # every step logged exactly once
    assert client.get_run(resumed["run_id"]).info.status == "FINISHED"
    assert resumed["before"] == first["before"]


def test_resume_without_a_checkpoint_starts_fresh(tiny_config, sft_path, tmp_path):
    summary = train(tiny_config("trainer.steps=1", "eval.every=0", "run.resume=true"))
    assert summary["rollout_versions"] == [1]
