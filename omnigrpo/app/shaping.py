"""Reward shaping: the judges' totals turned into what the GRPO update sees, a stage of its own.

Why: remedies against RL collapsing the looks the prompts leave open are research knobs of a run, not part of the
GRPO math (``omnigrpo.trainers.grpo.advantages`` stays the plain group normalisation). All off by default: before
the advantages, the diversity bonus (``trainer.diversity_bonus``) and the baseline per look (``trainer.baseline_by``)
shape the totals; after them, GARDO's diversity weight of positive advantages (``trainer.diversity_advantage``) and
its KL gated to the samples a watchdog doubts (``trainer.kl_uncertain_frac``). Logged rewards stay the judges'.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import numpy as np
import torch

from omnigrpo.app.diversity import look_labels, pixel_distances, style_distances
from omnigrpo.config.schema import TrainerConfig
from omnigrpo.rewards.worker import RewardResult
from omnigrpo.worlds.world import World

StyleReader = Callable[[np.ndarray], Hashable | None]
"""A world's ``read_style``: uint8 image ``[H, W, 3]`` -> its style, None when nothing is readable."""


@dataclass(frozen=True)
class Shaped:
    """A step's shaped totals and the bonus that went into them."""

    totals: torch.Tensor
    """``[N]`` float64 totals for the advantages (the judges' totals when nothing is shaped; any value where
    excluded)."""
    bonus: torch.Tensor
    """``[N]`` float64 diversity bonus added to each sample's total (0 where none was paid)."""
    bonus_mean: float
    """Mean bonus over the valid samples (0 without any)."""
    styles: list | None = None
    """Each sample's style as read back from its pixels (:meth:`Shaping.styles`), for :meth:`Shaping.weigh`."""

    def metrics(self) -> dict[str, float]:
        """What a step logs of its shaping."""
        return {"diversity/bonus_mean": self.bonus_mean}


@dataclass(frozen=True)
class Shaping:
    """The shaping a run's ``trainer`` section asks for, over groups of ``group_size`` contiguous samples."""

    trainer: TrainerConfig
    group_size: int
    read_style: StyleReader | None = None
    """Needed by ``diversity_space: style`` and ``baseline_by`` (preflight refuses them for a world without one)."""
    watch: str = ""
    """Metric key of the run's first watchdog reward (``rewards.N.watch``), read by ``kl_uncertain_frac``."""

    @classmethod
    def for_world(cls, trainer: TrainerConfig, group_size: int, world: World, watch: str = "") -> Shaping:
        """The shaping of a run in ``world`` (a world module; its ``read_style`` where it has one)."""
        return cls(trainer, group_size, getattr(world, "read_style", None), watch)

    def __call__(self, totals: torch.Tensor, valid: torch.Tensor, images: np.ndarray,
                 distances: torch.Tensor | None = None) -> Shaped:
        """A step's shaped totals: the diversity bonus first (gated on the judges' totals), then the baseline per
        look over the totals with their bonus.

        Args:
            totals: ``[N]`` the judges' totals (any value, even NaN, where ``valid`` is False).
            valid: ``[N]`` bool, False for excluded samples.
            images: uint8 ``[N, H, W, 3]``; styles are read from them only when an option needs them.
            distances: ``[N, N]`` :func:`pixel_distances` of ``images`` when the caller has them already.
        """
        tr, k = self.trainer, self.group_size
        r, ok = totals.double().view(-1, k), valid.bool().view(-1, k)
        styles = self.styles(images)
        paid = torch.zeros_like(r)
        if tr.diversity_bonus:
            d = style_distances(styles) if tr.diversity_space == "style" else (
                pixel_distances(images) if distances is None else distances)
            paid = tr.diversity_bonus * spread_among_good(r, ok, within_groups(d, k))
        shaped = r + paid
        if tr.baseline_by:
            shaped = baseline_per_look(shaped, ok, look_labels(styles, tr.baseline_by).view(-1, k))
        return Shaped(shaped.flatten(), paid.flatten(), float(paid[ok].mean()) if ok.any() else 0.0, styles)

    def weigh(self, advantages: torch.Tensor, valid: torch.Tensor, images: np.ndarray,
              distances: torch.Tensor | None = None, styles: list | None = None) -> torch.Tensor:
        """``[N]`` advantages with each positive one multiplied by ``1 + trainer.diversity_advantage * d``, ``d`` the
        sample's :func:`nearest_novelty` in its group (style space where the world reads styles, else pixels);
        the others, and every advantage when the option is off, unchanged.

        Args:
            advantages: ``[N]`` from ``grpo.advantages``; valid: ``[N]`` bool; images: uint8 ``[N, H, W, 3]``.
            distances: ``[N, N]`` :func:`pixel_distances` of ``images`` when the caller has them already.
            styles: the step's :attr:`Shaped.styles`, when ``__call__`` read them already.
        """
        scale = self.trainer.diversity_advantage
        if not scale:
            return advantages
        if self.read_style is not None:
            d = style_distances(styles if styles is not None else [self.read_style(image) for image in images])
        else:
            d = pixel_distances(images) if distances is None else distances
        k = self.group_size
        weight = 1.0 + scale * nearest_novelty(within_groups(d, k), valid.bool().view(-1, k)).flatten()
        return torch.where(advantages > 0, advantages * weight.to(advantages.dtype), advantages)

    def kl_weights(self, result: RewardResult) -> torch.Tensor | None:
        """``[N]`` float32 per-sample weights of the KL term (``trainer.kl_uncertain_frac``, :func:`uncertain`
        between the training total and the watchdog's scores); None when every sample keeps the KL."""
        frac = self.trainer.kl_uncertain_frac
        if frac >= 1.0:
            return None
        if not self.watch:
            raise ValueError("trainer.kl_uncertain_frac below 1 needs a watchdog reward (rewards.N.watch: true)")
        i = result.names.index(self.watch)
        scored = result.valid & result.applicable[i] & ~result.failed[i]
        return uncertain(torch.from_numpy(result.total), torch.from_numpy(result.scores[i]),
                         torch.from_numpy(scored), frac)

    def styles(self, images: np.ndarray) -> list | None:
        """Each image's style read back from its pixels (once a step, for every option that reads them), or None
        when no option reads styles."""
        tr = self.trainer
        needed = tr.baseline_by or (tr.diversity_bonus and tr.diversity_space == "style")
        if needed and self.read_style is None:
            raise ValueError("trainer.baseline_by and trainer.diversity_space: style need the world's read_style")
        if not needed and not (tr.diversity_advantage and self.read_style is not None):
            return None
        return [self.read_style(image) for image in images]


def within_groups(d: torch.Tensor, k: int) -> torch.Tensor:
    """The diagonal blocks ``[G, k, k]`` of a distance matrix ``[G * k, G * k]``."""
    g = d.shape[0] // k
    return d.view(g, k, g, k).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def spread_among_good(r: torch.Tensor, ok: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``[G, k]``: each good sample's mean distance (``blocks`` ``[G, k, k]``) to its group's other good samples,
    0 without any and for samples that are not good. Good: valid and at or above the group's mean valid total
    ``r`` ``[G, k]``; gated because variety only counts where the image does what was asked."""
    mean = torch.nanmean(torch.where(ok, r, torch.nan), 1, keepdim=True)
    good = ok & (r >= mean - 1e-9)
    siblings = good[:, None, :] & ~torch.eye(r.shape[1], dtype=torch.bool)
    counts = siblings.sum(-1)
    spread = (blocks.double() * siblings).sum(-1) / counts.clamp_min(1)
    return torch.where(good & (counts > 0), spread, 0.0)


def baseline_per_look(t: torch.Tensor, ok: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Totals ``[G, k]`` whose plain group normalisation centres each sample on its look (``labels`` ``[G, k]``,
    -1: no readable look). A valid labelled sample's total becomes ``t - mean of its look's valid samples + mean
    of the group's valid labelled samples``; the others keep ``t``. Each look's shaped mean is then the labelled
    mean and the group's mean is unchanged, so a labelled sample's advantage is its gap within its look plus
    the labelled samples' shared gap over the unlabelled (0 when every sample has a look), a sample alone in its
    look gets only that share, and an unlabelled one keeps the group's baseline. The scale of the advantages
    (their group's std) is the spread of these totals: what is left within the looks."""
    x = torch.where(ok, t, 0.0)
    same = (labels[:, :, None] == labels[:, None, :]) & ok[:, None, :]  # [G, k, k]: j is a valid same-look sibling
    look_mean = (same * x[:, None, :]).sum(-1) / same.sum(-1).clamp_min(1)
    labelled = ok & (labels >= 0)
    labelled_mean = (x * labelled).sum(1, keepdim=True) / labelled.sum(1, keepdim=True).clamp_min(1)
    return torch.where(labelled, t - look_mean + labelled_mean, t)


def nearest_novelty(blocks: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """``[G, k]`` in 0..1: each valid sample's distance (``blocks`` ``[G, k, k]``) to its nearest valid sibling,
    divided by the largest such distance in its group; 0 for samples without a valid sibling, and across a group
    whose distances are all equal (no sample is more novel than another)."""
    siblings = ok[:, None, :] & ~torch.eye(ok.shape[1], dtype=torch.bool)
    has = ok & siblings.any(-1)
    nearest = torch.where(has, torch.where(siblings, blocks.double(), torch.inf).amin(-1), 0.0)
    top = nearest.amax(1, keepdim=True)
    spread = top > torch.where(has, nearest, torch.inf).amin(1, keepdim=True)
    return torch.where(has & spread, nearest / top.clamp_min(1e-12), 0.0)


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """``[M]`` float64 0-based ranks of ``x`` ``[M]`` in ascending order, ties sharing their mean rank.

    >>> average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist()
    [2.5, 0.0, 2.5, 1.0]
    """
    below = (x[:, None] > x[None, :]).sum(1)
    tied = (x[:, None] == x[None, :]).sum(1)
    return below.double() + (tied.double() - 1.0) / 2.0


def uncertain(main: torch.Tensor, watch: torch.Tensor, scored: torch.Tensor, frac: float) -> torch.Tensor:
    """``[N]`` float32 KL weights: 1 for the ``ceil(frac * M)`` of the ``M`` scored samples whose ranks under
    ``main`` and ``watch`` (both ``[N]``, ranked among the scored samples) differ most, ties going to the earlier
    sample, and for every sample not ``scored`` (``[N]`` bool: nothing says the judges agree there); 0 elsewhere.
    Where the watchdog ranks a sample as the training judges do, the reward is trusted and the policy may leave
    the reference; where they disagree the KL holds it back."""
    rows = scored.bool()
    m = int(rows.sum())
    gap = (average_ranks(main.double()[rows]) - average_ranks(watch.double()[rows])).abs()
    keep = torch.zeros(m)
    keep[torch.argsort(-gap, stable=True)[:math.ceil(round(frac * m, 9))]] = 1.0
    weights = torch.ones(len(main))
    weights[rows] = keep
    return weights
