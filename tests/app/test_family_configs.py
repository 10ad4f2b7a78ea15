"""The shipped per-family configs for real hardware: each validates, and its placement fits the GPUs its
header promises (checked against a cluster description, as ``placement.build`` does before any load)."""

from pathlib import Path

import pytest

from omnigrpo.cluster import placement
from omnigrpo.config.loader import load_config

CONFIGS = Path(__file__).parents[2] / "configs"


@pytest.mark.parametrize(("name", "family", "gpus"), [("janus_pro_1b.yaml", "janus", 8),
                                                       ("emu3_gen.yaml", "emu3", 16), ("xomni.yaml", "xomni", 8),
                                                       ("janus_pro_7b.yaml", "janus", 8)])
def test_family_config_loads_and_fits_its_cluster(name, family, gpus):
    cfg = load_config(CONFIGS / name)
    assert cfg.model.family == family and cfg.model.path and cfg.batch_size == 512
    wanted = placement.demands(cfg.cluster, cfg.actor_counts, cluster_cpus=64.0)
    placement.check_fits(wanted, {"CPU": 64.0, "GPU": float(gpus)})
    with pytest.raises(placement.ClusterShortfall, match="GPU"):
        placement.check_fits(wanted, {"CPU": 64.0, "GPU": float(gpus) - 1})
    sizes, _ = placement.bundles(cfg.cluster, wanted)
    assert all(b.get("GPU", 0) <= 1 + 1e-9 for b in sizes)  # no bundle needs more than one GPU
    assert {r.name for r in cfg.rewards} >= {"hps"}
