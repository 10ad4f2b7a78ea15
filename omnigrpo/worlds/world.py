"""What every world provides, and the pieces the built-in worlds share.

Why: the driver, SFT, the built-in policy's tokenizer and ``omnigrpo eval`` must not care which
synthetic world a run uses. A world is a module with the interface :class:`World` describes; its items
(scenes, strings) carry a ``prompt`` and the ``metadata`` rewards receive.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np


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

    # Optional: ``read_style(image) -> hashable | None``, the style (free attributes the prompts do not ask for)
    # an image is drawn in; when present, evaluations report ``eval/style_entropy`` (glyphs has one).


def prompts_of(items: list) -> tuple[list[str], list[dict]]:
    """Prompts and their metadata, the form every prompt source hands to the driver."""
    return [item.prompt for item in items], [item.metadata for item in items]


def sample_rendered(items: list, n: int, rng: np.random.Generator,
                    render: Callable[[object, np.random.Generator], np.ndarray]) -> tuple[list, np.ndarray]:
    """Draw ``n`` random items (with replacement) and ``render`` each with ``rng``'s variation.

    Returns:
        the items and uint8 images ``[n, H, W, 3]``.
    """
    picks = [items[i] for i in rng.integers(0, len(items), size=n)]
    return picks, np.stack([render(item, rng) for item in picks])


def blank_share(images: np.ndarray, background: tuple[int, int, int], tolerance: float = 60.0) -> float:
    """Share of pixels within ``tolerance`` (RGB distance) of the background, over uint8 ``[B, H, W, 3]``.

    A reward-hacking guard: a policy that learns to draw nothing (or ever less) shows it here first.

    >>> blank_share(np.zeros((1, 2, 2, 3), np.uint8), (0, 0, 0))
    1.0
    """
    dist = np.linalg.norm(images.astype(np.float32) - np.asarray(background, np.float32), axis=-1)
    return float((dist <= tolerance).mean())
