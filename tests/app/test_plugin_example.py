"""docs/rewards.md's "Write your own reward" example as written: its module, its config (the feature run trains it
with more rewards added)."""

import torch
import yaml
from conftest import PLUGIN_CONFIG
from mlflow.tracking import MlflowClient

from omnigrpo.app.tracking import store_uri
from omnigrpo.config.loader import load_config
from omnigrpo.rollout.families.builtin import WorldPolicy


def test_the_readme_plugin_example_trains(feature_run, sft_path):
    cfg, summary = feature_run
    shipped = load_config(PLUGIN_CONFIG).rewards
    assert list(cfg.rewards[:len(shipped)]) == list(shipped)  # the example's rewards, as written
    assert yaml.safe_load(PLUGIN_CONFIG.read_text())["rewards"][2]["kwargs"] == {"tolerance": 50.0}
    client = MlflowClient(store_uri(cfg.tracking, cfg.run.dir))
    for name in ("shapes", "vivid:saturation", "vivid:PaletteMatch"):
        history = client.get_metric_history(summary["run_id"], f"reward/{name}/mean")
        assert sorted(m.step for m in history) == [1, 2, 3], name
        assert all(0.0 <= m.value <= 1.0 for m in history)
    final = WorldPolicy.from_pretrained(summary["checkpoint"]).model.parameters()
    start = WorldPolicy.from_pretrained(sft_path).model.parameters()
    assert any(not torch.equal(a, b) for a, b in zip(final, start, strict=True))
