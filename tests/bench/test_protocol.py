"""The TRL comparison's protocol without running it: modes are validated overrides, figures come from rounds."""

import pytest

from omnigrpo.bench import protocol
from omnigrpo.bench.protocol import mode_configs, summarise, table_lines
from omnigrpo.config.loader import ConfigError, load_config


def test_modes_are_config_overrides_checked_before_anything_runs(monkeypatch):
    cfg = load_config()
    configs = mode_configs(cfg, ["hybrid", "colocated"])
    assert list(configs) == ["hybrid", "colocated"]
    assert configs["hybrid"].cluster.placement == "hybrid" and configs["hybrid"].trainer == cfg.trainer
    with pytest.raises(ConfigError, match=r"--modes: unknown mode\(s\) warp; choose from colocated, split, hybrid"):
        mode_configs(cfg, ["colocated", "warp"])
    with pytest.raises(ConfigError, match="named twice"):
        mode_configs(cfg, ["split", "split"])
    monkeypatch.setitem(protocol.MODES, "later", {"cluster.placement": "split", "trainer.not_yet": 1})
    with pytest.raises(ConfigError, match="mode 'later' .*: invalid config:\n  trainer.not_yet: unknown key"):
        mode_configs(cfg, ["later"])


def _run(samples_per_s: float, curve: list[float], sync_bytes: float = 0.0) -> dict:
    stages = {f"{s}_s": samples_per_s / 100 for s in protocol.STAGES}
    return {"samples_per_s": samples_per_s, "reward": protocol.window_mean(curve), "reward_curve": curve,
            "stages": {**stages, "sync_bytes": sync_bytes}, "max_non_image_tokens": 0}


def test_figures_are_medians_and_spreads_of_the_rounds():
    curve = [0.0] * 5 + [0.5] * 10  # the reward is the mean of the last 10 steps only
    ours = {"colocated": [_run(30.0, curve, 1e5), _run(10.0, curve, 1e5), _run(20.0, [0.2, 0.4], 1e5)]}
    theirs = [_run(8.0, [1.0]), _run(12.0, [0.0]), _run(10.0, [0.3])]
    t = summarise(ours, theirs, [], steps=15, names=["colocated"])
    mode = t["omnigrpo"]["colocated"]
    assert mode["samples_per_s"] == {"median": 20.0, "min": 10.0, "max": 30.0, "rounds": [30.0, 10.0, 20.0]}
    assert mode["reward"]["rounds"] == pytest.approx([0.5, 0.5, 0.3]) and mode["reward"]["median"] == 0.5
    assert mode["stages"]["step_s"] == pytest.approx(0.2) and mode["stages"]["sync_bytes"] == 1e5
    assert t["trl"]["samples_per_s"]["median"] == 10.0 and mode["vs_trl"] == 2.0
    assert t["rounds"] == 3 and mode["overrides"] == {"cluster.placement": "colocated", "trainer.max_staleness": 0}
    text = "\n".join(table_lines(t))
    assert "| omnigrpo colocated | 20.0 | 10.0 | 30.0 | 0.500 | 2.00x |" in text
    assert "| TRL | 10.0 | 8.0 | 12.0 | 0.300 |  |" in text and "| colocated | 0.200 |" in text
