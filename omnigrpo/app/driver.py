"""The GRPO driver: rollout -> reward -> advantages -> learn -> sync, once per step, timed.

Why: this is the one module a reader needs to understand a run, so it only orchestrates; sampling,
judging and the loss live in ``rollout``, ``rewards`` and ``trainers``, Ray in ``cluster``.

Before any worker starts, the config has been validated (``load_config``) and every reward is
resolved and dry-run on the driver, so a typo costs seconds, not a cluster start. A step's rollout
batch is drawn with one weight version, which the driver checks. On a crash the learner writes a
checkpoint and the MLflow run is marked FAILED before the error propagates.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import ray
import torch

from omnigrpo.cluster import actors
from omnigrpo.platform import world as worlds
from omnigrpo.platform.config import Config, ConfigError
from omnigrpo.platform.evaluator import world_metrics
from omnigrpo.platform.prompts import load_prompts
from omnigrpo.platform.registry import build_reward
from omnigrpo.platform.tracking import Tracker
from omnigrpo.rewards.worker import applies_to, call_reward
from omnigrpo.rollout.policy import check_checkpoint, family_class
from omnigrpo.trainers.checkpoint import latest_resumable
from omnigrpo.trainers.grpo import group_advantages
from omnigrpo.trainers.learner import TrainBatch
from omnigrpo.trainers.sft import cache_root, sft_checkpoint

log = logging.getLogger(__name__)


class PromptCursor:
    """Training prompts in a fresh seeded shuffle each epoch; ``take(n)`` continues where it stopped."""

    def __init__(self, prompts: list[str], metadata: list[dict], seed: int):
        self.prompts, self.metadata = prompts, metadata
        self.rng = np.random.default_rng(seed)
        self.order: list[int] = []

    def take(self, n: int) -> tuple[list[str], list[dict]]:
        picked = []
        for _ in range(n):
            if not self.order:
                self.order = list(self.rng.permutation(len(self.prompts)))
            picked.append(self.order.pop())
        return [self.prompts[i] for i in picked], [self.metadata[i] for i in picked]

    def state(self) -> str:
        return json.dumps({"rng": self.rng.bit_generator.state, "order": [int(i) for i in self.order]})

    def restore(self, state: str) -> None:
        data = json.loads(state)
        self.rng.bit_generator.state = data["rng"]
        self.order = data["order"]


def check_rewards(cfg: Config, prompts: list[str], metadata: list[dict]) -> None:
    """Build every reward on the driver and dry-run it on two blank images of the policy's size with the
    first two training prompts; raise naming the culprit."""
    shape = worlds.get(cfg.world.name).IMAGE_SHAPE
    if cfg.model.path:
        shape = family_class(cfg.model.family).pixels(cfg.model.path, tuple(cfg.model.image_grid) or None)
    if cfg.decoder.path:  # the decoder paints 2 * its VAE's scale px per code, i.e. scales the code map
        from omnigrpo.rollout.diffusion import DiffusionDecoder

        shape = DiffusionDecoder.pixels(cfg.decoder.path, (shape[0] // 16, shape[1] // 16))  # xomni: 16 px/code
    blank = np.zeros((2, *shape, 3), dtype=np.uint8)
    two_prompts, two_metadata = (prompts * 2)[:2], (metadata * 2)[:2]
    for spec in cfg.rewards:
        if spec.tags and not any(applies_to(spec.tags, m) for m in metadata):
            raise ConfigError(f"reward {spec.name!r} has tags {spec.tags} but no training prompt carries any of them")
        fn = build_reward(spec.name, spec.kwargs)  # RewardNotFound names what is missing
        try:
            out = call_reward(fn, blank, two_prompts, two_metadata)
            count = len(out)
        except Exception as err:
            raise ConfigError(f"reward {spec.name!r} failed its dry run on 2 blank images: "
                              f"{type(err).__name__}: {err}") from err
        if count != 2:
            raise ConfigError(f"reward {spec.name!r} returned {count} scores for 2 images in its dry run")


@contextmanager
def timed(timings: dict[str, float], stage: str):
    start = time.perf_counter()
    yield
    timings[f"timing/{stage}_s"] = time.perf_counter() - start


def evaluate(cfg: Config, workers: actors.Workers, tracker: Tracker, step: int) -> dict[str, float]:
    """Held-out prompts, ``eval.samples_per_prompt`` images each: the world's metrics and mean reward
    (nothing when ``eval.held_out`` is off)."""
    if not cfg.eval.held_out:
        return {}
    world = worlds.get(cfg.world.name)
    prompts, metadata = world.prompts_of(world.held_out_items())
    # a stream of its own per evaluation: evaluating never shifts the training samples
    batch = actors.generate(workers, prompts, metadata, cfg.eval.samples_per_prompt, seed=cfg.run.seed * 7919 + step)
    result = actors.score(workers, batch)
    metrics = world_metrics(cfg.world.name, batch.images, batch.prompts, batch.metadata)
    metrics["eval/reward_mean"] = float(np.nanmean(result.total)) if result.valid.any() else float("nan")
    tracker.log(metrics, step)
    per_prompt = cfg.eval.samples_per_prompt
    shown = [i * per_prompt + j for i in range(len(prompts)) for j in range(min(2, per_prompt))]
    tracker.log_samples(batch.images[shown], [batch.prompts[i] for i in shown], step, key="eval_samples")
    log.info("step %d held-out: %s", step, ", ".join(f"{k[5:]} {v:.3f}" for k, v in metrics.items()))
    return metrics


def train(cfg: Config) -> dict:
    """Run a whole GRPO job; returns the held-out metrics before and after and the checkpoint path."""
    prompts, metadata = load_prompts(cfg.data.prompts)  # a malformed file fails here, naming the line
    if cfg.model.path:  # missing path, wrong image vocabulary: before any cluster starts
        check_checkpoint(cfg.model.family, cfg.model.path, cfg.model.image_codes or None)
    check_rewards(cfg, prompts, metadata)
    run_dir = Path(cfg.run.dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    model_path = cfg.model.path or str(sft_checkpoint(cfg, cfg.cluster.torch_threads or None))
    resume_from = latest_resumable(run_dir / "checkpoints") if cfg.run.resume else None
    state = torch.load(resume_from / "run_state.pt", weights_only=True) if resume_from else None
    if state and len(state["rollout_rng"]) != cfg.cluster.rollout_workers:
        raise ConfigError(f"cluster.rollout_workers: resuming {resume_from} needs {len(state['rollout_rng'])}")
    if state:
        ranks = json.loads((resume_from / "omnigrpo_step.json").read_text()).get("learners", 1)
        if ranks != cfg.cluster.learner_workers:
            raise ConfigError(f"cluster.learner_workers: resuming {resume_from} needs {ranks} (its optimiser "
                              "state is sharded that way)")
    cursor = PromptCursor(prompts, metadata, seed=cfg.run.seed)
    started_ray = not ray.is_initialized()
    actors.connect(cfg)
    tracker = Tracker(cfg)
    workers = None
    try:
        extensions = str(cache_root(cfg) / "torch_extensions")
        if state is None:
            workers = actors.spawn(cfg, model_path, extensions)
            tracker.start()
            return _loop(cfg, workers, tracker, run_dir, cursor, {"reference_path": model_path})
        log.info("resuming %s at step %d", resume_from, state["step"])
        workers = actors.spawn(cfg, str(resume_from), extensions, state["reference_path"], resume=True)
        ray.get([w.restore.remote(rng, state["version"]) for w, rng in zip(workers.rollouts, state["rollout_rng"],
                                                                          strict=True)])
        workers.version = state["version"]
        cursor.restore(state["cursor"])
        tracker.start(resume_run_id=state["run_id"])
        return _loop(cfg, workers, tracker, run_dir, cursor, state)
    except BaseException:
        tracker.end(failed=True)
        raise
    finally:
        if started_ray:
            ray.shutdown()
        elif workers is not None:  # the caller's cluster lives on: free what this run reserved
            actors.release(workers)


def _loop(cfg: Config, workers: actors.Workers, tracker: Tracker, run_dir: Path, cursor: PromptCursor,
          resumed: dict) -> dict:
    """Steps ``resumed["step"] + 1 .. trainer.steps`` (from 1 on a fresh run)."""
    ckpt_root = run_dir / "checkpoints" / tracker.run_id
    first = resumed.get("step", 0) + 1
    before = resumed.get("before") or evaluate(cfg, workers, tracker, 0)

    def run_state(step: int) -> dict:
        """What the driver needs to continue after ``step`` exactly as if never interrupted."""
        return {"step": step, "version": version, "run_id": tracker.run_id,
                "reference_path": resumed["reference_path"],
                "cursor": cursor.state(), "before": before,
                "rollout_rng": ray.get([w.rng_state.remote() for w in workers.rollouts])}

    # steps and weight versions differ once a step makes no update (every sample excluded)
    step, version = first - 1, resumed.get("version", 0)
    try:
        for step in range(first, cfg.trainer.steps + 1):
            timings: dict[str, float] = {}
            t0 = time.perf_counter()
            prompts, metadata = cursor.take(cfg.rollout.prompts_per_step)
            batch, result = actors.generate_and_score(workers, prompts, metadata, cfg.rollout.group_size,
                                                      cfg.rollout.chunks, timings)
            if batch.version != version:
                raise RuntimeError(f"step {step}: rollout used weights v{batch.version}, expected v{version}")
            valid = torch.from_numpy(result.valid)
            totals = torch.from_numpy(np.where(result.valid, result.total, 0.0)).float()  # invalid: unused
            adv, zero_std = group_advantages(totals, batch.group, valid, scale=cfg.trainer.scale_rewards)
            with timed(timings, "learn"):
                train_batch = TrainBatch(batch.prompt_batch, batch.codes, batch.logprobs, adv, valid)
                learned = actors.train_step(workers, train_batch)
            learned_version = int(learned.pop("version"))  # the learner stamps the weights it made
            with timed(timings, "sync"):
                if learned_version != version:  # no update (every sample excluded): nothing to send
                    version = learned_version
                    actors.sync_weights(workers, version)
            timings["timing/step_s"] = time.perf_counter() - t0
            metrics = {**result.metrics(), **learned, **timings, "grpo/zero_std_frac": zero_std,
                       "fault/actor_restarts": workers.restarts, "fault/sync_fallbacks": workers.sync_fallbacks,
                       "fault/call_timeouts": workers.timeouts, "sync/broadcast": float(workers.broadcast),
                       "guard/blank_frac": worlds.blank_share(batch.images, worlds.get(cfg.world.name).BACKGROUND),
                       "throughput/samples_per_s": len(batch.prompts) / timings["timing/step_s"]}
            tracker.log(metrics, step)
            if cfg.tracking.image_every and step % cfg.tracking.image_every == 0:
                n = cfg.tracking.images
                captions = [f"{p} | r={r:.2f}" for p, r in zip(batch.prompts[:n], result.total[:n], strict=True)]
                tracker.log_samples(batch.images[:n], captions, step)
            log.info("step %d/%d reward %.3f kl %.4f failed %d (%.1fs)", step, cfg.trainer.steps,
                     metrics["reward/total/mean"], metrics["kl"], metrics["reward/failed"],
                     timings["timing/step_s"])
            if cfg.eval.every and step % cfg.eval.every == 0 and step != cfg.trainer.steps:
                evaluate(cfg, workers, tracker, step)
            if cfg.trainer.save_every and step % cfg.trainer.save_every == 0:
                actors.save_checkpoint(workers, str(ckpt_root), step, "step", run_state(step))
    except BaseException:
        log.exception("run failed at step %d; writing a checkpoint", step)
        try:
            actors.save_checkpoint(workers, str(ckpt_root), None, "crash")
        except Exception:  # noqa: BLE001 - the learner itself may be what died
            log.exception("could not write the crash checkpoint")
        raise
    after = evaluate(cfg, workers, tracker, cfg.trainer.steps)
    final = actors.save_checkpoint(workers, str(ckpt_root), cfg.trainer.steps, "step", run_state(cfg.trainer.steps))
    versions = ray.get([w.weight_version.remote() for w in workers.rollouts])
    summary = {"before": before, "after": after, "checkpoint": final, "run_id": tracker.run_id,
               "rollout_versions": versions}
    tracker.log_dict(summary, "summary.json")
    tracker.end()
    return summary
