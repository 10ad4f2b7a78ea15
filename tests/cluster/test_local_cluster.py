"""The local cluster a run starts listens on loopback only, and its actors get the CPUs they ask for."""

import ipaddress
import os

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
    actors.connect(cfg)
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
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert not wants_local_cluster("ray://head:10001")
    assert "RAY_AUTH_MODE" not in prepare_local_ray_env("ray://head:10001")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert prepare_local_ray_env("")["RAY_AUTH_MODE"] == "token"  # the user's choice wins
