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
            "stages": {**stages, "sync_bytes": sync_bytes}, "max_non_image_tokens": 0, "env": {"X": "1"},
            "before": {"cpu_busy_percent": 3.0, "leftover_processes": 0, "settled": True}}


def test_figures_are_medians_and_spreads_of_the_rounds():
    curve = [0.0] * 5 + [0.5] * 10  # the reward is the mean of the last 10 steps only
    ours = {"colocated": [_run(30.0, curve, 1e5), _run(10.0, curve, 1e5), _run(20.0, [0.2, 0.4], 1e5)]}
    theirs = {"trl": [_run(8.0, [1.0]), _run(12.0, [0.0]), _run(10.0, [0.3])],
              "trl_passive": [_run(4.0, [1.0]), _run(6.0, [0.0]), _run(5.0, [0.3])]}
    t = summarise(ours, theirs, [], steps=15, names=["colocated"])
    mode = t["omnigrpo"]["colocated"]
    assert mode["samples_per_s"] == {"median": 20.0, "min": 10.0, "max": 30.0, "rounds": [30.0, 10.0, 20.0]}
    assert mode["reward"]["rounds"] == pytest.approx([0.5, 0.5, 0.3]) and mode["reward"]["median"] == 0.5
    assert mode["stages"]["step_s"] == pytest.approx(0.2) and mode["stages"]["sync_bytes"] == 1e5
    assert t["trl"]["samples_per_s"]["median"] == 10.0 and mode["vs_trl"] == 2.0
    assert mode["vs_trl_rounds"] == pytest.approx([30 / 8, 10 / 12, 20 / 10])  # round by round, not of medians
    assert t["trl_passive"]["samples_per_s"]["median"] == 5.0
    assert t["rounds"] == 3 and mode["overrides"] == {"cluster.placement": "colocated", "trainer.max_staleness": 0}
    text = "\n".join(table_lines(t))
    assert "| omnigrpo colocated | 20.0 | 30.0, 10.0, 20.0 | 0.500 | 2.00x | 3.75x, 0.83x, 2.00x |" in text
    assert "| TRL | 10.0 | 8.0, 12.0, 10.0 | 0.300 |  |  |" in text and "| colocated | 0.200 |" in text
    assert "| TRL, OMP_WAIT_POLICY=PASSIVE | 5.0 |" in text and "- TRL: {'X': '1'}; CPU busy before" in text


def test_the_trl_side_gets_the_environment_the_command_received_not_what_it_set(tmp_path):
    """In a process started as a user starts ``omnigrpo`` (no thread or Ray variables), the command sets its own
    (``OMP_WAIT_POLICY``, Ray's auth and loopback, MLflow's retries); the TRL side's environment has none."""
    import json
    import os
    import subprocess
    import sys

    script = ("import json, os; import omnigrpo.cli; from omnigrpo.cluster.environment import prepare_local_ray_env; "
              "prepare_local_ray_env(''); from omnigrpo.app.tracking import Tracker; "
              "from omnigrpo.config.loader import load_config; "
              "Tracker.from_config(load_config(None, ['run.dir=" + str(tmp_path) + "'])); "
              "from omnigrpo.bench.sides import user_env; "
              "print(json.dumps({'process': dict(os.environ), 'side': user_env()}))")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "RAY_", "MLFLOW_"))}
    out = json.loads(subprocess.run([sys.executable, "-c", script], env=clean, capture_output=True, text=True,
                                    timeout=120, check=True).stdout.splitlines()[-1])
    set_by_command = {"OMP_WAIT_POLICY", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
                      "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"}
    assert set_by_command <= set(out["process"])  # the command did set them for itself ...
    assert not set_by_command & set(out["side"])  # ... and TRL's process gets none of them
    assert out["side"]["PATH"] == clean["PATH"]
