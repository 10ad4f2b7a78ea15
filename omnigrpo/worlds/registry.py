"""The built-in worlds and what every world provides.

Why: the driver, SFT, the policy's tokenizer and ``omnigrpo eval`` must not care which synthetic world
a run uses. A world is a module with the interface :class:`World` describes (``shapes``: coloured
shapes judged from pixels; ``glyphs``: rendered strings judged by OCR); ``world.name`` in the config
picks one through :func:`get`.
"""

from __future__ import annotations

from types import ModuleType
from typing import Protocol

import numpy as np

from omnigrpo.platform import glyphs, shapes

WORLDS: dict[str, ModuleType] = {"shapes": shapes, "glyphs": glyphs}


class World(Protocol):
    """What a world module defines (module-level names)."""

    IMAGE_SHAPE: tuple[int, int]
    """(height, width) of its images, multiples of the codebook's patch."""
    BACKGROUND: tuple[int, int, int]
    """Background colour; pixels near it count as blank in the ``guard/blank_frac`` metric."""
    EVAL: dict[str, tuple[str, dict]]
    """Held-out metric name -> (reward name, kwargs); the first is the headline metric."""

    def train_items(self) -> list: ...
    def held_out_items(self) -> list: ...
    def words(self, prompt: str) -> list[str]: ...
    def vocabulary(self) -> list[str]: ...
    def sample_pairs(self, items: list, n: int, rng: np.random.Generator) -> tuple[list, np.ndarray]: ...
    def prompts_of(self, items: list) -> tuple[list[str], list[dict]]: ...


def get(name: str) -> World:
    """The world module called ``name``; raises KeyError naming the known ones."""
    if name not in WORLDS:
        raise KeyError(f"unknown world {name!r}; known: {', '.join(sorted(WORLDS))}")
    return WORLDS[name]  # type: ignore[return-value]


def blank_share(images: np.ndarray, background: tuple[int, int, int], tolerance: float = 60.0) -> float:
    """Share of pixels within ``tolerance`` (RGB distance) of the background, over uint8 ``[B, H, W, 3]``.

    A reward-hacking guard: a policy that learns to draw nothing (or ever less) shows it here first.

    >>> blank_share(np.zeros((1, 2, 2, 3), np.uint8), (0, 0, 0))
    1.0
    """
    dist = np.linalg.norm(images.astype(np.float32) - np.asarray(background, np.float32), axis=-1)
    return float((dist <= tolerance).mean())
