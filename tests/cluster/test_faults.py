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


def _steps_logged(client: MlflowClient, run_id: str, key: str = "reward/total/mean") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


@pytest.mark.usefixtures("ray_cluster")
def test_a_killed_rollout_actor_is_replaced_and_every_step_logged_once(tiny_config, sft_path, plugins):
    # a weight-0 reward kills rollout actor 0 from inside the cluster while step 2 is judged (its 3rd call:
    # the step-0 evaluation, steps 1 and 2)
    cfg = tiny_config("trainer.steps=4", "eval.every=0", "tracking.image_every=0", f"model.path={sft_path}",
                      "rewards=[{name: shapes}, {name: 'saboteur:kills_a_rollout_actor', weight: 0, "
                      "kwargs: {call: 3}}]")
    summary = train(cfg)
    assert summary["rollout_versions"] == [4]  # the replacement caught up with the learner's weights
    client = MlflowClient(store_uri(cfg))
    assert _steps_logged(client, summary["run_id"]) == [1, 2, 3, 4]
    restarts = client.get_metric_history(summary["run_id"], "fault/actor_restarts")
    # killed while step 2 was judged, found and replaced by step 2's weight sync
    assert [m.value for m in sorted(restarts, key=lambda m: m.step)] == [0.0, 1.0, 1.0, 1.0]
    # the broadcast group was re-formed with the replacement: the last sync went over it, not the object store
    # (a kill that lands during a broadcast also costs that one sync a fallback)
    metrics = client.get_run(summary["run_id"]).data.metrics
    assert metrics["sync/broadcast"] == 1.0 and metrics["fault/sync_fallbacks"] <= 1.0


@pytest.mark.usefixtures("ray_cluster")
def test_a_hung_reward_call_times_out_and_is_retried_on_a_replacement(tiny_config, sft_path, tmp_path, plugins):
    # two chunks: the hung actor also holds the second chunk's shard, which must not cost a second replacement
    cfg = tiny_config("trainer.steps=2", "eval.every=0", "eval.held_out=false", "tracking.image_every=0",
                      f"model.path={sft_path}", "cluster.call_timeout_s=8", "rollout.chunks=2",
                      f"rewards=[{{name: 'hang_reward:hangs_once', kwargs: {{marker: '{tmp_path / 'hung'}'}}}}]")
    summary = train(cfg)
    assert (tmp_path / "hung").exists()
    client = MlflowClient(store_uri(cfg))
    run = client.get_run(summary["run_id"])
    assert run.data.metrics["fault/call_timeouts"] == 1.0 and run.data.metrics["reward/failed"] == 0
    assert run.data.metrics["fault/actor_restarts"] == 1.0
    assert _steps_logged(client, summary["run_id"]) == [1, 2]


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


@pytest.mark.usefixtures("ray_cluster")
def test_metrics_survive_a_tracking_server_outage(tiny_config, sft_path, mlflow_store, plugins, tmp_path):
    port = _free_port()
    server = _start_mlflow(mlflow_store, port)
    uri, gone = f"http://127.0.0.1:{port}", tmp_path / "server_gone"
    # a weight-0 reward ends the server while step 2 is judged (its 3rd call); the run goes on without it
    cfg = tiny_config("trainer.steps=8", "eval.every=0", "tracking.image_every=0", f"model.path={sft_path}",
                      f"tracking.uri={uri}", "rewards=[{name: shapes}, {name: 'saboteur:ends_a_process_group', "
                      f"weight: 0, kwargs: {{call: 3, pgid: {server.pid}, marker: '{gone}'}}}}]")
    thread, result = _run_in_thread(cfg)
    try:
        _wait_for(gone.exists, 300, "the server was never ended")
        server.wait(timeout=30)
        time.sleep(2)  # training goes on without it for a while ...
    finally:
        server = _start_mlflow(mlflow_store, port)  # ... and it comes back on the same store
    try:
        thread.join(timeout=300)
        assert "error" not in result, result.get("error")
        client = MlflowClient(uri)
        assert _steps_logged(client, result["run_id"]) == list(range(1, 9))  # none lost, none twice
        run = client.get_run(result["run_id"])
        assert run.info.status == "FINISHED" and run.data.metrics["fault/tracking_unreachable"] >= 1
    finally:
        _stop(server)
