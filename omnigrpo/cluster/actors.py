"""Ray for omnigrpo: start (or join) the cluster and wrap the plain workers into actors.

Why: workers stay ordinary classes that tests drive directly; only this module knows about Ray. The
local default is a private cluster on loopback with token auth disabled (see
``omnigrpo.cluster.environment``; a real cluster sets ``RAY_AUTH_MODE=token`` on both sides, README).

Placement is deliberately simple here: the stages of a step run one after another, so every actor
asks for an equal share of the cluster's CPUs and uses all cores while it works.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import ray
from ray._private import ray_constants

from omnigrpo.cluster.environment import prepare_local_ray_env, wants_local_cluster
from omnigrpo.platform.config import Config
from omnigrpo.rewards.worker import RewardResult, RewardWorker
from omnigrpo.rollout.worker import RolloutBatch, RolloutWorker
from omnigrpo.trainers.learner import Learner, sampling_params

log = logging.getLogger(__name__)


def connect(cfg: Config) -> None:
    """Join ``cluster.address`` (or ``RAY_ADDRESS``) or start a local cluster for this run (idempotent)."""
    if ray.is_initialized():
        return
    if not wants_local_cluster(cfg.cluster.address):
        ray.init(address=cfg.cluster.address or None, log_to_driver=True)
        return
    env = prepare_local_ray_env(cfg.cluster.address)
    if ray_constants.ENABLE_RAY_CLUSTER:
        log.warning("Ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set; the local "
                    "cluster's sockets may listen beyond loopback (call prepare_local_ray_env first)")
    ray.init(
        num_cpus=cfg.cluster.num_cpus or os.cpu_count(),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=True,
        runtime_env={"env_vars": env},
    )


@dataclass
class Workers:
    """Handles of a run's actors."""

    rollouts: list
    rewards: list
    learner: object


def spawn(cfg: Config, model_path: str, extensions_dir: str, reference_path: str | None = None,
          resume: bool = False) -> Workers:
    """Create and set up every actor of a run; raises if any setup fails. With ``resume``, ``model_path``
    is a checkpoint and ``reference_path`` the run's starting policy."""
    actors = cfg.cluster.rollout_workers + cfg.cluster.reward_workers + 1
    share = float(ray.cluster_resources().get("CPU", 1)) / actors
    threads = cfg.cluster.torch_threads
    env = {"runtime_env": {"env_vars": {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": extensions_dir}}}
    rollout_cls = ray.remote(RolloutWorker).options(num_cpus=share, max_concurrency=1)
    params = sampling_params(cfg)
    rollouts = [rollout_cls.remote(model_path, params, cfg.run.seed + 17 * i, threads)
                for i in range(cfg.cluster.rollout_workers)]
    reward_cls = ray.remote(RewardWorker).options(num_cpus=cfg.cluster.reward_cpus or share,
                                                  num_gpus=cfg.cluster.reward_gpus)
    rewards = [reward_cls.remote(cfg.rewards) for _ in range(cfg.cluster.reward_workers)]
    learner = ray.remote(Learner).options(num_cpus=share, **env).remote(cfg, model_path,
                                                                         reference_path=reference_path)
    ray.get([w.setup.remote() for w in rollouts + rewards] + [learner.setup.remote(extensions_dir, threads, resume)])
    return Workers(rollouts=rollouts, rewards=rewards, learner=learner)


def submit_generate(workers: Workers, prompts: list[str], metadata: list[dict], group_size: int,
                    seed: int | None = None) -> list:
    """Start sampling, prompts split over the rollout actors; returns the pending parts (``seed``: sample
    from a separate stream, for evaluation)."""
    n = len(workers.rollouts)
    shards = [(prompts[i::n], metadata[i::n]) for i in range(n)]
    return [w.generate.remote(p, m, group_size, None if seed is None else seed + i)
            for i, (w, (p, m)) in enumerate(zip(workers.rollouts, shards, strict=True)) if p]


def generate(workers: Workers, prompts: list[str], metadata: list[dict], group_size: int,
             seed: int | None = None) -> RolloutBatch:
    """Sample and wait: one batch, one weight version."""
    return RolloutBatch.concat(ray.get(submit_generate(workers, prompts, metadata, group_size, seed)))


def submit_score(workers: Workers, batch: RolloutBatch) -> list:
    """Start judging: the batch's images in consecutive shards, one per reward actor; returns the pending
    parts, in order."""
    n = len(batch.prompts)
    bounds = np.linspace(0, n, len(workers.rewards) + 1).astype(int)
    return [w.score.remote(batch.images[a:b], batch.prompts[a:b], batch.metadata[a:b])
            for w, a, b in zip(workers.rewards, bounds[:-1], bounds[1:], strict=True) if b > a]


def score(workers: Workers, batch: RolloutBatch) -> RewardResult:
    """Judge and wait."""
    return RewardResult.concat(ray.get(submit_score(workers, batch)))


def generate_and_score(workers: Workers, prompts: list[str], metadata: list[dict], group_size: int,
                       chunks: int, timings: dict[str, float]) -> tuple[RolloutBatch, RewardResult]:
    """One step's rollout in ``chunks`` pieces, each judged while the next one samples.

    All pieces use the same weights, so the step stays on-policy; only reward time is hidden behind
    sampling. ``timings`` gets ``timing/rollout_s`` (until the last piece is sampled) and
    ``timing/reward_s`` (judging left after that).
    """
    start = time.perf_counter()
    pieces = [p for p in np.array_split(np.arange(len(prompts)), chunks) if len(p)]
    take = lambda idx: ([prompts[i] for i in idx], [metadata[i] for i in idx])  # noqa: E731
    pending = submit_generate(workers, *take(pieces[0]), group_size)
    batches, judged = [], []
    for k in range(len(pieces)):
        batches.append(RolloutBatch.concat(ray.get(pending)))
        if k + 1 < len(pieces):
            pending = submit_generate(workers, *take(pieces[k + 1]), group_size)
        judged.append(submit_score(workers, batches[-1]))
    timings["timing/rollout_s"] = time.perf_counter() - start
    results = [RewardResult.concat(ray.get(refs)) for refs in judged]
    timings["timing/reward_s"] = time.perf_counter() - start - timings["timing/rollout_s"]
    return RolloutBatch.concat(batches), RewardResult.concat(results)


def sync_weights(workers: Workers, version: int) -> None:
    """Learner -> every rollout actor, through the object store (one put, shared by all readers)."""
    weights = workers.learner.state_dict.remote()
    ray.get([w.load_weights.remote(weights, version) for w in workers.rollouts])
