"""A step's work sharded over a role's actors, gathered in order, with dead or hung actors replaced.

Why: sampling, painting and judging a batch are the same pattern three times: split the batch over the
role's actors, submit, collect in order, and when an actor died (or a reward or decoder call hung past
``cluster.call_timeout_s``) replace it (``omnigrpo.cluster.actors.replace_actor``) and resubmit its shard.
Rollout chunks overlap with judging: :func:`generate_and_score` judges one piece while the next one samples.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import ray

from omnigrpo.cluster.actors import Workers, replace_actor
from omnigrpo.cluster.weights import DEAD
from omnigrpo.config.roles import Role
from omnigrpo.rewards.worker import RewardResult
from omnigrpo.rollout.worker import RolloutBatch

log = logging.getLogger(__name__)


@dataclass
class Pending:
    """A submitted shard: the actor's slot and handle, the call that submits it to an actor (repeated on a
    replacement), and its result ref."""

    index: int
    actor: object
    call: Callable[[object], ray.ObjectRef]
    ref: ray.ObjectRef | None = None

    def __post_init__(self):
        if self.ref is None:
            self.ref = self.call(self.actor)


def collect(workers: Workers, role: Role, pending: list[Pending]) -> list:
    """Results of submitted shards, in order; a shard whose actor died, or (reward, decoder) hung past
    ``cluster.call_timeout_s``, is retried on a replacement. An actor that several pending shards were
    sent to (``rollout.chunks`` > 1) is replaced once: the later shards find its slot already holding the
    replacement and are only resubmitted. A rollout batch's generator state is kept as its actor's latest."""
    out = []
    timeout = (workers.cfg.cluster.call_timeout_s or None) if role in (Role.REWARD, Role.DECODER) else None
    pool = workers.pool(role)
    for item in pending:
        while True:
            try:
                out.append(ray.get(item.ref, timeout=timeout))
                break
            except ray.exceptions.GetTimeoutError as err:
                if pool[item.index] is item.actor:
                    workers.timeouts += 1
                    log.warning("%s actor %d did not answer within %g s: killing it", role, item.index, timeout)
                    ray.kill(item.actor)
                    replace_actor(workers, role, item.index, err)
            except DEAD as err:
                if pool[item.index] is item.actor:
                    replace_actor(workers, role, item.index, err)
            item.actor = pool[item.index]  # reached only once the slot holds a live replacement
            item.ref = item.call(item.actor)
        if role == Role.ROLLOUT:
            workers.rng_states[item.index] = out[-1].rng_state
    return out


def submit_decode(workers: Workers, batch: RolloutBatch) -> list:
    """Start painting the batch's codes on the decoder pool, in consecutive shards (none without a pool)."""
    bounds = np.linspace(0, len(batch.prompts), len(workers.decoders) + 1).astype(int)
    pending = []
    for i, (w, a, b) in enumerate(zip(workers.decoders, bounds[:-1], bounds[1:], strict=True)):
        if b > a:
            codes = batch.codes[a:b]
            pending.append(Pending(i, w, lambda actor, codes=codes: actor.decode.remote(codes, batch.grid)))
    return pending


def painted(workers: Workers, batch: RolloutBatch, pending: list) -> RolloutBatch:
    """The batch with the decoder pool's images (unchanged when the rollout actors decoded)."""
    if not workers.decoders:
        return batch
    return dataclasses.replace(batch, images=np.concatenate(collect(workers, Role.DECODER, pending)))


def submit_generate(workers: Workers, prompts: list[str], metadata: list[dict], group_size: int,
                    seed: int | None = None) -> list:
    """Start sampling, prompts split over the rollout actors; returns the pending parts (``seed``: sample
    from a separate stream, for evaluation)."""
    n = len(workers.rollouts)
    pending = []
    for i, w in enumerate(workers.rollouts):
        args = (prompts[i::n], metadata[i::n], group_size, None if seed is None else seed + i)
        if args[0]:
            pending.append(Pending(i, w, lambda actor, args=args: actor.generate.remote(*args)))
    return pending


def generate(workers: Workers, prompts: list[str], metadata: list[dict], group_size: int,
             seed: int | None = None) -> RolloutBatch:
    """Sample (and paint, with a decoder pool) and wait: one batch, one weight version."""
    batch = RolloutBatch.concat(collect(workers, Role.ROLLOUT, submit_generate(workers, prompts, metadata, group_size,
                                                                            seed)))
    return painted(workers, batch, submit_decode(workers, batch))


def submit_score(workers: Workers, batch: RolloutBatch) -> list:
    """Start judging: the batch's images in consecutive shards, one per reward actor; returns the pending
    parts, in order."""
    n = len(batch.prompts)
    bounds = np.linspace(0, n, len(workers.rewards) + 1).astype(int)
    pending = []
    for i, (w, a, b) in enumerate(zip(workers.rewards, bounds[:-1], bounds[1:], strict=True)):
        if b > a:
            args = (batch.images[a:b], batch.prompts[a:b], batch.metadata[a:b])
            pending.append(Pending(i, w, lambda actor, args=args: actor.score.remote(*args)))
    return pending


def score(workers: Workers, batch: RolloutBatch) -> RewardResult:
    """Judge and wait."""
    return RewardResult.concat(collect(workers, Role.REWARD, submit_score(workers, batch)))


def generate_and_score(workers: Workers, prompts: list[str], metadata: list[dict], group_size: int,
                       chunks: int, timings: dict[str, float]) -> tuple[RolloutBatch, RewardResult]:
    """One step's rollout in ``chunks`` pieces, each painted (decoder pool) and judged while the next one
    samples.

    All pieces use the same weights, so the step stays on-policy; only decode and reward time is hidden
    behind sampling. ``timings`` gets ``timing/rollout_s`` (until the last piece is sampled and painted)
    and ``timing/reward_s`` (judging left after that).
    """
    start = time.perf_counter()
    pieces = [p for p in np.array_split(np.arange(len(prompts)), chunks) if len(p)]
    take = lambda idx: ([prompts[i] for i in idx], [metadata[i] for i in idx])  # noqa: E731
    pending = submit_generate(workers, *take(pieces[0]), group_size)
    batches, judged = [], []
    for k in range(len(pieces)):
        sampled = RolloutBatch.concat(collect(workers, Role.ROLLOUT, pending))
        decoding = submit_decode(workers, sampled)  # the token batch streams to the decoder pool
        if k + 1 < len(pieces):
            pending = submit_generate(workers, *take(pieces[k + 1]), group_size)
        batches.append(painted(workers, sampled, decoding))
        judged.append(submit_score(workers, batches[-1]))
    timings["timing/rollout_s"] = time.perf_counter() - start
    results = [RewardResult.concat(collect(workers, Role.REWARD, refs)) for refs in judged]
    timings["timing/reward_s"] = time.perf_counter() - start - timings["timing/rollout_s"]
    return RolloutBatch.concat(batches), RewardResult.concat(results)
