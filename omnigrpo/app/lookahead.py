"""Rollout batches drawn ahead of the learner with a fixed lag (``trainer.max_staleness: k``).

Why: with separate rollout actors, sampling and judging the next batch need not wait for the learner. With a fixed
lag the schedule is a function of the step alone, so a run is reproducible and resumes exactly: step ``s``'s batch
is drawn, in step order, with the weights the rollouts hold after step ``max(0, s - 1 - k)``.
:meth:`Lookahead.take` returns batch ``s`` and starts drawing batch ``s + k`` in the background while the learner
trains; :meth:`Lookahead.join` waits for it before new weights are sent. The batches drawn ahead are part of the run
state; ``k = 0`` is the synchronous loop (docs/design.md, "Asynchronous rollout").
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from omnigrpo.cluster import actors, shards
from omnigrpo.config.schema import RolloutConfig, TrainerConfig
from omnigrpo.data.cursor import PromptCursor
from omnigrpo.rewards.worker import RewardResult
from omnigrpo.rollout.worker import RolloutBatch


@dataclass(frozen=True)
class Drawn:
    """One step's rollout: the batch, its rewards, the timings of drawing it and the weight version the rollouts
    held when it was asked for (which the batch must carry)."""

    batch: RolloutBatch
    result: RewardResult
    timings: dict[str, float]
    expected_version: int

    def state(self) -> dict:
        return {"batch": self.batch.state(), "result": self.result.state(), "timings": dict(self.timings),
                "expected_version": self.expected_version}

    @staticmethod
    def from_state(state: dict) -> Drawn:
        return Drawn(RolloutBatch.from_state(state["batch"]), RewardResult.from_state(state["result"]),
                     state["timings"], state["expected_version"])


@dataclass
class Lookahead:
    """The queue of batches for steps ``next_step ..`` drawn so far, and the one being drawn in the background."""

    rollout: RolloutConfig
    trainer: TrainerConfig
    workers: actors.Workers
    cursor: PromptCursor
    ready: deque = field(default_factory=deque)
    """Drawn batches of the next steps, in step order."""
    running: Future | None = None
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "omnigrpo-lookahead"))

    @property
    def lag(self) -> int:
        return self.trainer.max_staleness

    def draw(self, version: int) -> Drawn:
        """Sample and judge the next prompts of the cursor with the rollouts' current weights (``version``)."""
        ro, timings = self.rollout, {}
        prompts, metadata = self.cursor.take(ro.prompts_per_step)
        batch, result = shards.generate_and_score(self.workers, prompts, metadata, ro.group_size, ro.chunks, timings)
        return Drawn(batch, result, timings, version)

    def take(self, step: int, version: int) -> Drawn:
        """Batch ``step``; starts drawing batch ``step + lag`` (if the run has that step) in the background."""
        wanted = min(max(self.lag, 1), self.trainer.steps - step + 1)  # batches step .. step + lag - 1
        while len(self.ready) < wanted:
            self.ready.append(self.draw(version))
        if self.lag and step + self.lag <= self.trainer.steps:
            self.running = self.pool.submit(self.draw, version)
        return self.ready.popleft()

    def join(self, timings: dict[str, float]) -> None:
        """Wait for the background draw, if any (``timing/wait_s``: how long the learner's side waited)."""
        start = time.perf_counter()
        if self.running is not None:
            running, self.running = self.running, None
            self.ready.append(running.result())
        timings["timing/wait_s"] = time.perf_counter() - start

    def state(self) -> list[dict]:
        """The batches drawn ahead (call after :meth:`join`)."""
        return [d.state() for d in self.ready]

    def restore(self, states: list[dict]) -> None:
        self.ready = deque(Drawn.from_state(s) for s in states)

    def close(self) -> None:
        """Stop taking work; a draw in flight finishes in its thread (its actors may already be gone)."""
        self.pool.shutdown(wait=False, cancel_futures=True)
