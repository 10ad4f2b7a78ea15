"""Ray for omnigrpo: start (or join) the cluster and wrap the plain workers into actors.

Why: workers stay ordinary classes that tests drive directly; only this module knows about Ray. The
local default is a private cluster on loopback with token auth disabled (``RAY_AUTH_MODE``, which
Ray 2.60 turns on by default; a real cluster sets it to ``token`` on both sides, see README).

Placement is deliberately simple here: the stages of a step run one after another, so every actor
asks for an equal share of the cluster's CPUs and uses all cores while it works.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import ray

from omnigrpo.platform.config import Config
from omnigrpo.rewards.worker import RewardWorker
from omnigrpo.rollout.worker import RolloutWorker
from omnigrpo.trainers.learner import Learner, sampling_params

# Environment every process of a local run gets: keep Ray's sockets on loopback and auth off
# (both only when the user has not chosen otherwise).
LOCAL_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def connect(cfg: Config) -> None:
    """Join ``cluster.address`` or start a local cluster for this run (idempotent)."""
    if ray.is_initialized():
        return
    if cfg.cluster.address:
        ray.init(address=cfg.cluster.address, log_to_driver=True)
        return
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)
    ray.init(
        num_cpus=cfg.cluster.num_cpus or os.cpu_count(),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=True,
        runtime_env={"env_vars": {k: os.environ[k] for k in LOCAL_ENV}},
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Workers:
    """Handles of a run's actors."""

    rollouts: list
    reward: object
    learner: object


def spawn(cfg: Config, model_path: str, extensions_dir: str) -> Workers:
    """Create and set up every actor of a run; raises if any setup fails."""
    actors = cfg.cluster.rollout_workers + 2
    share = float(ray.cluster_resources().get("CPU", 1)) / actors
    threads = cfg.cluster.torch_threads
    env = {"runtime_env": {"env_vars": {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": extensions_dir}}}
    rollout_cls = ray.remote(RolloutWorker).options(num_cpus=share, max_concurrency=1)
    params = sampling_params(cfg)
    rollouts = [rollout_cls.remote(model_path, params, cfg.run.seed + 17 * i, threads)
                for i in range(cfg.cluster.rollout_workers)]
    reward = ray.remote(RewardWorker).options(num_cpus=share).remote(cfg.rewards)
    learner = ray.remote(Learner).options(num_cpus=share, **env).remote(cfg, model_path, free_port())
    ray.get([w.setup.remote() for w in rollouts] + [reward.setup.remote(),
            learner.setup.remote(extensions_dir, threads)])
    return Workers(rollouts=rollouts, reward=reward, learner=learner)


def generate(workers: Workers, prompts: list[str], metadata: list[dict], group_size: int, params=None):
    """Split prompts over the rollout actors and join their batches (one weight version)."""
    from omnigrpo.rollout.worker import RolloutBatch

    n = len(workers.rollouts)
    shards = [(prompts[i::n], metadata[i::n]) for i in range(n)]
    refs = [w.generate.remote(p, m, group_size, params) for w, (p, m) in zip(workers.rollouts, shards,
                                                                                strict=True) if p]
    return RolloutBatch.concat(ray.get(refs))


def sync_weights(workers: Workers, version: int) -> None:
    """Learner -> every rollout actor, through the object store (one put, shared by all readers)."""
    weights = workers.learner.state_dict.remote()
    ray.get([w.load_weights.remote(weights, version) for w in workers.rollouts])
