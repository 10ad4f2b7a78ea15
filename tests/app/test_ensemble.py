"""An ensemble of real judges on the shapes world: the pixel judge, OCR, CLIP and plugins, over Ray."""

import os

import pytest
from mlflow.tracking import MlflowClient

from omnigrpo.app.tracking import store_uri
from omnigrpo.cluster import actors, shards
from omnigrpo.worlds import shapes
from omnigrpo.worlds.world import prompts_of


def test_ocr_clip_and_plugins_train_together(feature_run):
    cfg, summary = feature_run
    client = MlflowClient(store_uri(cfg.tracking, cfg.run.dir))
    metrics = client.get_run(summary["run_id"]).data.metrics
    for name in ("shapes", "ocr", "clip", "vivid:saturation", "vivid:PaletteMatch"):
        assert f"reward/{name}/mean" in metrics, name
        assert metrics[f"reward/{name}/failed"] == 0, name  # only the flaky judge fails
    assert 0.0 <= metrics["reward/ocr/mean"] <= 1.0  # scored only the prompts that ask for text
    assert summary["rollout_versions"] == [3]


@pytest.mark.usefixtures("ray_cluster")
def test_chunked_rollout_keeps_groups_and_order_with_the_judges(tiny_config, sft_path):
    cfg = tiny_config("cluster.reward_workers=2", "cluster.reward_cpus=0.25")
    actors.connect(cfg.cluster)
    workers = actors.spawn(cfg, str(sft_path), os.environ["TORCH_EXTENSIONS_DIR"])
    try:
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
        actors.release(workers)
