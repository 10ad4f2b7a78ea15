"""What every worker process sets up the same way: its random seeds and its thread count.

Why: a run's random streams must be reproducible and must never coincide (rollout actors and their
replacements, decoders, evaluation, the learner's shuffle). Each stream's seed is derived from
``run.seed`` here, by name, so no two places pick the same offset. torch is imported only inside
:func:`use_threads`, so loading a config stays light (and :func:`quiet_thread_waits` can run before it).
"""

from __future__ import annotations

import os

from omnigrpo.config.roles import Role

USER_ENV = dict(os.environ)
"""The environment as this process received it, before :func:`quiet_thread_waits` or anything else of
omnigrpo's set a variable for itself (what a user's shell gives a program; the TRL baseline runs under it)."""
ACTOR_STRIDE = {Role.ROLLOUT: 17, Role.DECODER: 31}
"""Seed distance between actors ``i`` and ``i + 1`` of a role."""
RESTART_STRIDE = 7919
"""Seed distance between an actor and its replacement (a replacement never repeats a dead actor's draws)."""
EVAL_STRIDE = 7919
"""Multiplier of ``run.seed`` for the in-run held-out evaluation streams (one per step)."""
CHECKPOINT_EVAL_OFFSET = 104729
"""Offset of ``omnigrpo eval``'s stream: it never coincides with a training run's."""
RESEED_STRIDE = 104729
"""Seed distance per weight version when a resumed sampler cannot restore its saved stream."""
SHUFFLE_OFFSET = 1000
"""Offset of the learners' mini-batch shuffle (the same on every rank)."""


def actor_seed(run_seed: int, role: Role, index: int, restart: int = 0) -> int:
    """Sampling seed of actor ``index`` of ``role`` (``rollout`` or ``decoder``) after ``restart`` replacements.

    >>> actor_seed(0, Role.ROLLOUT, 1), actor_seed(0, Role.ROLLOUT, 1, restart=1)
    (17, 7936)
    """
    return run_seed + ACTOR_STRIDE[role] * index + RESTART_STRIDE * restart


def eval_seed(run_seed: int, step: int) -> int:
    """Seed of the held-out evaluation at ``step`` of a run (it never shifts the training samples)."""
    return run_seed * EVAL_STRIDE + step


def checkpoint_eval_seed(run_seed: int) -> int:
    """Seed of ``omnigrpo eval``: the same checkpoint always gets the same report."""
    return run_seed + CHECKPOINT_EVAL_OFFSET


def reseed(seed: int, version: int) -> int:
    """A sampler's seed when resuming at weight ``version`` without its saved stream."""
    return seed + RESEED_STRIDE * version


def learner_seeds(run_seed: int, rank: int) -> tuple[int, int]:
    """(initialisation seed of this rank, shuffle seed shared by every rank)."""
    return run_seed + rank, run_seed + SHUFFLE_OFFSET


def use_threads(threads: int | None) -> int:
    """Set torch's intra-op threads to ``threads`` (0 or None: every core this process may run on, which a
    container's or ``taskset``'s CPU set limits); returns the number set."""
    import torch

    n = threads or cores()
    torch.set_num_threads(n)
    return n


def cores() -> int:
    """Cores this process may run on (its CPU affinity), not every core of the machine."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def quiet_thread_waits() -> None:
    """Let idle OpenMP threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``) unless the user chose
    (``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` set); call before torch is imported, so this process and the Ray
    workers it starts inherit it.

    Why: torch's threads spin at every barrier for some 300,000 rounds by default; on a box whose cores other
    work also uses (several actors per node, xdist workers), each parallel region then waits for a thread that the
    scheduler parked. Sleeping costs a wake-up per small op on cores a process has to itself: there a short spin
    (``export GOMP_SPINCOUNT=30000``) is faster. BENCHMARKS.md section 1 measures both ways; docs/cluster.md."""
    if "GOMP_SPINCOUNT" not in os.environ:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
