"""``omnigrpo submit``: a run shipped to a Ray head (started here, on loopback) through the Jobs API."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import PLUGINS, TINY, layered
from mlflow.tracking import MlflowClient

from omnigrpo.app.tracking import store_uri
from omnigrpo.cli import main
from omnigrpo.config.loader import load_config

RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """``ray start --head --block`` on loopback with auth off, as a user starts a head by hand, in a process
    group of its own (ended by that group's id: ``ray stop`` would end every Ray on the machine); yields the
    dashboard address."""
    # as a user starts a head: with the environment activated, so a job's `python` is this one
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    dashboard = _free_port()
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's socket paths must stay short
    head = subprocess.Popen([RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={_free_port()}",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
                             # the session's own cluster already holds the agent's default port (52365)
                             f"--dashboard-agent-listen-port={_free_port()}",
                             "--disable-usage-stats", f"--temp-dir={temp}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_until_up(address, head)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # then SIGKILL: its graceful wind-down takes half a minute
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_until_up(address: str, head: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert head.poll() is None, "ray start --head exited"
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"the Ray head at {address} did not come up within {timeout}s")


def _wait(address: str, job_id: str, capsys, timeout: float = 420.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert main(["status", job_id, "--address", address]) == 0
        state = capsys.readouterr().out.strip()
        if state in ("SUCCEEDED", "FAILED", "STOPPED"):
            return state
        time.sleep(2)
    raise TimeoutError(f"job {job_id} still running after {timeout}s")


@pytest.mark.cluster
def test_submitted_run_finishes_and_logs_to_mlflow(ray_head, sft_path, cache_dir, tmp_path, capsys, monkeypatch):
    """The run also names a prompt file by a relative path and a reward module that exists only here (not on the
    cluster's import path): both must travel with the job."""
    config = Path(__file__).parents[2] / "configs" / "shapes.yaml"
    monkeypatch.chdir(tmp_path)
    Path("prompts.txt").write_text("a red circle at the top left\na blue square at the bottom right\n"
                                   "a green triangle at the top right\na yellow circle at the bottom left\n")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "shipped_judge.py").write_text((PLUGINS / "red_reward.py").read_text())
    monkeypatch.syspath_prepend(str(tmp_path / "mine"))
    overrides = layered(TINY, [f"run.cache_dir={cache_dir}", f"run.dir={tmp_path / 'run'}", f"model.path={sft_path}",
                               "trainer.steps=2", "eval.every=0", "tracking.image_every=0", "data.prompts=prompts.txt",
                               "rewards=[{name: shapes}, {name: 'shipped_judge:redness', weight: 0.5}]"])
    assert main(["submit", str(config), "--address", ray_head, *overrides]) == 0
    listed = capsys.readouterr().out.strip().splitlines()
    job_id = listed[-1]
    assert any(line.endswith(" shipped_judge.py") for line in listed) and any(
        line.endswith(" inputs/prompts.txt") for line in listed), listed
    assert main(["logs", job_id, "--address", ray_head, "--follow"]) == 0  # streams until the job ends
    followed = capsys.readouterr().out
    state = _wait(ray_head, job_id, capsys)
    assert main(["logs", job_id, "--address", ray_head]) == 0
    logs = capsys.readouterr().out
    assert state == "SUCCEEDED", logs[-3000:]
    assert "step 2/2" in logs and "final checkpoint" in logs
    assert "step 2/2" in followed and "final checkpoint" in followed  # the whole output, as it was written

    cfg = load_config(config, overrides)
    client = MlflowClient(store_uri(cfg.tracking, cfg.run.dir))
    run = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])[0]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "reward/total/mean")]
    assert sorted(steps) == [1, 2] and run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert metrics["reward/failed"] == 0 and any("shipped_judge" in k for k in metrics), sorted(metrics)


def test_a_bad_config_is_refused_before_submission(tmp_path, capsys, monkeypatch):
    config = Path(__file__).parents[2] / "configs" / "shapes.yaml"
    # nothing listens on this address: the config error must come first
    code = main(["submit", str(config), "--address", "http://127.0.0.1:9", "trainer.stepz=2"])
    assert code == 2 and "trainer.stepz: unknown key (did you mean trainer.steps?)" in capsys.readouterr().err
    code = main(["submit", str(config), "--address", "http://127.0.0.1:9", "run.dir=runs/relative"])
    assert code == 2 and "run.dir: a submitted run needs an absolute path" in capsys.readouterr().err
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    code = main(["submit", str(config), "--address", "http://127.0.0.1:9", f"run.dir={tmp_path / 'run'}",
                 "model.family=janus", "model.path=ckpt"])
    err = capsys.readouterr().err
    assert code == 2 and "model.path: a submitted run needs a checkpoint the cluster sees" in err, err
