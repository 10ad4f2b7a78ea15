"""``omnigrpo eval``: score a checkpoint on held-out prompts with the configured judges.

Why: a user wants one number per checkpoint, comparable across runs and with published ones, without
starting a training job. The evaluator samples ``eval.samples_per_prompt`` images per prompt with the
run's sampling settings (from a seed of its own, so the same checkpoint always gets the same report),
scores them with the config's rewards and the world's metrics, and writes a JSON report that is also
logged to MLflow as a run of its own (run name ``eval:<checkpoint>``).

Prompts are the world's held-out items by default, or any prompt file (``--prompts``). A file whose
prompts quote text, like X-Omni's LongText-Bench (``A poster that says "GRAND OPENING"``), also gets
OCR word recall and exact match of the quoted text (``text/word_recall``, ``text/exact_match``).

Everything runs in this process with the plain worker classes: no Ray cluster is needed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path

import numpy as np

from omnigrpo.app.preflight import check_eval
from omnigrpo.app.tracking import Tracker
from omnigrpo.config.loader import ConfigError
from omnigrpo.config.runtime import checkpoint_eval_seed
from omnigrpo.config.schema import Config
from omnigrpo.rewards.judges.ocr import target_text
from omnigrpo.rewards.registry import build_reward
from omnigrpo.rewards.worker import JudgeStartError, RewardWorker
from omnigrpo.rollout.sampler import SamplingParams
from omnigrpo.rollout.worker import RolloutWorker
from omnigrpo.worlds import registry as worlds
from omnigrpo.worlds.world import blank_share

log = logging.getLogger(__name__)


@functools.cache
def _judge(reward: str, kwargs_json: str):
    """A world metric's judge, built once per process (an OCR engine takes a second to load)."""
    return build_reward(reward, json.loads(kwargs_json))


def world_metrics(world_name: str, images: np.ndarray, prompts: list[str], metadata: list[dict]) -> dict[str, float]:
    """The world's held-out metrics (``world.EVAL``) of uint8 images ``[N, H, W, 3]``, as ``eval/<name>``,
    plus the blank-pixel share."""
    world = worlds.get(world_name)
    metrics = {}
    for name, (reward, kwargs) in world.EVAL.items():
        scores = [s for s in _judge(reward, json.dumps(kwargs, sort_keys=True))(images, prompts, metadata)
                  if s is not None]
        metrics[f"eval/{name}"] = float(np.mean(scores)) if scores else float("nan")
    metrics["eval/blank_frac"] = blank_share(images, world.BACKGROUND)
    return metrics


def text_metrics(cfg: Config, images: np.ndarray, prompts: list[str], metadata: list[dict]) -> dict[str, float]:
    """OCR word recall and exact match of the text the prompts quote (LongText-Bench style); empty when
    no prompt asks for text. OCR options follow a configured ``ocr`` reward, if any."""
    asked = [i for i, (p, m) in enumerate(zip(prompts, metadata, strict=True)) if target_text(p, m)]
    if not asked:
        return {}
    options = next((dict(r.kwargs) for r in cfg.rewards if r.name == "ocr"), {})
    options.pop("score", None)
    subset = images[asked], [prompts[i] for i in asked], [metadata[i] for i in asked]
    metrics = {}
    for name, score in (("text/word_recall", "recall"), ("text/exact_match", "exact")):
        metrics[name] = float(np.mean(build_reward("ocr", {**options, "score": score})(*subset)))
    return metrics


def paint(cfg: Config, codes, grid: tuple[int, int]) -> np.ndarray:
    """Images ``[N, H, W, 3]`` of ``codes`` ``[N, T]`` from the run's diffusion decoder (``decoder.*``)."""
    from omnigrpo.rollout.families.diffusion import DiffusionDecoder

    decoder = DiffusionDecoder(cfg.decoder.path, steps=cfg.decoder.steps, guidance=cfg.decoder.guidance,
                               seed=checkpoint_eval_seed(cfg.run.seed), threads=cfg.cluster.torch_threads)
    decoder.setup()
    return decoder.decode(codes, grid)


def evaluate_checkpoint(cfg: Config, checkpoint: str, prompts_source: str = "", samples: int = 0,
                        out: str = "") -> dict:
    """Sample, judge and report; returns the report (also written to ``out`` and logged to MLflow).

    Args:
        checkpoint: a policy directory (an SFT checkpoint or one of a run's ``checkpoints/...``).
        prompts_source: a prompt file (see ``omnigrpo.data.prompts``); empty = the world's held-out set.
        samples: images per prompt; 0 = ``eval.samples_per_prompt``.
        out: report path; empty = ``<run.dir>/eval/<checkpoint name>.json``.
    """
    path, prompts, metadata = check_eval(cfg, checkpoint, prompts_source)  # before loading anything
    per_prompt = samples or cfg.eval.samples_per_prompt
    rewards = RewardWorker(cfg.rewards)
    try:
        rewards.setup()  # builds every judge first: a bad reward fails before any sampling
    except JudgeStartError as err:
        raise ConfigError(str(err)) from None
    rollout = RolloutWorker(str(path), SamplingParams.of(cfg.rollout), seed=checkpoint_eval_seed(cfg.run.seed),
                            threads=cfg.cluster.torch_threads, family=cfg.model.family,
                            grid=tuple(cfg.model.image_grid) or None, sample_batch=cfg.rollout.sample_batch,
                            dtype=cfg.model.dtype, decode=not cfg.decoder.path)
    rollout.setup()
    batch = rollout.generate(prompts, metadata, per_prompt)
    if cfg.decoder.path:  # X-Omni: the configured diffusion decoder paints the codes, as in training
        batch.images = paint(cfg, batch.codes, batch.grid)
    result = rewards.score(batch.images, batch.prompts, batch.metadata)
    metrics = {"eval/reward_mean": float(np.nanmean(result.total)) if result.valid.any() else float("nan"),
               **result.metrics(prefix="eval/reward")}
    if prompts_source:
        metrics.update(text_metrics(cfg, batch.images, batch.prompts, batch.metadata))
    else:
        metrics.update(world_metrics(cfg.world.name, batch.images, batch.prompts, batch.metadata))
    per_prompt_rows = []
    for i, prompt in enumerate(prompts):
        rows = slice(i * per_prompt, (i + 1) * per_prompt)
        totals = result.total[rows][result.valid[rows]]
        per_prompt_rows.append({"prompt": prompt, "reward_mean": float(totals.mean()) if len(totals) else None})
    report = {"checkpoint": str(path), "world": cfg.world.name, "prompts": prompts_source or "held-out",
              "num_prompts": len(prompts), "samples_per_prompt": per_prompt, "metrics": metrics,
              "per_prompt": per_prompt_rows}
    target = Path(out) if out else Path(cfg.run.dir) / "eval" / f"{path.name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(report, indent=2))
    tracking = dataclasses.replace(cfg.tracking, run_name=cfg.tracking.run_name or f"eval:{path.name}")
    tracker = Tracker(dataclasses.replace(cfg, tracking=tracking))
    report["run_id"] = tracker.start()
    tracker.log(metrics, 0)
    tracker.log_dict(report, "eval_report.json")
    shown = [i * per_prompt for i in range(min(len(prompts), 16))]
    tracker.log_samples(batch.images[shown], [batch.prompts[i] for i in shown], 0, key="eval_samples")
    tracker.end()
    report["report_path"] = str(target)
    log.info("eval of %s: %s", path, ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    return report
