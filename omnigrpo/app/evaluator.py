"""``omnigrpo eval``: score a checkpoint on held-out prompts with the configured judges.

Why: a user wants one number per checkpoint, comparable across runs and with published ones, without starting a
training job. It samples with the run's settings from a seed of its own (the same checkpoint always gets the same
report), scores with the config's rewards and the world's metrics (OCR word recall and exact match where prompts
quote text), adds best-of-N ``<metric>_pass_at_<k>`` by the unbiased estimator of Chen et al. 2021, and writes a
JSON report that is also logged to MLflow. It runs in this process with the plain worker classes, without Ray
(docs/evaluation.md).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path

import numpy as np

from omnigrpo.app.diversity import style_entropy
from omnigrpo.app.preflight import check_eval
from omnigrpo.app.tracking import Tracker
from omnigrpo.config import options
from omnigrpo.config.loader import ConfigError
from omnigrpo.config.runtime import checkpoint_eval_seed
from omnigrpo.config.schema import Config, RewardSpec
from omnigrpo.rewards.judges.ocr import exact_score, shared_reader, target_text, word_recall
from omnigrpo.rewards.registry import build_reward
from omnigrpo.rewards.worker import JudgeStartError, RewardWorker
from omnigrpo.rollout.worker import RolloutWorker
from omnigrpo.worlds import registry as worlds
from omnigrpo.worlds.world import blank_share

log = logging.getLogger(__name__)


@functools.cache
def _judge(reward: str, kwargs_json: str):
    """A world metric's judge, built once per process (an OCR engine takes a second to load)."""
    return build_reward(reward, json.loads(kwargs_json))


def world_scores(world_name: str, images: np.ndarray, prompts: list[str],
                 metadata: list[dict]) -> dict[str, list[float | None]]:
    """Per-sample scores of each of the world's held-out metrics (``world.EVAL`` order, headline first)
    for uint8 images ``[N, H, W, 3]``; ``None`` where a metric does not apply."""
    world = worlds.get(world_name)
    return {name: list(_judge(reward, json.dumps(kwargs, sort_keys=True))(images, prompts, metadata))
            for name, (reward, kwargs) in world.EVAL.items()}


def world_metrics(world_name: str, images: np.ndarray, prompts: list[str], metadata: list[dict],
                  per_prompt: int = 1) -> dict[str, float]:
    """The world's held-out metrics of uint8 images ``[N, H, W, 3]`` (``per_prompt`` consecutive samples
    per prompt), as ``eval/<name>``, the headline's ``eval/<name>_pass_at_<k>`` and the blank-pixel share."""
    scores = world_scores(world_name, images, prompts, metadata)
    metrics = {f"eval/{name}": mean_score(values) for name, values in scores.items()}
    headline = next(iter(scores))
    metrics.update(pass_at_k_metrics(f"eval/{headline}", scores[headline], per_prompt))
    world = worlds.get(world_name)
    metrics["eval/blank_frac"] = blank_share(images, world.BACKGROUND)
    if hasattr(world, "read_style"):  # a world that draws in styles its prompts leave open (glyphs)
        metrics.update(style_metrics([world.read_style(im) for im in images], scores[headline], per_prompt))
    return metrics


def style_metrics(styles: list, correct: list[float | None], per_prompt: int) -> dict[str, float]:
    """``eval/style_entropy`` of the joint style and, for a dataclass style, ``eval/style_entropy_<field>`` of
    each attribute alone (which of them RL kept: a joint entropy held by height alone reads the same)."""
    metrics = {"eval/style_entropy": style_entropy(styles, correct, per_prompt)}
    known = next((s for s in styles if s is not None), None)
    for field in dataclasses.fields(known) if dataclasses.is_dataclass(known) else ():
        values = [None if s is None else getattr(s, field.name) for s in styles]
        metrics[f"eval/style_entropy_{field.name}"] = style_entropy(values, correct, per_prompt)
    return metrics


def text_metrics(rewards: list[RewardSpec], images: np.ndarray, prompts: list[str], metadata: list[dict],
                 per_prompt: int = 1) -> dict[str, float]:
    """OCR word recall and exact match of the text the prompts quote (LongText-Bench style), and exact
    match's pass@k; empty when no prompt asks for text. Each image is read once, with the options of a
    ``ocr`` reward among ``rewards``, if any."""
    asked = [(i, text) for i, (p, m) in enumerate(zip(prompts, metadata, strict=True))
             if (text := target_text(p, m))]
    if not asked:
        return {}
    options = next((dict(r.kwargs) for r in rewards if r.name == "ocr"), {})
    options.pop("score", None)
    reader = shared_reader(**options)
    readings = [(reader.read(images[i]), text) for i, text in asked]
    exact = [exact_score(read, text) for read, text in readings]
    # a prompt's samples all quote the same text, so the asked samples still come per_prompt at a time
    return {"text/word_recall": mean_score([word_recall(read, text) for read, text in readings]),
            "text/exact_match": mean_score(exact), **pass_at_k_metrics("text/exact_match", exact, per_prompt)}


def mean_score(scores: list[float | None]) -> float:
    """Mean of the scores that apply (NaN when none does)."""
    kept = [s for s in scores if s is not None]
    return float(np.mean(kept)) if kept else float("nan")


def pass_ks(n: int) -> list[int]:
    """The k reported for n samples per prompt: 1, the powers of two below n, and n."""
    return sorted({*(2**i for i in range(n.bit_length()) if 2**i < n), n})


def pass_at_k(correct: np.ndarray, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021) averaged over prompts: ``correct`` ``[P, n]`` holds 0/1 scores
    (0.5 or more counts as right) or NaN (not scored); a prompt with fewer than k scored samples is left
    out (NaN when every prompt is).

    >>> pass_at_k(np.array([[1, 0, 0, 0], [0, 0, 0, 0]]), 2)
    0.25
    """
    per_prompt = []
    for row in correct:
        scored = row[~np.isnan(row)]
        n, c = len(scored), int((scored >= 0.5).sum())
        if n < k:
            continue
        if n - c < k:  # every k-subset holds a right sample
            per_prompt.append(1.0)
        else:  # 1 - C(n - c, k) / C(n, k), as a product: no huge binomials
            per_prompt.append(1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1))))
    return float(np.mean(per_prompt)) if per_prompt else float("nan")


def pass_at_k_metrics(name: str, scores: list[float | None], per_prompt: int) -> dict[str, float]:
    """``<name>_pass_at_<k>`` for each k of :func:`pass_ks`, from 0/1 scores ``[P * per_prompt]`` that come
    ``per_prompt`` consecutive samples per prompt."""
    correct = np.array([np.nan if s is None else s for s in scores], dtype=float).reshape(-1, per_prompt)
    return {f"{name}_pass_at_{k}": pass_at_k(correct, k) for k in pass_ks(per_prompt)}


def paint(cfg: Config, codes, grid: tuple[int, int]) -> np.ndarray:
    """Images ``[N, H, W, 3]`` of ``codes`` ``[N, T]`` from the run's diffusion decoder (``decoder.*``)."""
    from omnigrpo.rollout.families.diffusion import DiffusionDecoder

    decoder = DiffusionDecoder.from_config(cfg.decoder, checkpoint_eval_seed(cfg.run.seed), cfg.cluster.torch_threads)
    decoder.setup()
    return decoder.decode(codes, grid)


def rollout_worker(cfg: Config, path: str) -> RolloutWorker:
    """The rollout worker a run of ``cfg`` samples with, on ``path``'s policy, seeded for evaluation."""
    return RolloutWorker.from_config(cfg.rollout, cfg.model, path, checkpoint_eval_seed(cfg.run.seed),
                                     cfg.cluster.torch_threads, decode=not cfg.decoder.path,
                                     release=cfg.cluster.placement == "colocated")


def evaluate_checkpoint(cfg: Config, checkpoint: str, prompts_source: str = "", samples: int = 0,
                        out: str = "", force: bool = False) -> dict:
    """Sample, judge and report; returns the report (also written to ``out`` and logged to MLflow).

    Args:
        checkpoint: a policy directory (an SFT checkpoint or one of a run's ``checkpoints/...``).
        prompts_source: a prompt file (see ``omnigrpo.data.prompts``); empty = the world's held-out set.
        samples: images per prompt; 0 = ``eval.samples_per_prompt``.
        out: report path; empty = ``<run.dir>/eval/<checkpoint name>.json``.
        force: write over an existing report (else refused before anything loads).
    """
    path, prompts, metadata = check_eval(cfg, checkpoint, prompts_source)  # before loading anything
    target = Path(out) if out else Path(cfg.run.dir) / "eval" / f"{path.name}.json"
    options.writable(target, "--out" if out else "the report (--out)", force)
    per_prompt = samples or cfg.eval.samples_per_prompt
    rewards = RewardWorker(cfg.rewards)
    try:
        rewards.setup()  # builds every judge first: a bad reward fails before any sampling
    except JudgeStartError as err:
        raise ConfigError(str(err)) from None
    rollout = rollout_worker(cfg, str(path))
    rollout.setup()
    batch = rollout.generate(prompts, metadata, per_prompt)
    if cfg.decoder.path:  # X-Omni: the configured diffusion decoder paints the codes, as in training
        batch.images = paint(cfg, batch.codes, batch.grid)
    result = rewards.score(batch.images, batch.prompts, batch.metadata)
    metrics = {"eval/reward_mean": float(np.nanmean(result.total)) if result.valid.any() else float("nan"),
               **result.metrics(prefix="eval/reward")}
    if prompts_source:
        metrics.update(text_metrics(cfg.rewards, batch.images, batch.prompts, batch.metadata, per_prompt))
    else:
        metrics.update(world_metrics(cfg.world.name, batch.images, batch.prompts, batch.metadata, per_prompt))
    per_prompt_rows = []
    for i, prompt in enumerate(prompts):
        rows = slice(i * per_prompt, (i + 1) * per_prompt)
        totals = result.total[rows][result.valid[rows]]
        per_prompt_rows.append({"prompt": prompt, "reward_mean": float(totals.mean()) if len(totals) else None})
    report = {"checkpoint": str(path), "world": cfg.world.name, "prompts": prompts_source or "held-out",
              "num_prompts": len(prompts), "samples_per_prompt": per_prompt, "metrics": metrics,
              "per_prompt": per_prompt_rows}
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(report, indent=2))
    tracking = dataclasses.replace(cfg.tracking, run_name=cfg.tracking.run_name or f"eval:{path.name}")
    tracker = Tracker.from_config(dataclasses.replace(cfg, tracking=tracking))
    report["run_id"] = tracker.start()
    tracker.log(metrics, 0)
    tracker.log_dict(report, "eval_report.json")
    shown = [i * per_prompt for i in range(min(len(prompts), 16))]
    tracker.log_samples(batch.images[shown], [batch.prompts[i] for i in shown], 0, key="eval_samples")
    tracker.end()
    report["report_path"] = str(target)
    log.info("eval of %s: %s", path, ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    return report
