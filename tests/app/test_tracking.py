import json

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from omnigrpo.app.tracking import Tracker, _redact, flatten, store_uri


def test_flatten_names_nested_keys():
    assert flatten({"a": {"b": 1}, "r": [{"name": "x"}]}) == {"a.b": "1", "r.0.name": "x"}


def test_secrets_never_reach_mlflow_and_metrics_are_batched(tiny_config, tmp_path):
    cfg = tiny_config("rewards=[{name: shapes, kwargs: {api_key: sekrit-123, auth_token: tok-456, n: 3}}]")
    tracker = Tracker.from_config(cfg)
    run_id = tracker.start()
    tracker.log({"reward/total/mean": 0.5, "kl": float("nan"), "lr": 1e-3}, step=1)
    tracker.log_samples(np.zeros((3, 32, 32, 3), np.uint8), ["a", "b", "c"], step=1)
    tracker.end()

    client = MlflowClient(store_uri(cfg.tracking, cfg.run.dir))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["rewards.0.kwargs.api_key"] == "<redacted>" and params["rewards.0.kwargs.n"] == "3"
    assert not any("sekrit" in v or "tok-456" in v for v in params.values())
    client.download_artifacts(run_id, "config.yaml", str(tmp_path))
    config_text = (tmp_path / "config.yaml").read_text()
    assert "sekrit" not in config_text and "<redacted>" in config_text
    assert run.data.metrics == {"reward/total/mean": 0.5, "lr": 1e-3}  # NaN skipped, not logged
    assert str(store_uri(cfg.tracking, cfg.run.dir)).startswith("sqlite:///")
    assert (tmp_path / "run" / "mlflow.db").exists()
    images = client.list_artifacts(run_id, "images")
    assert images and images[0].path.startswith("images/samples")


def test_credentials_inside_urls_are_redacted():
    clean = _redact({"tracking": {"uri": "https://alice:pw@mlflow.example:5000/api?token=abc"},
                     "cluster": {"address": "ray://head:10001"}, "store": "sqlite:////tmp/x/mlflow.db",
                     "headers": {"Authorization": "Bearer x"}})
    assert clean["tracking"]["uri"] == "https://<redacted>@mlflow.example:5000/api?<redacted>"
    assert clean["cluster"]["address"] == "ray://head:10001"
    assert clean["store"] == "sqlite:////tmp/x/mlflow.db"
    assert clean["headers"] == "<redacted>"


def test_curves_overlay_attributes_in_one_panel_and_mark_the_alarms(tiny_config, tmp_path):
    from PIL import Image

    from omnigrpo.app.tracking import latest_run_id, plot_curves

    cfg = tiny_config()
    tracker = Tracker.from_config(cfg)
    run_id = tracker.start()
    for step in range(1, 11):
        tracker.log({"reward/total/mean": step / 10, "eval/style_entropy_colour": 1 - step / 20,
                     "eval/style_entropy_advance": 0.5 - step / 20, "alarm/collapse": float(step == 6)}, step=step)
    tracker.end()
    keys = ["reward/total/mean", "eval/style_entropy_colour+eval/style_entropy_advance"]
    where = cfg.tracking, cfg.run.dir
    out = plot_curves(*where, latest_run_id(*where), keys, tmp_path / "c.png")
    assert out == tmp_path / "c.png" and Image.open(out).size[0] > 800
    plain = plot_curves(*where, run_id, keys[:1], tmp_path / "one.png")
    assert Image.open(plain).size[0] < Image.open(out).size[0]  # a panel per key
    with pytest.raises(KeyError, match="eval/style_entropy_shift"):
        plot_curves(*where, run_id, ["eval/style_entropy_colour+eval/style_entropy_shift"], tmp_path / "x.png")


def test_the_default_curves_follow_the_world():
    from pathlib import Path

    from omnigrpo.app.tracking import default_curve_keys
    from omnigrpo.config.loader import load_config

    configs = Path(__file__).parents[2] / "configs"
    assert default_curve_keys(load_config(configs / "glyphs.yaml", []).world.name) == [
        "reward/total/mean", "eval/exact_match",
        "eval/style_entropy_colour+eval/style_entropy_advance+eval/style_entropy_shift", "learner/kl",
        "diversity/group"]
    assert default_curve_keys(load_config(configs / "shapes.yaml", []).world.name) == [
        "reward/total/mean", "eval/strict_acc", "learner/kl", "diversity/group"]


def test_a_lost_store_buffers_and_writes_beside_the_run(tiny_config, tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    cfg = tiny_config()
    tracker = Tracker.from_config(cfg)
    tracker.start()
    tracker.log({"reward/total/mean": 0.5}, step=1)
    tracker.client = MlflowClient("http://127.0.0.1:9")  # the store is gone: nothing listens there
    for step in (2, 3):
        tracker.log({"reward/total/mean": 0.25 * step}, step=step)  # training goes on
    tracker.log_dict({"after": 1.0}, "summary.json", wait_s=0)
    tracker.end(wait_s=0)
    run = tmp_path / "run"
    assert [json.loads(line)[0]["step"] for line in (run / "unsent_metrics.jsonl").read_text().splitlines()] == [2, 3]
    assert json.loads((run / "summary.json").read_text()) == {"after": 1.0}
    assert sum("MLflow unreachable (" in r.message for r in caplog.records) == 1  # said once
    assert "Traceback" not in caplog.text
