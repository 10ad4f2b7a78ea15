"""Ray for omnigrpo: start (or join) the cluster and wrap the plain workers into actors.

Why: workers stay ordinary classes that tests drive directly; only this module knows about Ray. The local default
is a private cluster on loopback that admits only its owner (``omnigrpo.cluster.environment``; docs/security.md).
Actors are placed by ``omnigrpo.cluster.placement`` in one placement group per run; a rollout or reward actor that
dies is replaced in its bundle and its shard retried (``omnigrpo.cluster.shards``), up to ``cluster.max_restarts``.
Under ``cluster.placement: hybrid`` the learner ranks are the rollout pool and :func:`sync_weights` sends nothing
(docs/design.md, "Hybrid placement").
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import ray
from ray._private import ray_constants

from omnigrpo.cluster import placement
from omnigrpo.cluster.environment import local_cluster_home, prepare_local_ray_env, private_dir, wants_local_cluster
from omnigrpo.cluster.weights import WeightSync
from omnigrpo.config.loader import ConfigError
from omnigrpo.config.roles import Role
from omnigrpo.config.runtime import actor_seed
from omnigrpo.config.schema import ClusterConfig, Config
from omnigrpo.rewards.worker import DryRun, JudgeStartError, RewardWorker
from omnigrpo.rollout.families.diffusion import DiffusionDecoder
from omnigrpo.rollout.worker import RolloutWorker
from omnigrpo.sync.network import LOOPBACK, is_loopback
from omnigrpo.trainers.batch import TrainBatch, Update
from omnigrpo.trainers.hybrid import HybridLearner
from omnigrpo.trainers.learner import Learner
from omnigrpo.trainers.tally import merge_ranks

log = logging.getLogger(__name__)


def connect(cluster: ClusterConfig) -> None:
    """Join ``cluster.address`` (or ``RAY_ADDRESS``) or start a local cluster for this run (idempotent)."""
    if ray.is_initialized():
        return
    if not wants_local_cluster(cluster.address):
        ray.init(address=cluster.address or None, log_to_driver=True)
        return
    env = prepare_local_ray_env(cluster.address)
    if env.get("RAY_AUTH_MODE", "").lower() == "disabled":
        log.warning("RAY_AUTH_MODE=disabled in this environment: the local cluster admits any local process; unset "
                    "it to let omnigrpo make a token for the cluster (docs/security.md)")
    if ray_constants.ENABLE_RAY_CLUSTER:
        log.warning("Ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set; the local "
                    "cluster's sockets may listen beyond loopback (call prepare_local_ray_env first)")
    ray.init(
        address="local",  # a new cluster, even where another one (`ray start`) runs on this machine
        num_cpus=cluster.num_cpus or os.cpu_count(),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        _temp_dir=str(local_cluster_home() / "ray"),  # its sockets and logs, readable by this user only
        log_to_driver=True,
        runtime_env={"env_vars": env},
    )


@dataclass
class Workers:
    """Handles of a run's actors, and what it takes to replace a rollout or reward actor that died."""

    rollouts: list
    rewards: list
    learners: list
    """The DeepSpeed data-parallel group, rank 0 first."""
    cfg: Config
    model_path: str
    placement: placement.Placement
    decoders: list = dataclasses.field(default_factory=list)
    """Diffusion-decoder actors (empty: rollout actors decode with the policy's VQ decoder)."""
    sync: WeightSync | None = None
    """Where the rollout actors' weights stand and how the next sync travels (``omnigrpo.cluster.weights``)."""
    rng_states: list = dataclasses.field(default_factory=list)
    """Each rollout actor's sampling-generator state after its latest batch (None: nothing drawn yet, its
    seeded stream), kept as batches arrive (``omnigrpo.cluster.shards``) for the run state."""
    restarts: int = 0
    """Actors replaced so far in this run (logged as ``fault/actor_restarts``)."""
    timeouts: int = 0
    """Reward / decoder calls that exceeded ``cluster.call_timeout_s`` (``fault/call_timeouts``)."""
    where: dict = dataclasses.field(default_factory=dict)
    """``(role, index) -> node address`` the actors' sockets bind across hosts; empty on loopback."""
    meeting: Path | None = None
    """An owner-only folder in ``run.dir`` where the learner and weight groups' file stores meet on one machine
    (removed with the run: :func:`release`)."""

    def __post_init__(self):
        self.sync = self.sync or WeightSync(self.cfg.cluster, self.cfg.trainer.zero_stage, self.meeting)
        self.rng_states = self.rng_states or [None] * len(self.rollouts)

    @property
    def hybrid(self) -> bool:
        """The learner ranks sample (``cluster.placement: hybrid``): no rollout actors, no weight sync."""
        return self.cfg.cluster.placement == "hybrid"

    @property
    def learner(self):
        """Rank 0 of the learner group."""
        return self.learners[0]

    def pool(self, role: Role) -> list:
        """The actors of ``role`` (rollout, decoder or reward), by index."""
        return {Role.ROLLOUT: self.rollouts, Role.DECODER: self.decoders, Role.REWARD: self.rewards}[role]


def spawn(cfg: Config, model_path: str, extensions_dir: str, reference_path: str | None = None,
          resume: bool = False, dry_run: DryRun | None = None) -> Workers:
    """Create and set up every actor of a run; raises if any setup fails, as ConfigError when a reward could not
    be built or failed its ``dry_run`` in its actor. With ``resume``, ``model_path`` is a checkpoint and
    ``reference_path`` the run's starting policy."""
    # fails naming the role and shortfall before any model loads
    plan = placement.build(cfg.cluster, cfg.actor_counts, cfg.trainer.max_staleness)
    accelerator = "cuda" if cfg.cluster.learner_gpus else "cpu"
    env = {"runtime_env": {"env_vars": {"DS_ACCELERATOR": accelerator, "TORCH_EXTENSIONS_DIR": extensions_dir}}}
    hybrid = cfg.cluster.placement == "hybrid"
    rollouts = [_rollout_actor(cfg, model_path, i, plan) for i in range(cfg.actor_counts[Role.ROLLOUT])]
    rewards = [_reward_actor(cfg, i, plan) for i in range(cfg.cluster.reward_workers)]
    decoders = [_decoder_actor(cfg, i, plan) for i in range(cfg.cluster.decoder_workers if cfg.decoder.path else 0)]
    size, where = cfg.cluster.learner_workers, bind_addresses(plan)
    learner_cls = ray.remote(HybridLearner if hybrid else Learner)
    shared = {"seed": cfg.run.seed, "sync_timeout_s": cfg.cluster.sync_timeout_s, "world_size": size,
              "reference_path": reference_path, **({"decode": not cfg.decoder.path} if hybrid else {})}
    learners = [learner_cls.options(**plan.options(Role.LEARNER, rank), **env).remote(
        cfg.trainer, cfg.model, cfg.rollout, model_path, rank=rank, address=where.get((Role.LEARNER, rank), LOOPBACK),
        **shared) for rank in range(size)]
    workers = Workers(rollouts=learners if hybrid else rollouts, rewards=rewards, learners=learners, cfg=cfg,
                      model_path=model_path, placement=plan, decoders=decoders, where=where,
                      meeting=private_dir(cfg.run.dir))
    try:  # a run that cannot start frees what it reserved (a joined cluster lives on)
        rendezvous = learner_rendezvous(workers)
        calls = {w.setup.remote(dry_run): f"reward actor {i}" for i, w in enumerate(rewards)}
        calls.update({w.setup.remote(): f"rollout actor {i}" for i, w in enumerate(rollouts)})
        calls.update({w.setup.remote(): f"decoder actor {i}" for i, w in enumerate(decoders)})
        calls.update({learner.setup.remote(extensions_dir, plan.threads(Role.LEARNER), resume, rendezvous):
                      f"learner rank {rank}" for rank, learner in enumerate(learners)})
        try:
            await_setup(calls, cfg.cluster.setup_timeout_s)
        except JudgeStartError as err:  # Ray's error is also an instance of the actor's exception class
            raise ConfigError(str(getattr(err, "cause", None) or err)) from None
        if cfg.cluster.weight_sync == "broadcast" and not hybrid:
            workers.sync.join(learners, rollouts, where)
    except BaseException:
        release(workers)
        raise
    return workers


def await_setup(calls: dict, timeout: float) -> None:
    """Wait for every setup call (``{ref: what it sets up}``) up to ``timeout`` seconds (0: forever); raise the
    first failure, or a ConfigError naming every actor still setting up."""
    _, pending = ray.wait(list(calls), num_returns=len(calls), timeout=timeout or None)
    if pending:
        raise ConfigError(f"cluster.setup_timeout_s: {', '.join(calls[ref] for ref in pending)} did not finish "
                          f"setting up within {timeout:g} s (a model that loads slowly, or a judge stuck in its "
                          "dry run); the run's actors are stopped")
    ray.get(list(calls))


def placement_tags(workers: Workers) -> dict[str, str]:
    """Where each role's actors run, as run tags: ``placement/<role>`` = their node addresses in index order
    (comma-separated; a replacement may land elsewhere later)."""
    where: dict[str, list[str]] = {}
    for (role, _index), address in sorted(workers.placement.addresses().items()):
        where.setdefault(role, []).append(address)
    return {f"placement/{role}": ",".join(addresses) for role, addresses in where.items()}


def bind_addresses(plan: placement.Placement) -> dict[tuple[str, int], str]:
    """Where each actor's sockets bind: nothing (loopback) on a cluster whose nodes are all on loopback,
    else the address Ray reports for the actor's node."""
    where = plan.addresses()
    return {} if all(is_loopback(a) for a in where.values()) else where


def learner_rendezvous(workers: Workers) -> str | None:
    """Where the learner group meets: none for one rank; a file in the run's owner-only folder on one machine;
    across hosts, the TCP store rank 0 serves on its node address."""
    learners = workers.learners
    if len(learners) == 1:
        return None
    if workers.where:
        return ray.get(learners[0].serve.remote("learners", len(learners), workers.cfg.cluster.sync_timeout_s))
    return str(workers.meeting / "learners")


def train_step(workers: Workers, batch: TrainBatch) -> Update:
    """One update on every learner rank (each takes its share of ``batch``), merged over the ranks."""
    return merge_ranks(ray.get([learner.train_step.remote(batch) for learner in workers.learners]))


def save_checkpoint(workers: Workers, root: str, step: int | None, name: str, run_state: dict | None = None) -> str:
    """Every learner rank writes its part; rank 0 publishes ``root/{name}-{step}``; returns its path."""
    return ray.get([learner.save_checkpoint.remote(root, step, name, run_state) for learner in workers.learners])[0]


def release(workers: Workers) -> None:
    """Stop every actor of the run and free its placement group (for callers that keep Ray running)."""
    from ray.util.placement_group import remove_placement_group

    for actor in ([] if workers.hybrid else workers.rollouts) + workers.rewards + workers.decoders + workers.learners:
        ray.kill(actor)
    remove_placement_group(workers.placement.group)
    leave(workers)


def leave(workers: Workers) -> None:
    """Remove the run's meeting folder (its file stores): nothing of the groups stays in ``run.dir``."""
    if workers.meeting is not None:
        shutil.rmtree(workers.meeting, ignore_errors=True)


def _rollout_actor(cfg: Config, model_path: str, index: int, plan: placement.Placement, restart: int = 0):
    """Rollout actor ``index`` (named ``omnigrpo-rollout-<index>-<random>`` so users and tests can find it);
    a replacement samples from a new seed."""
    name = f"omnigrpo-rollout-{index}-{secrets.token_hex(4)}"
    cls = ray.remote(RolloutWorker).options(max_concurrency=1, name=name, **plan.options(Role.ROLLOUT, index))
    seed = actor_seed(cfg.run.seed, Role.ROLLOUT, index, restart)
    return cls.remote(**RolloutWorker.arguments(cfg.rollout, cfg.model, model_path, seed, plan.threads(Role.ROLLOUT),
                                                decode=not cfg.decoder.path,
                                                release=cfg.cluster.placement == "colocated"))


def _decoder_actor(cfg: Config, index: int, plan: placement.Placement, restart: int = 0):
    cls = ray.remote(DiffusionDecoder).options(**plan.options(Role.DECODER, index))
    seed = actor_seed(cfg.run.seed, Role.DECODER, index, restart)
    return cls.remote(**DiffusionDecoder.arguments(cfg.decoder, seed, plan.threads(Role.DECODER)))


def _reward_actor(cfg: Config, index: int, plan: placement.Placement):
    cls = ray.remote(RewardWorker).options(**plan.options(Role.REWARD, index))
    return cls.remote(cfg.rewards, cfg.cluster.reward_output_kb)


class RoleLost(RuntimeError):
    """An actor died and is not replaced: a learner rank, or any actor once ``cluster.max_restarts`` are used up."""


def replace_actor(workers: Workers, role: Role, index: int, err: Exception) -> None:
    """Start a fresh actor in place of a dead one (a rollout replacement gets the current weights), or raise
    :class:`RoleLost` (naming the role and ``err``) once ``cluster.max_restarts`` replacements are used up."""
    last = str(getattr(err, "cause", None) or err).strip().splitlines()
    last = last[0][:300] if last else type(err).__name__
    if role == Role.ROLLOUT and workers.hybrid:
        raise RoleLost(f"learner rank {index} died while sampling (hybrid placement: a learner rank is not "
                       f"replaced); its last error: {last}") from err
    if workers.restarts >= workers.cfg.cluster.max_restarts:
        raise RoleLost(f"{role} actor {index} died and the run already replaced {workers.restarts} actor(s), "
                       f"cluster.max_restarts = {workers.cfg.cluster.max_restarts}; its last error: {last}") from err
    workers.restarts += 1
    log.warning("%s actor %d died; starting a replacement (%d so far)", role, index, workers.restarts)
    if role == Role.ROLLOUT:
        workers.sync.lost_member()
        actor = _rollout_actor(workers.cfg, workers.model_path, index, workers.placement, workers.restarts)
        ray.get(actor.setup.remote())
        ray.get(actor.load_weights.remote(workers.sync.ref(workers.learners), workers.sync.version))
        workers.rng_states[index] = ray.get(actor.rng_state.remote())  # the replacement's fresh stream
    elif role == Role.DECODER:
        actor = _decoder_actor(workers.cfg, index, workers.placement, workers.restarts)
        ray.get(actor.setup.remote())
    else:
        actor = _reward_actor(workers.cfg, index, workers.placement)
        ray.get(actor.setup.remote())
    workers.pool(role)[index] = actor


def sync_weights(workers: Workers, version: int, resend: bool = False) -> None:
    """Learner -> every rollout actor (``omnigrpo.cluster.weights``); a rollout actor that died while loading
    is replaced, and the replacement loads the new weights itself."""
    if workers.sync.must_reform:  # a replacement may sit on another node than its predecessor
        workers.where = bind_addresses(workers.placement)
    for index, err in workers.sync.send(workers.learners, workers.rollouts, version, workers.where, resend):
        replace_actor(workers, Role.ROLLOUT, index, err)
