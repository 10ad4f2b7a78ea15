"""Faults a long run meets: a rollout actor killed mid-run, a tracking server that goes away and comes back, a disk
that fills up while a checkpoint is written."""

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
import yaml
from mlflow.tracking import MlflowClient

from omnigrpo.app.driver import train
from omnigrpo.app.tracking import store_uri
from omnigrpo.cli import main
from omnigrpo.config.loader import to_dict
from omnigrpo.trainers.checkpoint import latest_resumable, unsafe_contents

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
    client = MlflowClient(store_uri(cfg.tracking, cfg.run.dir))
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
    client = MlflowClient(store_uri(cfg.tracking, cfg.run.dir))
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


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A 24 MB tmpfs of this test's own (as root), unmounted after it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.usefixtures("ray_cluster")
def test_a_full_disk_while_checkpointing_is_one_line_and_the_last_checkpoint_stands(tiny_config, sft_path, plugins,
                                                                                     small_disk, tmp_path, capsys):
    # the disk fills up while step 2 is judged: step 1's checkpoint is on it, step 2's cannot be written
    cfg = tiny_config("trainer.steps=3", "trainer.save_every=1", "eval.held_out=false", "tracking.image_every=0",
                      f"model.path={sft_path}", f"run.dir={small_disk / 'run'}",
                      "rewards=[{name: shapes}, {name: 'saboteur:fills_a_disk', weight: 0, "
                      f"kwargs: {{call: 2, path: '{small_disk / 'filler'}'}}}}]")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    assert main(["train", str(config)]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("omnigrpo:")]
    assert len(lines) == 1 and "No space left on device" in lines[0], err
    assert "step-000001, is intact (resume with --resume)" in lines[0], err
    assert "Traceback" not in err, err
    (checkpoints,) = (small_disk / "run" / "checkpoints").iterdir()
    assert not [p.name for p in checkpoints.iterdir() if p.name.startswith(".")]  # no staging folder left
    step = checkpoints / "step-000001"
    assert latest_resumable(checkpoints.parent) in (step, *checkpoints.glob("crash-*")) and unsafe_contents(step) == []
    assert (step / "model.safetensors").stat().st_size > 0 and (step / "run_state.pt").exists()
