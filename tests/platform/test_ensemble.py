"""An ensemble of real judges on the shapes world: the pixel judge, OCR, CLIP and a plugin, over Ray."""

from pathlib import Path

from mlflow.tracking import MlflowClient

from omnigrpo.platform.driver import train
from omnigrpo.platform.tracking import store_uri

ROOT = Path(__file__).parents[2]


def test_ocr_clip_and_a_plugin_train_together(tiny_config, sft_path, tiny_clip_dir, tmp_path, monkeypatch):
    plugins = ROOT / "examples" / "rewards"
    monkeypatch.syspath_prepend(str(plugins))
    monkeypatch.setenv("PYTHONPATH", str(plugins))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red circle at the top left"}\n'
                       '{"prompt": "a blue square at the bottom right", "text": "BLUE"}\n'
                       '{"prompt": "a yellow triangle at the top right"}\n'
                       '{"prompt": "a green circle at the bottom left", "text": "GO"}\n')
    cfg = tiny_config(
        "trainer.steps=2", "eval.every=0", f"data.prompts={prompts}", "cluster.reward_workers=2",
        "rewards=[{name: shapes, weight: 1.0}, {name: ocr, weight: 0.5, required: false, kwargs: {detect: false}},"
        f" {{name: clip, weight: 0.3, kwargs: {{model: 'local-dir:{tiny_clip_dir}', pretrained: null}}}},"
        " {name: 'vivid:saturation', weight: 0.2}]",
    )
    summary = train(cfg)
    client = MlflowClient(store_uri(cfg))
    metrics = client.get_run(summary["run_id"]).data.metrics
    for name in ("shapes", "ocr", "clip", "vivid:saturation"):
        assert f"reward/{name}/mean" in metrics, name
    assert metrics["reward/failed"] == 0 and metrics["reward/ocr/failed"] == 0
    assert 0.0 <= metrics["reward/ocr/mean"] <= 1.0  # scored only the prompts that ask for text
    assert summary["rollout_versions"] == [2]
