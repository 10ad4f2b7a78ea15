"""Faults a long run meets: a rollout actor killed mid-run, a tracking server that goes away and comes back."""

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import requests
from mlflow.tracking import MlflowClient

from omnigrpo.app.driver import train
from omnigrpo.app.tracking import store_uri

MLFLOW = str(Path(sys.executable).parent / "mlflow")


def _run_in_thread(cfg) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def target():
        try:
            result.update(train(cfg))
        except BaseException as err:  # noqa: BLE001 - reported by the test
            result["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def _steps_logged(client: MlflowClient, experiment: str, key: str = "reward/total/mean") -> list[int]:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, key)) if runs else []


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


def test_a_killed_rollout_actor_is_replaced_and_every_step_logged_once(tiny_config, sft_path):
    cfg = tiny_config("trainer.steps=8", "eval.every=0", "tracking.image_every=0", f"model.path={sft_path}")
    client = MlflowClient(store_uri(cfg))
    thread, result = _run_in_thread(cfg)
    _wait_for(lambda: len(_steps_logged(client, cfg.tracking.experiment)) >= 2, 300, "run never reached step 2")
    names = [a["name"] if isinstance(a, dict) else a for a in ray.util.list_named_actors()]
    victim = next(n for n in names if n.startswith("omnigrpo-rollout-0-"))
    ray.kill(ray.get_actor(victim))  # by its handle, mid-run
    thread.join(timeout=300)
    assert "error" not in result, result.get("error")
    assert result["rollout_versions"] == [8]  # the replacement caught up with the learner's weights
    assert _steps_logged(client, cfg.tracking.experiment) == list(range(1, 9))
    restarts = _steps_logged(client, cfg.tracking.experiment, "fault/actor_restarts")
    run = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])[0]
    assert restarts == list(range(1, 9)) and run.data.metrics["fault/actor_restarts"] == 1.0
    # the broadcast group was re-formed with the replacement: the last sync went over it, not the object store
    # (a kill that lands during a broadcast also costs that one sync a fallback)
    assert run.data.metrics["sync/broadcast"] == 1.0 and run.data.metrics["fault/sync_fallbacks"] <= 1.0


HANGS_ONCE = """
import os, time
from pathlib import Path

def hangs_once(images, prompts, metadata):
    marker = Path(os.environ["HANG_MARKER"])
    if not marker.exists() and images.any():  # the first real call hangs (a stuck judge), not the blank dry run
        marker.write_text("hung")
        time.sleep(3600)
    return [float(im.mean()) / 255.0 for im in images]
"""


def test_a_hung_reward_call_times_out_and_is_retried_on_a_replacement(tiny_config, sft_path, tmp_path, monkeypatch):
    (tmp_path / "hang_reward.py").write_text(HANGS_ONCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("HANG_MARKER", str(tmp_path / "hung"))
    # two chunks: the hung actor also holds the second chunk's shard, which must not cost a second replacement
    cfg = tiny_config("trainer.steps=2", "eval.every=0", "eval.held_out=false", "tracking.image_every=0",
                      f"model.path={sft_path}", "cluster.call_timeout_s=8", "rollout.chunks=2",
                      "rewards=[{name: 'hang_reward:hangs_once'}]")
    thread, result = _run_in_thread(cfg)
    thread.join(timeout=300)
    assert "error" not in result, result.get("error")
    client = MlflowClient(store_uri(cfg))
    run = client.get_run(result["run_id"])
    assert run.data.metrics["fault/call_timeouts"] == 1.0 and run.data.metrics["reward/failed"] == 0
    assert run.data.metrics["fault/actor_restarts"] == 1.0
    assert _steps_logged(client, cfg.tracking.experiment) == [1, 2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_mlflow(store: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([MLFLOW, "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            cwd=store, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)

    def up() -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok
        except requests.RequestException:
            return False

    _wait_for(up, 60, "mlflow server did not come up")
    return proc


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, 9)
    proc.wait(timeout=30)


@pytest.fixture
def mlflow_store(tmp_path):
    store = tmp_path / "server"
    store.mkdir()
    yield store
    shutil.rmtree(store, ignore_errors=True)


def test_metrics_survive_a_tracking_server_outage(tiny_config, sft_path, mlflow_store):
    port = _free_port()
    server = _start_mlflow(mlflow_store, port)
    uri = f"http://127.0.0.1:{port}"
    cfg = tiny_config("trainer.steps=10", "eval.every=0", "tracking.image_every=0", f"model.path={sft_path}",
                      f"tracking.uri={uri}")
    client = MlflowClient(uri)
    thread, result = _run_in_thread(cfg)
    try:
        _wait_for(lambda: len(_steps_logged(client, cfg.tracking.experiment)) >= 2, 300, "never reached step 2")
    finally:
        _stop(server)  # the server goes away mid-run ...
    time.sleep(3)  # ... training goes on without it for a while ...
    server = _start_mlflow(mlflow_store, port)  # ... and comes back on the same store
    try:
        thread.join(timeout=300)
        assert "error" not in result, result.get("error")
        assert _steps_logged(client, cfg.tracking.experiment) == list(range(1, 11))  # none lost, none twice
        run = client.get_run(result["run_id"])
        assert run.info.status == "FINISHED" and run.data.metrics["fault/tracking_unreachable"] >= 1
    finally:
        _stop(server)
