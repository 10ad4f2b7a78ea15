"""The local cluster a run starts listens on loopback only and admits only its owner."""

import ipaddress
import os
import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import ray

from omnigrpo.cluster import actors
from omnigrpo.cluster.environment import prepare_local_ray_env, wants_local_cluster


@pytest.mark.usefixtures("ray_cluster")  # started as a run starts its own (actors.connect)
def test_every_socket_of_a_run_is_on_loopback(tiny_config, sft_path):
    # Every process of a run: this driver, Ray's own processes and the rollout, reward and learner
    # actors (the learner has joined its DeepSpeed process group).
    cfg = tiny_config()
    actors.connect(cfg.cluster)
    workers = actors.spawn(cfg, str(sft_path), os.environ["TORCH_EXTENSIONS_DIR"])
    try:
        ray.get(workers.learner.state_dict.remote())
        me = psutil.Process()
        listening = []
        for proc in [me, *me.children(recursive=True)]:
            try:
                listening += [c.laddr for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
            except psutil.Error:
                continue
        assert len(listening) > 5, "found too few Ray sockets to check"
        outside = [a for a in listening if not _loopback(a.ip)]
        assert not outside, f"listening beyond loopback: {outside}"
    finally:
        actors.release(workers)


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or addr).is_loopback


def test_joining_a_cluster_leaves_the_environment_alone(monkeypatch):
    """A cluster the user names keeps the user's settings; a local one gets token auth unless the user chose."""
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert not wants_local_cluster("ray://head:10001")
    assert "RAY_AUTH_MODE" not in prepare_local_ray_env("ray://head:10001")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert prepare_local_ray_env("")["RAY_AUTH_MODE"] == "token"  # the user's choice wins


JOIN = "import ray; ray.init(address={address!r}); print('JOINED'); print(ray.get(ray.remote(lambda: 'RAN').remote()))"


@pytest.mark.usefixtures("ray_cluster")  # started as a run starts its own (actors.connect)
def test_the_local_cluster_admits_only_its_owner(tmp_path):
    token_path = Path(os.environ["RAY_AUTH_TOKEN_PATH"])
    home, token = token_path.parent, token_path.read_text()
    assert stat.S_IMODE(home.stat().st_mode) == 0o700 and stat.S_IMODE(token_path.stat().st_mode) == 0o600
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    assert session.is_relative_to(home) and len(token) == 64
    code = JOIN.format(address=ray.get_runtime_context().gcs_address)
    stranger = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN")} | {"HOME": str(tmp_path)}
    stranger["RAY_gcs_rpc_server_connect_timeout_s"] = "5"  # how long a stranger retries: its own choice
    tries = {"auth off": {**stranger, "RAY_AUTH_MODE": "disabled"}, "no token": {**stranger, "RAY_AUTH_MODE": "token"},
             "a wrong token": {**stranger, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64},
             "the owner": dict(os.environ)}
    runs = {who: subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for who, env in tries.items()}
    out = {who: run.communicate(timeout=180)[0] for who, run in runs.items()}
    for who in ("auth off", "no token", "a wrong token"):
        assert runs[who].returncode != 0 and "JOINED" not in out[who] and "RAN" not in out[who], (who, out[who][-800:])
    assert runs["the owner"].returncode == 0 and "RAN" in out["the owner"], out["the owner"][-800:]
    logged = subprocess.run(["grep", "-rl", token, str(session)], capture_output=True, text=True).stdout
    assert not logged and not any(token in text for text in out.values()), logged
