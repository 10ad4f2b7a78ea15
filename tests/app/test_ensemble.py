"""An ensemble of real judges on the shapes world: the pixel judge, OCR, CLIP and a plugin, over Ray."""

import os
from pathlib import Path

import ray
from mlflow.tracking import MlflowClient

from omnigrpo.app.driver import train
from omnigrpo.app.tracking import store_uri
from omnigrpo.cluster import actors, shards
from omnigrpo.worlds import shapes
from omnigrpo.worlds.world import prompts_of

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
        "trainer.steps=2", "eval.every=0", f"data.prompts={prompts}", "cluster.reward_workers=2", "rollout.chunks=2",
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


def test_chunked_rollout_keeps_groups_and_order_with_the_judges(tiny_config, sft_path):
    cfg = tiny_config("cluster.reward_workers=2", "cluster.reward_cpus=0.25")
    actors.connect(cfg)
    try:
        workers = actors.spawn(cfg, str(sft_path), os.environ["TORCH_EXTENSIONS_DIR"])
        prompts, metadata = prompts_of(shapes.train_items()[:5])
        timings: dict[str, float] = {}
        batch, result = shards.generate_and_score(workers, prompts, metadata, 3, chunks=3, timings=timings)
        assert batch.prompts == [p for p in prompts for _ in range(3)]
        assert batch.group.tolist() == [g for g in range(5) for _ in range(3)]  # whole groups, in order
        assert batch.images.shape == (15, 32, 32, 3) and result.total.shape == (15,)
        again = shards.score(workers, batch)  # the same images judged in one go score the same
        assert (again.total == result.total).all()
        assert timings["timing/rollout_s"] > 0 and timings["timing/reward_s"] >= 0
    finally:
        ray.shutdown()
