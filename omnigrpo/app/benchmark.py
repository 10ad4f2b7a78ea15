"""``omnigrpo eval --benchmark``: GenEval and LongText-Bench by their published protocols, on any checkpoint.

Why: a score beside a paper's table needs the paper's prompts, images per prompt and scoring rules, and a record of
everything that moves the number (model, seed, sampling settings, judge models and versions). The prompt sets
ship in ``omnigrpo/data/benchmarks``; the judges are the ``geneval`` and ``longtext`` rewards. Sampling and
judging run in this process with the run's own worker classes, a batch of prompts at a time. docs/evaluation.md
states the protocol and how these scores relate to the published ones.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omnigrpo.app.evaluator import paint, rollout_worker
from omnigrpo.app.preflight import check_eval
from omnigrpo.app.tracking import Tracker
from omnigrpo.config import options
from omnigrpo.config.loader import ConfigError
from omnigrpo.config.runtime import checkpoint_eval_seed
from omnigrpo.config.schema import Config, RewardSpec
from omnigrpo.data.benchmarks import load_benchmark, split
from omnigrpo.rewards.judges.longtext import aggregate
from omnigrpo.rewards.registry import build_reward
from omnigrpo.rollout.hub import is_local

log = logging.getLogger(__name__)
SHOWN_PER_GROUP = 16
"""Images per tag (GenEval) or category (LongText) in the report's MLflow grids."""


@dataclass(frozen=True)
class Protocol:
    """How one benchmark is run and scored."""

    judge: str
    """The reward that judges it (its config, if the run configures one, sets the judge's models and device)."""
    per_prompt: int
    """Images per prompt of the published protocol (GenEval: 4; LongText-Bench: 1)."""
    group: str
    """The metadata key the scores are broken down by (and the grids drawn per)."""
    packages: tuple[str, ...]
    """Packages whose versions move the score; recorded in the report."""


PROTOCOLS = {
    "geneval": Protocol("geneval", 4, "tag", ("torch", "transformers", "open_clip_torch")),
    "longtext": Protocol("longtext", 1, "category", ("torch", "transformers")),
    "longtext-zh": Protocol("longtext", 1, "category", ("torch", "transformers")),
}


def subset(metadata: list[dict], key: str, limit: int) -> list[int]:
    """Indices of ``limit`` prompts taken in turn from each value of ``key`` (file order within each), so a quick
    look covers every tag or category; all prompts when ``limit`` is 0.

    >>> subset([{"t": "a"}, {"t": "a"}, {"t": "b"}], "t", 2)
    [0, 2]
    """
    if not limit or limit >= len(metadata):
        return list(range(len(metadata)))
    queues: dict[str, list[int]] = defaultdict(list)
    for i, meta in enumerate(metadata):
        queues[str(meta.get(key, ""))].append(i)
    chosen: list[int] = []
    while len(chosen) < limit:
        for queue in queues.values():
            if queue and len(chosen) < limit:
                chosen.append(queue.pop(0))
    return sorted(chosen)


def policy_dir(model_path: str) -> str:
    """The local directory of the config's model: itself, or a hub id's snapshot (downloaded unless offline)."""
    if not model_path:
        raise ConfigError("--checkpoint: required when model.path is empty (the built-in SFT policy)")
    if is_local(model_path):
        return model_path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model_path)
    except Exception as err:  # noqa: BLE001 - offline and not cached, unknown id: the user's to fix, named
        raise ConfigError(f"model.path: {model_path!r} is neither a directory nor a hub id this machine can "
                          f"fetch or finds cached ({type(err).__name__})") from None


def judge_spec(cfg: Config, name: str) -> RewardSpec:
    """The run's own configuration of the judge ``name`` (its models, device), else the judge's defaults."""
    return next((spec for spec in cfg.rewards if spec.name == name), RewardSpec(name=name))


def judge_versions(spec: RewardSpec, packages: tuple[str, ...]) -> dict:
    """What a judge's score depends on: its arguments, each hub model's cached revision, package versions."""
    models = {}
    for key, value in spec.kwargs.items():
        if isinstance(value, str) and value.count("/") == 1 and not Path(value).exists():
            models[key] = {"hub_id": value, "revision": _revision(value)}
        elif isinstance(value, str) and Path(value).exists():
            models[key] = {"path": str(Path(value).resolve())}
    versions = {}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"reward": spec.name, "kwargs": spec.kwargs, "models": models, "packages": versions}


def _revision(repo: str) -> str | None:
    """The commit of ``repo`` in the local Hugging Face cache (None when it is not there)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, local_files_only=True)).name
    except Exception:  # noqa: BLE001 - not cached, or not a hub id: nothing to record
        return None


def geneval_scores(verdicts: list, metadata: list[dict]) -> tuple[dict[str, float], list[dict]]:
    """GenEval's score (the mean over tags of each tag's share of correct images), each tag's, and the mean
    partial credit; and a row per image."""
    by_tag: dict[str, list[bool]] = defaultdict(list)
    for verdict, meta in zip(verdicts, metadata, strict=True):
        by_tag[meta["tag"]].append(verdict.strict)
    metrics = {f"geneval/{tag}": float(np.mean(hits)) for tag, hits in sorted(by_tag.items())}
    metrics["geneval/overall"] = float(np.mean(list(metrics.values())))
    metrics["geneval/partial"] = float(np.mean([v.partial for v in verdicts]))
    rows = [{"tag": m["tag"], "correct": v.strict, "partial": v.partial, "reason": v.reason}
            for v, m in zip(verdicts, metadata, strict=True)]
    return metrics, rows


def longtext_scores(readings: list, metadata: list[dict], prefix: str) -> tuple[dict[str, float], list[dict]]:
    """LongText-Bench's score (matched over ground-truth units, summed over images), per category and length,
    and the failed readings; and a row per image."""
    metrics = aggregate(readings, metadata).metrics(prefix)
    rows = [{"category": m.get("category"), "length": m.get("length"), "read": r.text, "matched": r.matched,
             "total": r.total, "score": None if r.text is None else r.score}
            for r, m in zip(readings, metadata, strict=True)]
    return metrics, rows


def caption(row: dict) -> str:
    """A grid caption: the verdict and why."""
    if "correct" in row:
        return ("OK " if row["correct"] else "NO ") + row["reason"]
    return "failed" if row["score"] is None else f"{row['score']:.2f} read: {row['read']}"


def evaluate_benchmark(cfg: Config, benchmark: str, checkpoint: str = "", limit: int = 0, samples: int = 0,
                       out: str = "", force: bool = False, held_out: bool = False) -> dict:
    """Sample the benchmark's prompts, judge them by its rules, report; returns the report (also written to
    ``out`` and logged to MLflow as a run of its own).

    Args:
        benchmark: ``geneval``, ``longtext`` or ``longtext-zh``.
        checkpoint: a policy directory; empty = the config's ``model.path``.
        limit: prompts evaluated (taken in turn from every tag or category); 0 = all.
        samples: images per prompt; 0 = the protocol's.
        held_out: only the prompts the config's ``data.held_out_share`` split keeps out of training.
    """
    protocol = PROTOCOLS[benchmark]
    path, _, _ = check_eval(cfg, checkpoint or policy_dir(cfg.model.path), "")
    prompts, metadata = load_benchmark(benchmark)
    if held_out:
        if not cfg.data.held_out_share:
            raise ConfigError("--held-out: data.held_out_share is 0, so no prompt is held out")
        _, (prompts, metadata) = split(prompts, metadata, cfg.data.held_out_share, cfg.data.held_out_seed)
    chosen = subset(metadata, protocol.group, limit)
    prompts, metadata = [prompts[i] for i in chosen], [metadata[i] for i in chosen]
    per_prompt = samples or protocol.per_prompt
    target = Path(out) if out else Path(cfg.run.dir) / "eval" / f"{benchmark}-{path.name}.json"
    options.writable(target, "--out" if out else "the report (--out)", force)
    spec = judge_spec(cfg, protocol.judge)
    try:
        judge = build_reward(spec.name, spec.kwargs)  # built first: a judge that cannot load fails before sampling
    except Exception as err:  # noqa: BLE001 - any judge's start-up fault is the user's to fix, named
        raise ConfigError(f"--benchmark {benchmark}: the {spec.name} judge could not start: {err}") from None
    seed = checkpoint_eval_seed(cfg.run.seed)
    rollout = rollout_worker(cfg, str(path))
    rollout.setup()
    images, shown_meta, judged = [], [], []
    step = cfg.rollout.prompts_per_step
    for start in range(0, len(prompts), step):
        batch = rollout.generate(prompts[start:start + step], metadata[start:start + step], per_prompt)
        if cfg.decoder.path:  # X-Omni: the configured diffusion decoder paints the codes
            batch.images = paint(cfg, batch.codes, batch.grid)
        judged += judge.judge(batch.images, batch.metadata)
        images.append(batch.images)
        shown_meta += batch.metadata
        log.info("%s: %d of %d prompts judged", benchmark, min(start + step, len(prompts)), len(prompts))
    images = np.concatenate(images)
    if protocol.judge == "geneval":
        metrics, rows = geneval_scores(judged, shown_meta)
    else:
        metrics, rows = longtext_scores(judged, shown_meta, benchmark.replace("-", "_"))
    for i, row in enumerate(rows):
        row.update(prompt=prompts[i // per_prompt], sample=i % per_prompt)
    report = {"benchmark": benchmark, "protocol": f"{benchmark}-protocol", "checkpoint": str(path),
              "prompts": f"held out by data.held_out_share={cfg.data.held_out_share}, seed {cfg.data.held_out_seed}"
              if held_out else "all",
              "model": {"path": cfg.model.path, "family": cfg.model.family}, "seed": seed,
              "sampling": dataclasses.asdict(cfg.rollout), "num_prompts": len(prompts), "limit": limit,
              "samples_per_prompt": per_prompt, "judge": judge_versions(spec, protocol.packages),
              "metrics": metrics, "images": rows}
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    report["run_id"] = log_report(cfg, report, images, protocol.group, f"eval:{benchmark}:{path.name}")
    report["report_path"] = str(target)
    return report


def log_report(cfg: Config, report: dict, images: np.ndarray, group: str, name: str) -> str:
    """The report's metrics and JSON, and a grid of images per tag or category captioned with each verdict, as an
    MLflow run of its own; returns its id."""
    tracking = dataclasses.replace(cfg.tracking, run_name=cfg.tracking.run_name or name)
    tracker = Tracker.from_config(dataclasses.replace(cfg, tracking=tracking))
    run_id = tracker.start()
    tracker.log(report["metrics"], 0)
    tracker.log_dict(report, "benchmark_report.json")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(report["images"]):
        if len(groups[str(row[group])]) < SHOWN_PER_GROUP:
            groups[str(row[group])].append(i)
    for value, shown in groups.items():
        tracker.log_samples(images[shown], [caption(report["images"][i]) for i in shown], 0,
                            key=f"{report['benchmark']}_{value}")
    tracker.end()
    return run_id
