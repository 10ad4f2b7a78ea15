import json
import logging
import os
import re
import subprocess
import sys

import torch

from omnigrpo.rollout.families.builtin import WorldPolicy
from omnigrpo.trainers.sft import sft_checkpoint, sft_key, train_sft


def _sft(cfg):
    """The sections of ``cfg`` an SFT checkpoint is made of."""
    return cfg.sft, cfg.model, cfg.world, cfg.run


def test_sft_is_reproducible_and_learns(tiny_config, tmp_path):
    cfg = tiny_config("sft.steps=8", "sft.kmeans_images=64")
    stats = [train_sft(*_sft(cfg), tmp_path / name, threads=2) for name in ("a", "b")]
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
    assert sft_checkpoint(*_sft(cfg)) == sft_path  # reused, not retrained
    assert marker.stat().st_mtime_ns == stamp
    assert json.loads(marker.read_text())["key"] == sft_key(*_sft(cfg))
    assert sft_key(*_sft(tiny_config("run.seed=1"))) != sft_key(*_sft(cfg))
    assert sft_key(*_sft(tiny_config("sft.steps=41"))) != sft_key(*_sft(cfg))
    assert sft_key(*_sft(tiny_config("trainer.lr=0.5"))) == sft_key(*_sft(cfg))  # RL settings do not touch SFT


def test_an_sft_a_run_starts_says_why_and_how_long(tiny_config, tmp_path, caplog):
    cfg = tiny_config("sft.steps=12", "sft.kmeans_images=64", f"run.cache_dir={tmp_path / 'cache'}")
    with caplog.at_level(logging.INFO, logger="omnigrpo.trainers.sft"):
        path = sft_checkpoint(*_sft(cfg), threads=1)
    text = caplog.text
    assert f"no SFT checkpoint for this model, world and sft config under {path}: training it first (12 steps" in text
    assert re.search(r"SFT: [0-9.]+ s per step on 1 thread\(s\), about [0-9]+ min to go", text), text


def test_threads_follow_the_cores_the_process_is_given():
    code = ("import os\nos.sched_setaffinity(0, {0})\nfrom omnigrpo.config.runtime import use_threads\n"
            "import torch\nprint(use_threads(None), torch.get_num_threads(), os.environ['OMP_WAIT_POLICY'])")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", "import omnigrpo.cli\n" + code], capture_output=True, text=True,
                         env=env, check=True).stdout.split()
    assert out == ["1", "1", "PASSIVE"]  # one core given: one thread; idle threads sleep rather than spin


def test_a_spin_count_the_user_set_keeps_threads_spinning_briefly():
    code = ("import os\nimport omnigrpo.cli\n"
            "print(os.environ.get('OMP_WAIT_POLICY', 'unset'), os.environ['GOMP_SPINCOUNT'])")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | {"GOMP_SPINCOUNT": "30000"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout.split()
    assert out == ["unset", "30000"]
