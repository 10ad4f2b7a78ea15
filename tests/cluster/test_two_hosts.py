"""A run over two hosts with addresses of their own: two network namespaces joined by a veth pair, a Ray head in
one and a worker in the other (token authentication on), an MLflow server, and the driver inside a namespace.

Split placement puts one learner rank, one rollout and one reward actor on each host; the learner group and the
weight broadcast meet at TCP stores on the learner's node address and bind the hosts' own addresses; the rollout
on the other host dies mid-run and is replaced (one run shows both: its start-up is most of the cost). Every
process the test starts runs in a process group of its own and is stopped by that group's id; the namespaces
are deleted after. Traffic goes only to the test's own addresses.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PLUGINS, TINY, layered
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent
RAY_PORT, MLFLOW_PORT = 6379, 5000
SPLIT = ["cluster.placement=split", "cluster.learner_workers=2", "cluster.learner_cpus=2.5",
         "cluster.rollout_workers=2", "cluster.rollout_cpus=1", "cluster.reward_workers=2", "cluster.reward_cpus=0.5",
         "cluster.torch_threads=1", "eval.every=0", "tracking.image_every=0"]  # 4 CPUs a host: one of each per host


def _own_networks() -> list[ipaddress.IPv4Network]:
    out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=True).stdout
    return [ipaddress.ip_interface(line.split()[3]).network for line in out.splitlines()]


def _test_network() -> ipaddress.IPv4Network:
    """A /24 of a private range that overlaps none of this machine's interfaces."""
    taken = _own_networks()
    for k in range(200, 250):
        net = ipaddress.ip_network(f"10.{k}.{os.getpid() % 250}.0/24")
        if not any(net.overlaps(t) for t in taken):
            return net
    raise RuntimeError("no free private test range")


def _namespaces_possible() -> str:
    """Why two namespaces cannot be made here ('' if they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing"
    probe = f"ogp{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


class Hosts:
    """Two namespaces ``a`` and ``b`` joined by a veth pair, and the process groups started in them."""

    def __init__(self, tmp: Path):
        tag = f"og{os.getpid() % 100000}"
        self.ns = {"a": f"{tag}a", "b": f"{tag}b"}
        net = _test_network()
        self.address = {"a": str(net[1]), "b": str(net[2])}
        self.prefix = net.prefixlen
        self.tmp = tmp
        self.groups: list[subprocess.Popen] = []
        token = tmp / "ray_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(PLUGINS), os.environ.get("PYTHONPATH")]))}
        for key in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
            self.env.pop(key, None)

    def up(self) -> None:
        a, b = self.ns["a"], self.ns["b"]
        for cmd in (["netns", "add", a], ["netns", "add", b], ["link", "add", a, "type", "veth", "peer", "name", b],
                    ["link", "set", a, "netns", a], ["link", "set", b, "netns", b]):
            subprocess.run(["ip", *cmd], check=True, capture_output=True)
        for side in ("a", "b"):
            ns, dev = self.ns[side], self.ns[side]
            for cmd in (["addr", "add", f"{self.address[side]}/{self.prefix}", "dev", dev], ["link", "set", dev, "up"],
                        ["link", "set", "lo", "up"]):
                subprocess.run(["ip", "-n", ns, *cmd], check=True, capture_output=True)

    def start(self, side: str, argv: list[str], log: str) -> subprocess.Popen:
        """``argv`` inside namespace ``side``, in a process group of its own, output to ``tmp/log``."""
        with open(self.tmp / log, "w") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", self.ns[side], *argv], env=self.env, cwd=ROOT,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.groups.append(proc)
        return proc

    def run(self, side: str, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns[side], *argv], env=self.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)

    def wait_for(self, log: str, text: str, proc: subprocess.Popen, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in (self.tmp / log).read_text(errors="replace"):
                return
            assert proc.poll() is None, (self.tmp / log).read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        raise TimeoutError(f"{log}: no {text!r} within {timeout}s")

    def down(self) -> None:
        live = [p for p in reversed(self.groups) if p.poll() is None]  # an exited group's id may be reused
        for proc in live:  # SIGTERM to the whole group, then SIGKILL what is left (`ray start --block` takes
            _signal_group(proc, signal.SIGTERM)  # half a minute to wind down; nothing of it needs to be kept)
        deadline = time.monotonic() + 5
        for proc in live:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
        for ns in self.ns.values():
            for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)  # anything left inside the test's own namespaces
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """Ray head + MLflow server on host a, a Ray worker on host b; yields the running :class:`Hosts`."""
    why = _namespaces_possible()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"two-host test cannot run under CI: {why}")
        pytest.skip(why)
    h = Hosts(tmp_path_factory.mktemp("hosts"))
    try:
        h.up()
        a, b = h.address["a"], h.address["b"]
        ray = str(BIN / "ray")
        head = h.start("a", [ray, "start", "--head", "--block", f"--node-ip-address={a}", f"--port={RAY_PORT}",
                             "--num-cpus=4", "--disable-usage-stats", "--include-dashboard=false",
                             f"--temp-dir={Path('/tmp') / ('r' + h.ns['a'])}"], "head.log")
        h.wait_for("head.log", "Ray runtime started", head)
        worker = h.start("b", [ray, "start", "--block", f"--address={a}:{RAY_PORT}", f"--node-ip-address={b}",
                               "--num-cpus=4", "--disable-usage-stats",
                               f"--temp-dir={Path('/tmp') / ('r' + h.ns['b'])}"], "worker.log")
        h.wait_for("worker.log", "Ray runtime started", worker)
        mlflow = h.start("a", [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{h.tmp / 'mlflow.db'}",
                               "--artifacts-destination", str(h.tmp / "artifacts"), "--host", a,
                               "--port", str(MLFLOW_PORT), "--workers", "1"], "mlflow.log")
        h.wait_for("mlflow.log", "Uvicorn running", mlflow, timeout=120)
        yield h
    finally:
        h.down()
        for side in ("a", "b"):
            shutil.rmtree(Path("/tmp") / ("r" + h.ns[side]), ignore_errors=True)


def _train(h: Hosts, sft_path: Path, cache_dir: Path, run_dir: Path, experiment: str, steps: int,
           extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    argv = [str(BIN / "omnigrpo"), "train", "configs/shapes.yaml", *layered(TINY, SPLIT), f"run.cache_dir={cache_dir}",
            f"run.dir={run_dir}", f"model.path={sft_path}", f"trainer.steps={steps}",
            f"cluster.address={h.address['a']}:{RAY_PORT}", f"tracking.uri=http://{h.address['a']}:{MLFLOW_PORT}",
            f"tracking.experiment={experiment}", *extra]
    return h.run("a", argv, timeout=900)


def _run(h: Hosts, experiment: str):
    client = MlflowClient(f"sqlite:///{h.tmp / 'mlflow.db'}")  # the server's own store, read from this host
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return client, (runs[0] if runs else None)


def _history(client: MlflowClient, run, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


@pytest.mark.cluster
def test_a_run_over_two_hosts_broadcasts_across_them_and_outlives_the_other_hosts_rollout(hosts, sft_path, cache_dir,
                                                                                          tmp_path):
    """The weights reach the rollouts by broadcast across the hosts; at step 3 a weight-0 reward kills the rollout
    actor on host b (its 4th call: the step-0 evaluation, steps 1, 2 and 3), and the run replaces it and finishes,
    every step logged once."""
    a, b = hosts.address["a"], hosts.address["b"]
    steps, marker = 6, tmp_path / "killed"
    killer = ("rewards=[{name: shapes}, {name: 'saboteur:kills_the_rollout_on', weight: 0, "
              f"kwargs: {{call: 4, address: '{b}', marker: '{marker}'}}}}]")
    # the learner's broadcast to the dead member fails after cluster.sync_timeout_s; keep that short here
    done = _train(hosts, sft_path, cache_dir, tmp_path / "run", "two-hosts", steps,
                  extra=("cluster.sync_timeout_s=15", killer))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert marker.read_text().startswith("omnigrpo-rollout-")
    client, run = _run(hosts, "two-hosts")
    tags = run.data.tags  # from Ray's placement group: the node of every actor's bundle
    assert sorted(tags["placement/learner"].split(",")) == [a, b]  # one learner rank on each host
    assert sorted(tags["placement/rollout"].split(",")) == [a, b]  # so a rollout is on another host than rank 0
    assert _history(client, run, "sync/broadcast")[:2] == [(1, 1.0), (2, 1.0)]  # before the kill
    assert _history(client, run, "fault/sync_fallbacks")[:2] == [(1, 0.0), (2, 0.0)]
    assert [s for s, _ in _history(client, run, "reward/total/mean")] == list(range(1, steps + 1))  # each once
    restarts = _history(client, run, "fault/actor_restarts")
    assert restarts[-1][1] == 1.0 and min(s for s, v in restarts if v == 1.0) < steps, restarts  # mid-run
    assert run.info.status == "FINISHED" and run.data.params["cluster.address"] == f"{a}:{RAY_PORT}"
