"""The README's "Write your own reward" example, run as written: its module, its config, a short run."""

from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from omnigrpo.app.driver import train
from omnigrpo.app.tracking import store_uri
from omnigrpo.rollout.families.builtin import WorldPolicy

ROOT = Path(__file__).parents[2]


def test_the_readme_plugin_example_trains(tiny_config, sft_path, monkeypatch):
    plugins = ROOT / "examples" / "rewards"
    monkeypatch.syspath_prepend(str(plugins))
    monkeypatch.setenv("PYTHONPATH", str(plugins))  # what the README's command does
    cfg = tiny_config("trainer.steps=3", "trainer.lr=1e-3", "eval.every=0",
                      path=ROOT / "configs" / "shapes_plugin.yaml")
    summary = train(cfg)
    client = MlflowClient(store_uri(cfg))
    metrics = client.get_run(summary["run_id"]).data.metrics
    for name in ("shapes", "vivid:saturation", "vivid:PaletteMatch"):
        history = client.get_metric_history(summary["run_id"], f"reward/{name}/mean")
        assert sorted(m.step for m in history) == [1, 2, 3], name
        assert all(0.0 <= m.value <= 1.0 for m in history)
    assert metrics["reward/failed"] == 0
    final = WorldPolicy.from_pretrained(summary["checkpoint"]).model.parameters()
    start = WorldPolicy.from_pretrained(sft_path).model.parameters()
    assert any(not torch.equal(a, b) for a, b in zip(final, start, strict=True))
