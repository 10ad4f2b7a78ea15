"""How varied a step's images are, within each prompt's group and across the step, for any world and family.

Why: RL may please its judges by dropping the variety the prompts left open (every image in one colour, one size,
one place), and rewards alone do not show it. The measure must work for any family and offline, so it is pixel-space
and coarse on purpose: the RMS distance of ``SIDE x SIDE`` area-averaged RGB thumbnails, which keeps colour, size
and placement and ignores noise and texture. ``diversity/group`` averages it over the pairs within each prompt's
group, ``diversity/batch`` over all of the step's pairs (docs/design.md, "Watchdogs").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

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
    and shared by :func:`diversity` and the diversity bonus (``omnigrpo.app.shaping``)."""
    if len(images) == 0:
        return torch.zeros(0, 0, dtype=torch.float64)
    thumbs = thumbnails(images).double()
    return torch.cdist(thumbs, thumbs).div(thumbs.shape[1] ** 0.5)


def attribute_codes(styles: list, names: Sequence[str] = ()) -> torch.Tensor:
    """long ``[N, A]``: per sample, an index for the value of each style attribute (the fields ``names``, or every
    field of a dataclass style, or every entry of a tuple), equal values alike; -1 across a row whose style is
    None (nothing readable)."""
    rows = [None if s is None else tuple(getattr(s, n) for n in names) if names else
            dataclasses.astuple(s) if dataclasses.is_dataclass(s) else tuple(s) for s in styles]
    read = [r for r in rows if r is not None]
    width = len(read[0]) if read else len(names)
    ids = [{v: i for i, v in enumerate(sorted({repr(r[a]) for r in read}))} for a in range(width)]
    return torch.tensor([[ids[a][repr(r[a])] for a in range(width)] if r is not None else [-1] * width
                         for r in rows], dtype=torch.long).view(len(rows), width)


def look_labels(styles: list, names: Sequence[str]) -> torch.Tensor:
    """long ``[N]``: one label per combination of the attributes ``names`` (``trainer.baseline_by``), -1 for a
    sample with no readable style."""
    codes = attribute_codes(styles, names)
    labels = torch.full((len(styles),), -1, dtype=torch.long)
    readable = (codes >= 0).all(1)
    if readable.any():
        labels[readable] = torch.unique(codes[readable], dim=0, return_inverse=True)[1]
    return labels


def style_distances(styles: list) -> torch.Tensor:
    """Distances ``[N, N]`` in 0..1 between samples by the free attributes a world reads back from their pixels
    (``read_style``: glyphs' colour, size, height), for the diversity bonus in ``trainer.diversity_space: style``.

    Two samples are the weighted share of attributes they differ in; each attribute weighs the share of its
    commonest value among the step's readable samples (normalised over attributes), so variety pays most in the
    attribute that is collapsing. A sample with no readable style (None) is at 0 from every other: it earns no
    bonus, and neither do stray marks, which move a thumbnail but not the letters' read-back style.

    >>> d = style_distances([("red", 1), ("red", 2), ("red", 3), ("blue", 3), None])  # weights 0.75, 0.5 -> 0.6, 0.4
    >>> [round(x, 3) for x in d[2].tolist()]  # differing in colour, the attribute collapsing most, pays most
    [0.4, 0.4, 0.0, 0.6, 0.0]
    """
    codes = attribute_codes(styles)
    readable = (codes >= 0).all(1) if codes.shape[1] else torch.zeros(len(styles), dtype=torch.bool)
    if int(readable.sum()) < 2:
        return torch.zeros(len(styles), len(styles), dtype=torch.float64)
    seen = codes[readable]
    weights = torch.stack([torch.bincount(column).max() for column in seen.T]).double() / len(seen)
    differ = (codes[:, None, :] != codes[None, :, :]).double() @ (weights / weights.sum())
    return torch.where(readable[:, None] & readable[None, :], differ, 0.0)


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
