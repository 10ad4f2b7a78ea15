"""Scores decoded images with every configured reward and combines them, never hiding a failure.

Why: a judge that crashes or returns garbage must not become a silent 0 that the policy then learns from.
:class:`RewardWorker` runs each reward, keeps its raw scores and records a failure when it raises, returns the wrong
number of scores or a non-score (``protocol.is_score``). :func:`combine` forms the weighted total: a failed
*required* reward excludes the sample; a failed optional or a ``None`` score drops out and the total is re-scaled by
``sum(all weights) / sum(weights that scored)``; every failure is counted (docs/rewards.md). A plain class;
``omnigrpo.cluster`` wraps it into a Ray actor.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from omnigrpo.config.schema import RewardSpec
from omnigrpo.rewards.protocol import call_reward, is_score
from omnigrpo.rewards.registry import build_reward
from omnigrpo.rewards.throttle import OutputThrottle

log = logging.getLogger(__name__)


@dataclass
class RewardResult:
    """Scores of N samples under R rewards.

    ``scores``: float ``[R, N]`` (NaN where failed or not applicable); ``failed``/``applicable``:
    bool ``[R, N]``; ``total``: ``[N]`` (NaN where excluded); ``valid``: bool ``[N]``.
    """

    names: list[str]
    scores: np.ndarray
    failed: np.ndarray
    applicable: np.ndarray
    total: np.ndarray
    valid: np.ndarray
    errors: dict[str, str] = field(default_factory=dict)

    @staticmethod
    def concat(parts: list[RewardResult]) -> RewardResult:
        """Join the results of consecutive shards of one batch."""
        return RewardResult(
            names=parts[0].names,
            scores=np.concatenate([p.scores for p in parts], axis=1),
            failed=np.concatenate([p.failed for p in parts], axis=1),
            applicable=np.concatenate([p.applicable for p in parts], axis=1),
            total=np.concatenate([p.total for p in parts]),
            valid=np.concatenate([p.valid for p in parts]),
            errors={k: v for p in parts for k, v in p.errors.items()},
        )

    def state(self) -> dict:
        """The result as tensors, strings and numbers only (for the run state, loaded with ``weights_only``)."""
        arrays = {k: torch.from_numpy(np.ascontiguousarray(getattr(self, k)))
                  for k in ("scores", "failed", "applicable", "total", "valid")}
        return {"names": list(self.names), **arrays, "errors": dict(self.errors)}

    @staticmethod
    def from_state(state: dict) -> RewardResult:
        """Inverse of :meth:`state`."""
        arrays = {k: state[k].numpy() for k in ("scores", "failed", "applicable", "total", "valid")}
        return RewardResult(names=state["names"], errors=state["errors"], **arrays)

    def metrics(self, prefix: str = "reward") -> dict[str, float]:
        """Flat metrics: per reward mean/std over the samples it scored and its failures, the total."""
        out: dict[str, float] = {}
        for i, name in enumerate(self.names):
            scored = self.scores[i][self.applicable[i] & ~self.failed[i]]
            out[f"{prefix}/{name}/mean"] = float(scored.mean()) if scored.size else math.nan
            out[f"{prefix}/{name}/std"] = float(scored.std()) if scored.size else math.nan
            out[f"{prefix}/{name}/failed"] = float(self.failed[i].sum())
        totals = self.total[self.valid]
        out[f"{prefix}/total/mean"] = float(totals.mean()) if totals.size else math.nan
        out[f"{prefix}/total/std"] = float(totals.std()) if totals.size else math.nan
        out[f"{prefix}/failed"] = float((~self.valid).sum())
        return out


def combine(
    scores: np.ndarray, failed: np.ndarray, applicable: np.ndarray, weights: list[float], required: list[bool]
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted total ``[N]`` and validity ``[N]`` from per-reward ``[R, N]`` arrays (rules above)."""
    w = np.asarray(weights, dtype=np.float64)[:, None]
    req = np.asarray(required, dtype=bool)[:, None]
    counted = applicable & ~failed
    scored_weight = (w * counted).sum(0)
    valid = ~(failed & req).any(0) & (scored_weight > 0)  # only weight-0 rewards scored: no total
    raw = (w * np.where(counted, scores, 0.0)).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        total = raw * w.sum() / scored_weight
    return np.where(valid, total, np.nan), valid


class JudgeStartError(RuntimeError):
    """A reward could not be built or failed its dry run where it runs (its message names ``rewards.N``)."""


@dataclass(frozen=True)
class DryRun:
    """What a reward actor dry-runs its judges on: image ``shape`` (H, W) and two prompts with metadata."""

    shape: tuple[int, int]
    prompts: list[str]
    metadata: list[dict]


class RewardWorker:
    """Builds each configured reward once (in :meth:`setup`) and scores batches of images."""

    def __init__(self, specs: list[RewardSpec], output_kb: int = 0):
        self.specs = list(specs)
        self.output_kb = output_kb
        """KB per minute this process may print (:class:`~omnigrpo.rewards.throttle.OutputThrottle`); 0 = no cap.
        For a process of its own (a reward actor): the cap replaces file descriptors 1 and 2."""
        self.fns: list = []

    def setup(self, dry_run: DryRun | None = None) -> list[str]:
        """Build every reward here, on this process's devices; with ``dry_run``, call each on two blank images.
        Raises :class:`JudgeStartError` naming the reward (``rewards.N``) that could not be built or failed."""
        if self.output_kb:
            OutputThrottle.once(self.output_kb << 10)
        self.fns = []
        for i, spec in enumerate(self.specs):
            try:
                self.fns.append(build_reward(spec.name, spec.kwargs))
            except KeyboardInterrupt:
                raise
            except BaseException as err:  # noqa: BLE001 - reported with the reward's config key (sys.exit too)
                raise JudgeStartError(f"rewards.{i}: reward {spec.name!r} could not be built: "
                                      f"{type(err).__name__}: {err}") from None
        if dry_run is not None:
            self.dry_run(dry_run)
        return [s.key for s in self.specs]

    def dry_run(self, inputs: DryRun) -> None:
        """Each reward on two blank images ``[2, H, W, 3]`` of the policy's size: a judge that cannot score
        stops the run at start-up, not at step 1."""
        blank = np.zeros((2, *inputs.shape, 3), dtype=np.uint8)
        for i, (spec, fn) in enumerate(zip(self.specs, self.fns, strict=True)):
            try:
                count = len(call_reward(fn, blank, inputs.prompts, inputs.metadata))
            except Exception as err:  # noqa: BLE001 - any failure of a user's judge is reported, never raised raw
                raise JudgeStartError(f"rewards.{i}: reward {spec.name!r} failed its dry run on 2 blank images: "
                                      f"{type(err).__name__}: {err}") from None
            if count != 2:
                raise JudgeStartError(f"rewards.{i}: reward {spec.name!r} returned {count} scores for 2 images in "
                                      "its dry run")

    def score(self, images: np.ndarray, prompts: list[str], metadata: list[dict]) -> RewardResult:
        """Score uint8 images ``[N, H, W, 3]`` against their prompts and metadata."""
        n, r = len(prompts), len(self.specs)
        scores = np.full((r, n), np.nan)
        failed = np.zeros((r, n), dtype=bool)
        applicable = np.ones((r, n), dtype=bool)
        errors: dict[str, str] = {}
        for i, (spec, fn) in enumerate(zip(self.specs, self.fns, strict=True)):
            rows = [j for j in range(n) if applies_to(spec.tags, metadata[j])]
            applicable[i] = False
            applicable[i, rows] = True
            if not rows:
                continue
            try:
                sub = (images, prompts, metadata) if len(rows) == n else (
                    images[rows], [prompts[j] for j in rows], [metadata[j] for j in rows])
                values = call_reward(fn, *sub)
                if not isinstance(values, list | tuple | np.ndarray) or len(values) != len(rows):
                    got = len(values) if hasattr(values, "__len__") else type(values).__name__
                    raise ValueError(f"returned {got} scores for {len(rows)} images")
            except Exception as err:  # noqa: BLE001 - any judge error is a reported failure, not a crash
                failed[i, rows] = True
                errors[spec.key] = f"{type(err).__name__}: {err}"
                log.warning("reward %s failed on the whole batch: %s", spec.key, errors[spec.key])
                continue
            bad = 0
            for j, v in zip(rows, values, strict=True):
                if v is None:
                    applicable[i, j] = False
                elif is_score(v):
                    scores[i, j] = float(v)
                else:
                    failed[i, j] = True
                    bad += 1
                    errors.setdefault(spec.key, f"sample {j}: invalid score {v!r}")
            if bad:
                log.warning("reward %s: %d of %d scores are not finite numbers (as float32), counted as failed: %s",
                            spec.key, bad, len(rows), errors[spec.key])
        total, valid = combine(scores, failed, applicable, [s.weight for s in self.specs],
                               [s.required and not s.watch for s in self.specs])  # a watchdog never excludes
        return RewardResult([s.key for s in self.specs], scores, failed, applicable, total, valid, errors)


def applies_to(tags: list[str], metadata: dict | None) -> bool:
    """Does a reward with ``tags`` apply to a sample with this metadata? (no tags: always)."""
    if not tags:
        return True
    have = (metadata or {}).get("tags") or []
    have = [have] if isinstance(have, str) else have if isinstance(have, list | tuple) else []
    return bool(set(tags) & {str(t) for t in have})
