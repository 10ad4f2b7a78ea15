import json

import torch

from omnigrpo.rollout.families.builtin import WorldPolicy
from omnigrpo.trainers.sft import sft_checkpoint, sft_key, train_sft


def test_sft_is_reproducible_and_learns(tiny_config, tmp_path):
    cfg = tiny_config("sft.steps=8", "sft.kmeans_images=64")
    stats = [train_sft(cfg, tmp_path / name, threads=2) for name in ("a", "b")]
    a, b = WorldPolicy.from_pretrained(tmp_path / "a"), WorldPolicy.from_pretrained(tmp_path / "b")
    assert all(torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters(), strict=True))
    assert (a.codebook.centroids == b.codebook.centroids).all()
    assert stats[0]["final_loss"] == stats[1]["final_loss"]
    # the loss fell from the uniform start, log(64 codes) = 4.16
    assert stats[0]["final_loss"] < 4.0


def test_checkpoint_is_cached_by_config(sft_path, tiny_config):
    cfg = tiny_config()
    marker = sft_path / "sft.json"
    stamp = marker.stat().st_mtime_ns
    assert sft_checkpoint(cfg) == sft_path  # reused, not retrained
    assert marker.stat().st_mtime_ns == stamp
    assert json.loads(marker.read_text())["key"] == sft_key(cfg)
    assert sft_key(tiny_config("run.seed=1")) != sft_key(cfg)
    assert sft_key(tiny_config("sft.steps=41")) != sft_key(cfg)
    assert sft_key(tiny_config("trainer.lr=0.5")) == sft_key(cfg)  # RL settings do not touch SFT
