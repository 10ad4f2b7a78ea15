"""The shapes world's judge: reads colour, position and kind of the shape from decoded pixels.

Why: a reward that looked at tokens would let the policy win without drawing anything; like every image judge on
this platform, this one sees only the uint8 image the decoder produced. Pixels far from the background are the
shape, their dominant palette colour is its colour, their centroid's quadrant its position, and how much of its
bounding box it fills tells a square (~1) from a circle (~0.79) from a triangle (~0.5). The prompt is parsed with
the world's grammar, so user prompts that follow it are scored too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from omnigrpo.rewards.registry import register_reward
from omnigrpo.worlds import shapes

_PALETTE = np.array(list(shapes.COLORS.values()), dtype=np.float32)
_COLOR_NAMES = list(shapes.COLORS)
_FOREGROUND_DIST = 60.0  # RGB distance from the background beyond which a pixel is "shape"
_MIN_PIXELS = 6  # fewer foreground pixels than this: no shape was drawn


@dataclass(frozen=True)
class Reading:
    """What the judge saw in one image; ``None`` fields: nothing recognisable was drawn."""

    shape: str | None
    color: str | None
    position: str | None


def read_image(image: np.ndarray) -> Reading:
    """Analyse one uint8 image ``[H, W, 3]``."""
    pixels = image.astype(np.float32)
    fg = np.linalg.norm(pixels - np.array(shapes.BACKGROUND, np.float32), axis=-1) > _FOREGROUND_DIST
    # Decoded patches leave stray pixels around edges: open the mask and keep its largest blob.
    fg = ndimage.binary_opening(fg, structure=np.ones((2, 2), bool))
    labels, count = ndimage.label(fg)
    if count == 0 or fg.sum() < _MIN_PIXELS:
        return Reading(None, None, None)
    fg = labels == 1 + int(np.bincount(labels.ravel())[1:].argmax())
    colours = pixels[fg]
    nearest = np.linalg.norm(colours[:, None, :] - _PALETTE[None], axis=-1).argmin(1)
    color = _COLOR_NAMES[int(np.bincount(nearest, minlength=len(_PALETTE)).argmax())]
    rows, cols = np.nonzero(fg)
    h, w = fg.shape
    vertical = "top" if rows.mean() < h / 2 else "bottom"
    horizontal = "left" if cols.mean() < w / 2 else "right"
    return Reading(_closest_shape(fg, rows, cols), color, f"{vertical} {horizontal}")


def _closest_shape(fg: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> str:
    """Tell the kind by the bounding box's corners: a square fills all four, a triangle only the
    bottom two, a circle none. Corner regions (a fifth of the box side) average out patch noise."""
    box = fg[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].astype(np.float32)
    k = max(1, min(box.shape) // 5)
    top = (box[:k, :k].mean() + box[:k, -k:].mean()) / 2
    bottom = (box[-k:, :k].mean() + box[-k:, -k:].mean()) / 2
    if top > 0.6:
        return "square"
    return "triangle" if bottom > 0.6 else "circle"


def parse_prompt(prompt: str) -> Reading:
    """The attributes a prompt asks for (``None`` where the prompt names none)."""
    text = f" {prompt.lower()} "
    shape = next((s for s in shapes.SHAPES if f" {s} " in text), None)
    color = next((c for c in shapes.COLORS if f" {c} " in text), None)
    position = next((p for p in shapes.POSITIONS if f" {p} " in text), None)
    return Reading(shape, color, position)


def attribute_matches(image: np.ndarray, prompt: str) -> tuple[int, int]:
    """(attributes drawn as asked, attributes asked for) for one image and its prompt."""
    want, got = parse_prompt(prompt), read_image(image)
    pairs = [(want.shape, got.shape), (want.color, got.color), (want.position, got.position)]
    asked = [(w, g) for w, g in pairs if w is not None]
    return sum(w == g for w, g in asked), len(asked)


def _judge(credit: Callable[[int, int], float]) -> Callable:
    """A reward function that scores each image by ``credit(attributes right, attributes asked)``."""

    def score(images, prompts, metadata):
        out = []
        for image, prompt in zip(images, prompts, strict=True):
            hit, asked = attribute_matches(np.asarray(image), prompt)
            out.append(credit(hit, asked) if asked else None)
        return out

    return score


@register_reward("shapes")
def shapes_reward() -> Callable:
    """Partial credit: the share of the prompt's attributes (shape, colour, position) drawn right.

    Inputs: uint8 images ``[B, H, W, 3]`` and prompts of the shapes grammar. Score range [0, 1];
    ``None`` for a prompt that names no attribute (not applicable).

    >>> from omnigrpo.worlds.shapes import Scene, render
    >>> fn = shapes_reward()
    >>> s = Scene("circle", "red", "top left")
    >>> fn([render(s)], [s.prompt], [{}])
    [1.0]
    """
    return _judge(lambda hit, asked: hit / asked)


@register_reward("shapes_strict")
def shapes_strict_reward() -> Callable:
    """Strict pass: 1.0 when every attribute the prompt names is drawn right, else 0.0.

    The held-out evaluation metric (GenEval's strict accuracy in miniature). Score range {0, 1}.
    """
    return _judge(lambda hit, asked: float(hit == asked))
