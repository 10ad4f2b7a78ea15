"""The GRPO driver: rollout -> reward -> advantages -> learn -> sync, once per step, timed.

Why: this is the one module a reader needs to understand a run, so it only orchestrates; sampling, judging and the
loss live in ``rollout``, ``rewards`` and ``trainers``, Ray in ``cluster``, and every check made before a cluster
starts in ``preflight``. A step's batch is drawn with one weight version, which the driver checks; with
``trainer.max_staleness: k`` the rollouts draw batch ``s + k`` while the learner trains on batch ``s``
(``omnigrpo.app.lookahead``). On a crash the learner writes a checkpoint, the MLflow run is marked FAILED, and the
fault reaches the user as one line (``omnigrpo.app.failure``).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import ray
import torch

from omnigrpo.app import preflight
from omnigrpo.app.alarm import CollapseAlarm
from omnigrpo.app.console import Progress
from omnigrpo.app.diversity import diversity, pixel_distances
from omnigrpo.app.evaluator import world_metrics
from omnigrpo.app.failure import CheckpointFailed, describe, failed, reason
from omnigrpo.app.lookahead import Lookahead
from omnigrpo.app.shaping import Shaping
from omnigrpo.app.state import RunState
from omnigrpo.app.tracking import Tracker
from omnigrpo.cluster import actors, shards
from omnigrpo.config.runtime import eval_seed
from omnigrpo.config.schema import Config
from omnigrpo.data.cursor import PromptCursor
from omnigrpo.rewards.worker import RewardResult
from omnigrpo.rollout.hub import absolute
from omnigrpo.rollout.worker import RolloutBatch
from omnigrpo.trainers import grpo
from omnigrpo.trainers.batch import TrainBatch, Update
from omnigrpo.trainers.sft import cache_root, sft_checkpoint
from omnigrpo.worlds import registry as worlds
from omnigrpo.worlds.world import blank_share

log = logging.getLogger(__name__)
STOP = threading.Event()
"""Set to ask a running loop to stop after its current step, with a resumable checkpoint (``omnigrpo stop``)."""
FAILED_DRAIN_S = 5.0
"""How long a failed run waits for an unreachable MLflow store before writing its last metrics beside the run."""
STARTING = threading.Event()
"""Set while the actors start: a SIGTERM then ends the run at once (there is no step to finish, nothing to save)."""


@contextmanager
def timed(timings: dict[str, float], stage: str):
    start = time.perf_counter()
    yield
    timings[f"timing/{stage}_s"] = time.perf_counter() - start


def evaluate(cfg: Config, workers: actors.Workers, tracker: Tracker, step: int) -> dict[str, float]:
    """Held-out prompts, ``eval.samples_per_prompt`` images each: the world's metrics (with the headline's
    pass@k) and mean reward (nothing when ``eval.held_out`` is off)."""
    if not cfg.eval.held_out:
        return {}
    prompts, metadata = worlds.held_out_prompts(cfg.world.name)
    per_prompt = cfg.eval.samples_per_prompt
    # a stream of its own per evaluation: evaluating never shifts the training samples
    batch = shards.generate(workers, prompts, metadata, per_prompt, seed=eval_seed(cfg.run.seed, step))
    result = shards.score(workers, batch)
    metrics = world_metrics(cfg.world.name, batch.images, batch.prompts, batch.metadata, per_prompt)
    metrics["eval/reward_mean"] = float(np.nanmean(result.total)) if result.valid.any() else float("nan")
    metrics.update(diversity(pixel_distances(batch.images), batch.group, prefix="eval/diversity_"))
    tracker.log(metrics, step)
    # a row per prompt (up to 8 prompts x 8 samples): the variety within a prompt is what RL may drop
    shown = [i * per_prompt + j for i in range(min(8, len(prompts))) for j in range(min(8, per_prompt))]
    tracker.log_samples(batch.images[shown], [batch.prompts[i] for i in shown], step, key="eval_samples")
    log.info("step %d held-out: %s", step, ", ".join(f"{k[5:]} {v:.3f}" for k, v in metrics.items()))
    return metrics


def install_stop_handler() -> None:
    """A first SIGTERM asks the loop to stop after its step with a resumable checkpoint; a second one ends the
    run at once (a crash checkpoint), and so does one while the actors start (say a judge stuck in its dry run).
    Installed after Ray's own driver handler, which it replaces."""

    def terminate(signum: int, frame: object) -> None:
        if STOP.is_set() or STARTING.is_set():
            raise SystemExit(128 + signum)  # unwinds through the loop, which writes a crash checkpoint
        STOP.set()
        log.warning("stop requested: finishing this step, then writing a checkpoint (SIGTERM again stops at once)")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, terminate)


def train(cfg: Config, stop_on_sigterm: bool = False, plan: preflight.RunPlan | None = None) -> dict:
    """Run a whole GRPO job; returns the held-out metrics before and after and the checkpoint path (or, stopped
    on request, ``stopped_at`` and that step's checkpoint). ``stop_on_sigterm``: see :func:`install_stop_handler`;
    ``plan``: ``preflight.check_run(cfg)`` when the caller has already run it."""
    plan = plan or preflight.check_run(cfg)  # raises ConfigError naming the key before anything starts
    run_dir = Path(cfg.run.dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    # a resumed run starts from its checkpoint, with its run state's reference: no SFT to find or train
    model_path = "" if plan.state is not None else (
        absolute(cfg.model.path) or str(sft_checkpoint(cfg.sft, cfg.model, cfg.world, cfg.run,
                                                       cfg.cluster.torch_threads or None)))
    cursor = PromptCursor(plan.prompts, plan.metadata, seed=cfg.run.seed)
    started_ray = not ray.is_initialized()
    actors.connect(cfg.cluster)
    STOP.clear()
    previous = signal.getsignal(signal.SIGTERM)
    if stop_on_sigterm:
        install_stop_handler()
    tracker = Tracker.from_config(cfg)
    workers = None
    try:
        extensions = str(cache_root(cfg.run.cache_dir) / "torch_extensions")
        state = plan.state
        STARTING.set()
        if state is None:
            workers = actors.spawn(cfg, model_path, extensions, dry_run=plan.dry_run)
            STARTING.clear()
            tracker.start()
            tracker.set_tags(actors.placement_tags(workers))
            return Loop(cfg, workers, tracker, run_dir, cursor, RunState.fresh(model_path)).run()
        log.info("resuming %s at step %d", plan.resume_from, state.step)
        workers = actors.spawn(cfg, str(plan.resume_from), extensions, state.reference_path, resume=True,
                               dry_run=plan.dry_run)
        STARTING.clear()
        ray.get([w.restore.remote(rng, state.version) for w, rng in zip(workers.rollouts, state.rollout_rng,
                                                                        strict=True)])
        workers.sync.version, workers.rng_states = state.version, list(state.rollout_rng)
        cursor.restore(state.cursor)
        tracker.start(resume_run_id=state.run_id)
        tracker.set_tags(actors.placement_tags(workers))
        return Loop(cfg, workers, tracker, run_dir, cursor, state).run()
    except BaseException:
        tracker.end(failed=True, wait_s=FAILED_DRAIN_S)
        raise
    finally:
        STARTING.clear()
        if stop_on_sigterm and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
        if started_ray:
            ray.shutdown()
        elif workers is not None:  # the caller's cluster lives on: free what this run reserved
            actors.release(workers)
        if workers is not None:
            actors.leave(workers)


@dataclass
class Loop:
    """Steps ``start_state.step + 1 .. trainer.steps`` of a run (from 1 on a fresh run)."""

    cfg: Config
    workers: actors.Workers
    tracker: Tracker
    run_dir: Path
    cursor: PromptCursor
    start_state: RunState
    """The run state the loop continues from: a resumed run's (:meth:`run_state`), or :meth:`RunState.fresh`."""
    version: int = 0
    """Weight version the rollout actors (hybrid: the learner ranks) sample with; steps and versions differ once a
    step makes no update."""
    before: dict = field(default_factory=dict)
    stage: str = "start"
    """What the loop is doing: a crash during ``learn`` or ``sync`` leaves weights of no completed step."""
    last_state: RunState | None = None
    """The run state once the last step's weights reached the rollouts: a crash outside learn/sync resumes it."""
    saved: tuple[int, str] | None = None
    """(step, path) of the newest scheduled step checkpoint."""
    ahead: Lookahead | None = None
    """Rollout batches drawn ahead of the learner (``trainer.max_staleness``; none ahead when 0)."""
    alarm: CollapseAlarm | None = None
    """Diversity collapse and watchdog alarms (``alarm.*``)."""
    skipped: int = 0
    """Updates skipped in a row so far (``trainer.max_skipped_updates``)."""
    reason: str = ""
    """Why the loop stopped on its own (empty when asked to stop, or not stopped)."""

    def run(self) -> dict:
        cfg = self.cfg
        start = self.start_state
        first = start.step + 1
        self.version = start.version
        self.ahead = Lookahead(cfg.rollout, cfg.trainer, self.workers, self.cursor)
        self.ahead.restore(start.ahead)
        self.alarm = CollapseAlarm(cfg.alarm, cfg.rewards)
        self.alarm.restore(start.alarm)
        progress = Progress(cfg.trainer.steps, first)
        step = first - 1
        try:
            self.before = start.before or evaluate(cfg, self.workers, self.tracker, 0)
            self.last_state = start if start.resumed else self.run_state(start.step)
            for step in range(first, cfg.trainer.steps + 1):
                metrics = self.step(step)
                progress.step(step, metrics)
                self.after_step(step)
                if STOP.is_set() and (step < cfg.trainer.steps or self.reason):
                    progress.close()
                    return self.stop(step)
            progress.close()
            return self.finish()
        except Exception as err:  # a fault: one line for the user, the traceback in run.dir
            progress.close()
            raise failed(err, step, self.stage, self.crash(step), self.run_dir) from err
        except BaseException:  # a second SIGTERM, an interrupt: leave what can be left, then go
            progress.close()
            self.crash(step)
            raise
        finally:
            self.ahead.close()

    def crash(self, step: int) -> str:
        """A crash checkpoint; resumable (it carries the last completed step's run state) unless the crash came
        while the learner was updating or sending the weights. Returns what was saved, for the user."""
        if self.last_state is None:
            return "no step had begun: nothing to checkpoint"
        resumable = self.last_state if self.stage not in ("learn", "sync") else None
        log.error("run failed at step %d (%s); writing a %scheckpoint", step, self.stage,
                  "resumable " if resumable else "")
        try:
            path = self.write(None, "crash", resumable)
        except Exception as err:  # noqa: BLE001 - the learner itself may be what died, or the disk is full
            log.error("could not write the crash checkpoint: %s", describe(err))
            return f"no crash checkpoint ({reason(err)})"
        return f"crash checkpoint {path}" + (" (resume with --resume)" if resumable else
                                             " (mid-update: start a new run from it with model.path)")

    def write(self, step: int | None, name: str, state: RunState | None) -> str:
        """Every learner rank writes its part of checkpoint ``{name}-{step}``, rank 0 with ``state`` as plain data
        (``run_state.pt``; None: not resumable); returns its path."""
        return actors.save_checkpoint(self.workers, str(self.checkpoints), step, name,
                                      state.state() if state else None)

    def save(self, step: int | None, name: str, state: RunState | None) -> str:
        """:meth:`write`; a write that fails (disk full) is a :class:`CheckpointFailed` naming the folder, the error
        and the newest whole checkpoint."""
        try:
            return self.write(step, name, state)
        except OSError as err:  # Ray's error is also an instance of the actor's exception class
            kept = f"; the newest whole checkpoint, {self.saved[1]}, is intact (resume with --resume)" \
                if self.saved else ""
            raise CheckpointFailed(f"the {name} checkpoint could not be written: {describe(err)}{kept}") from err

    def stop(self, step: int) -> dict:
        """Stopped on request (or for :attr:`reason`) after ``step``: a resumable step checkpoint, the MLflow run
        marked KILLED."""
        final = self.saved[1] if self.saved and self.saved[0] == step else self.save(step, "step", self.last_state)
        log.warning("stopped after step %d %s; resume with --resume (checkpoint %s)", step,
                    f"({self.reason})" if self.reason else "on request", final)
        self.tracker.end(stopped=True)
        return {"before": self.before, "after": {}, "checkpoint": final, "run_id": self.tracker.run_id,
                "stopped_at": step, "reason": self.reason, "rollout_versions": ray.get([w.weight_version.remote()
                                                                 for w in self.workers.rollouts])}

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints" / self.tracker.run_id

    def step(self, step: int) -> dict[str, float]:
        """One GRPO step, in five stages; returns and logs its metrics."""
        cfg, workers, timings = self.cfg, self.workers, {}
        t0 = time.perf_counter()
        # 1. rollout and reward: the step's prompts, judged piece by piece as they are sampled (drawn now, or
        # ahead with older weights under trainer.max_staleness, which then starts drawing step + k's batch)
        self.stage = "rollout"
        drawn = self.ahead.take(step, self.version)
        batch, result = drawn.batch, drawn.result
        timings.update(drawn.timings)
        if batch.version != drawn.expected_version:
            raise RuntimeError(f"step {step}: rollout used weights v{batch.version}, expected "
                               f"v{drawn.expected_version}")
        # 2. advantages: the totals shaped (trainer.diversity_bonus, trainer.baseline_by), then normalised within
        # each group; excluded samples carry no weight
        valid = torch.from_numpy(result.valid)
        distances = pixel_distances(batch.images)  # diversity metrics and (in pixel space) the bonus share them
        shaped = self.shaping(torch.from_numpy(result.total), valid, batch.images, distances)
        adv = grpo.advantages(shaped.totals, cfg.rollout.group_size, valid, scale=cfg.trainer.scale_rewards)
        # ... weighed by novelty (trainer.diversity_advantage), the KL kept where a watchdog doubts the judges
        weighed = self.shaping.weigh(adv.values, valid, batch.images, distances, shaped.styles)
        kl = self.shaping.kl_weights(result)
        # 3. learn: one GRPO update on every learner rank
        self.stage = "learn"
        with timed(timings, "learn"):
            update = actors.train_step(workers, TrainBatch(batch.prompt_batch, batch.codes, batch.logprobs, weighed,
                                                           valid, torch.full((len(valid),), batch.version), kl))
        self.ahead.join(timings)  # the next batch drawn ahead is complete: the rollouts are free for new weights
        # 4. sync: the new weights to every rollout actor (nothing to send when no update was made, nor under
        # hybrid placement, where the learner ranks sample with their own weights)
        self.stage = "sync"
        with timed(timings, "sync"):
            actors.sync_weights(workers, update.version)  # the learner stamps the weights it made
        self.version = update.version
        self.last_state = self.run_state(step)  # from here on a crash leaves this step's weights: resumable
        timings["timing/step_s"] = time.perf_counter() - t0
        # 5. log: the step's metrics and, now and then, a grid of its samples
        self.stage = "log"
        metrics = self.step_metrics(batch, result, update.metrics, timings, adv.zero_std_frac)
        metrics.update(diversity(distances, batch.group))
        metrics.update(shaped.metrics())
        self.tracker.log(metrics, step)
        self.raise_alarms(metrics, step)
        self.count_skips(update, result, step)
        self.last_state = replace(self.last_state, alarm=self.alarm.state())  # this step's figures belong to it
        if cfg.tracking.image_every and step % cfg.tracking.image_every == 0:
            n = cfg.tracking.images
            captions = [f"{p} | r={r:.2f}" for p, r in zip(batch.prompts[:n], result.total[:n], strict=True)]
            self.tracker.log_samples(batch.images[:n], captions, step)
        return metrics

    @cached_property
    def shaping(self) -> Shaping:
        """The step's reward shaping (``trainer.diversity_bonus``, ``trainer.baseline_by`` and the GARDO options)."""
        return Shaping.for_world(self.cfg.trainer, self.cfg.rollout.group_size, worlds.get(self.cfg.world.name),
                                 next((r.key for r in self.cfg.rewards if r.watch), ""))

    def step_metrics(self, batch: RolloutBatch, result: RewardResult, learned: dict[str, float],
                     timings: dict[str, float], zero_std: float) -> dict[str, float]:
        """Everything logged for a step: rewards, learner, timings, faults, sync and guard metrics."""
        w = self.workers
        background = worlds.get(self.cfg.world.name).BACKGROUND
        return {**result.metrics(), **learned, **timings, "grpo/zero_std_frac": zero_std,
                "fault/actor_restarts": w.restarts, "fault/call_timeouts": w.timeouts, **w.sync.metrics(),
                "guard/blank_frac": blank_share(batch.images, background),
                "throughput/samples_per_s": len(batch.prompts) / timings["timing/step_s"]}

    def raise_alarms(self, metrics: dict[str, float], step: int) -> None:
        """Log each alarm raised at this step (metric ``alarm/<kind>`` = 1, a run tag with its figures) and, with
        ``alarm.stop``, ask the loop to stop after this step with a resumable checkpoint."""
        raised = self.alarm.observe(metrics)
        if not raised:
            return
        for kind, message in raised.items():
            log.warning("alarm at step %d: %s: %s", step, kind, message)
        self.tracker.log({f"alarm/{kind}": 1.0 for kind in raised}, step)
        self.tracker.set_tags({f"alarm/{kind}": f"step {step}: {message}" for kind, message in raised.items()})
        if self.cfg.alarm.stop:
            STOP.set()

    def count_skips(self, update: Update, result: RewardResult, step: int) -> None:
        """After ``trainer.max_skipped_updates`` skipped or non-finite updates in a row, ask the loop to stop after
        this step (a resumable checkpoint), saying why: nothing is learnt, and each step still costs a rollout."""
        skipped, nonfinite, dropped = update.skipped, update.nonfinite, update.dropped_micro_batches
        self.skipped = self.skipped + 1 if skipped or nonfinite else 0
        if nonfinite:
            log.warning("step %d: %s", step, "update skipped: an advantage or sampler log-prob is not finite"
                        if skipped else f"{dropped} micro-batch(es) with a non-finite loss left out of the update"
                        if dropped else "the update's gradient norm is not finite (look at its rewards)")
        limit = self.cfg.trainer.max_skipped_updates
        if not limit or self.skipped < limit:
            return
        why = "a non-finite advantage, log-prob, loss or gradient" if nonfinite else \
            "no valid sample" + (f" (reward errors: {'; '.join(f'{k}: {v}' for k, v in result.errors.items())})"
                                 if result.errors else "")
        self.reason = (f"{self.skipped} updates in a row were skipped or not finite, the last at step {step}: "
                       f"{why}; trainer.max_skipped_updates stops the run")
        log.error("%s", self.reason)
        STOP.set()

    def after_step(self, step: int) -> None:
        """Held-out evaluation and checkpoints on their schedules."""
        cfg = self.cfg
        if cfg.eval.every and step % cfg.eval.every == 0 and step != cfg.trainer.steps:
            evaluate(cfg, self.workers, self.tracker, step)
        if cfg.trainer.save_every and step % cfg.trainer.save_every == 0:
            self.saved = (step, self.save(step, "step", self.last_state))

    def run_state(self, step: int) -> RunState:
        """What the driver needs to continue after ``step`` exactly as if never interrupted."""
        return RunState(step=step, version=self.version, run_id=self.tracker.run_id,
                        reference_path=self.start_state.reference_path, cursor=self.cursor.state(),
                        before=self.before, ahead=self.ahead.state() if self.ahead else [],
                        alarm=self.alarm.state() if self.alarm else None, rollout_rng=list(self.workers.rng_states))

    def finish(self) -> dict:
        """Final evaluation and checkpoint; the run's summary."""
        cfg, workers = self.cfg, self.workers
        self.stage = "evaluate"
        after = evaluate(cfg, workers, self.tracker, cfg.trainer.steps)
        final = self.save(cfg.trainer.steps, "step", self.run_state(cfg.trainer.steps))
        versions = ray.get([w.weight_version.remote() for w in workers.rollouts])
        summary = {"before": self.before, "after": after, "checkpoint": final, "run_id": self.tracker.run_id,
                   "rollout_versions": versions}
        self.tracker.log_dict(summary, "summary.json")
        self.tracker.end()
        return summary
