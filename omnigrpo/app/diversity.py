"""How varied a step's images are, within each prompt's group and across the step, for any world and family.

Why: RL may please its judges by dropping the variety the prompts left open (every image in one colour, one
size, one place), and rewards alone do not show it. The figure must work for any family and run offline, so
it is pixel-space: each image is shrunk (area average) to ``SIDE x SIDE`` RGB in [0, 1], and the distance of
two images is the RMS of their difference (0: identical thumbnails; 1: black against white).

- ``diversity/group``: per group (the samples of one prompt), the mean distance over its pairs; averaged over
  the groups that have at least two samples.
- ``diversity/batch``: the mean distance over all pairs of the step's samples (prompts differ, so it also
  counts variety the prompts asked for).

Coarse on purpose: a 16 x 16 thumbnail ignores pixel noise and texture and keeps colour, size and placement,
the variety a collapse removes first.
"""

from __future__ import annotations

import numpy as np
import torch

SIDE = 16
"""Thumbnail side in pixels."""


def thumbnails(images: np.ndarray) -> torch.Tensor:
    """uint8 images ``[N, H, W, 3]`` -> float thumbnails ``[N, 3 * SIDE * SIDE]`` in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return torch.nn.functional.adaptive_avg_pool2d(x, SIDE).flatten(1)


def pixel_distances(images: np.ndarray) -> torch.Tensor:
    """RMS distances ``[N, N]`` between the thumbnails of uint8 images ``[N, H, W, 3]``: computed once per batch
    and shared by :func:`diversity` and :func:`group_spread`."""
    if len(images) == 0:
        return torch.zeros(0, 0, dtype=torch.float64)
    thumbs = thumbnails(images).double()
    return torch.cdist(thumbs, thumbs).div(thumbs.shape[1] ** 0.5)


def mean_pair_distance(d: torch.Tensor) -> float:
    """Mean of the off-diagonal entries of a distance matrix ``[n, n]`` (NaN below two samples)."""
    n = d.shape[0]
    return float(d.sum() / (n * (n - 1))) if n > 1 else float("nan")


def diversity(d: torch.Tensor, group: torch.Tensor | np.ndarray, prefix: str = "diversity/") -> dict[str, float]:
    """``{prefix}group`` and ``{prefix}batch`` of images whose :func:`pixel_distances` are ``d`` ``[N, N]`` and
    group index is ``group`` ``[N]``."""
    group = torch.as_tensor(np.asarray(group))
    per_group = [mean_pair_distance(d[m][:, m]) for g in group.unique() if int((m := group == g).sum()) > 1]
    return {f"{prefix}group": float(np.mean(per_group)) if per_group else float("nan"),
            f"{prefix}batch": mean_pair_distance(d)}


def style_entropy(styles: list, correct: list[float | None], per_prompt: int) -> float:
    """Mean over prompts of the entropy, in bits, of the joint style (any hashable, e.g. colour, size, height)
    of a prompt's samples that are right (``correct`` >= 0.5); samples come ``per_prompt`` at a time, a style
    of None (unreadable) and a wrong sample do not count, and prompts without a right sample are left out (NaN
    when none has one). Variety only counts where the text reads: noise must not score as variety.

    >>> style_entropy(["a", "b", "a", "a"], [1, 1, 1, 0], 2)  # prompt 1: a, b -> 1 bit; prompt 2: a -> 0
    0.5
    """
    per_prompt_bits = []
    for start in range(0, len(styles), per_prompt):
        kept = [s for s, c in zip(styles[start:start + per_prompt], correct[start:start + per_prompt], strict=True)
                if s is not None and c is not None and c >= 0.5]
        if kept:
            _, counts = np.unique([repr(s) for s in kept], return_counts=True)
            p = counts / counts.sum()
            per_prompt_bits.append(float(-(p * np.log2(p)).sum()))
    return float(np.mean(per_prompt_bits)) if per_prompt_bits else float("nan")


def group_spread(d: torch.Tensor, group: torch.Tensor | np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Each sample's mean distance (``d``: :func:`pixel_distances`) to the other valid samples of its group
    ``[N]`` (0 without any): the
    diversity bonus (``trainer.diversity_bonus``) adds it, scaled, to a valid sample's total, so within a group
    the sample least like its siblings gains most, and a group drawn all alike gains nothing.

    >>> black, white = np.zeros((1, 4, 4, 3), np.uint8), np.full((1, 4, 4, 3), 255, np.uint8)
    >>> d = pixel_distances(np.concatenate([black, black, white]))
    >>> group_spread(d, np.zeros(3, int), np.ones(3, bool)).round(3).tolist()
    [0.5, 0.5, 1.0]
    """
    d = d.numpy()
    group, valid = np.asarray(group), np.asarray(valid, dtype=bool)
    same = (group[:, None] == group[None, :]) & valid[None, :] & ~np.eye(len(group), dtype=bool)
    counts = same.sum(1)
    return np.where(counts > 0, (d * same).sum(1) / np.maximum(counts, 1), 0.0)


def diversity_bonus(d: torch.Tensor, group: torch.Tensor | np.ndarray, total: np.ndarray, valid: np.ndarray,
                    scale: float) -> np.ndarray:
    """``trainer.diversity_bonus`` ``[N]``: ``scale`` times each sample's :func:`group_spread` among its group's
    good samples (valid, total at or above the group's mean valid total), 0 for the others. Gated because variety
    only counts where the image does what was asked: an ungated spread pays a garbled image for being unlike its
    siblings, and at a scale that can hold a style (a 0.15 spread against rewards that differ by 0.5) it would.

    >>> black, white = np.zeros((1, 4, 4, 3), np.uint8), np.full((1, 4, 4, 3), 255, np.uint8)
    >>> d = pixel_distances(np.concatenate([black, black, white, white]))
    >>> ok = np.ones(4, bool)
    >>> diversity_bonus(d, np.zeros(4, int), np.array([1.0, 1.0, 1.0, 0.0]), ok, 2.0).round(3).tolist()
    [1.0, 1.0, 2.0, 0.0]
    """
    group, valid = np.asarray(group), np.asarray(valid, dtype=bool)
    total = np.where(valid, np.asarray(total, dtype=np.float64), np.nan)
    good = np.zeros_like(valid)
    for g in np.unique(group):
        members = (group == g) & valid
        if members.any():
            good |= members & (total >= np.nanmean(total[members]) - 1e-9)
    return scale * group_spread(d, group, good) * good
