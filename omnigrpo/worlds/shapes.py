"""The built-in world "shapes": synthetic scenes, their prompt grammar and the held-out split.

Why: the platform must prove on a 2-core CPU, in minutes, that a run makes a model better at what its rewards ask.
A 32 x 32 scene with one coloured shape at one position is small enough to train and judge quickly, yet
compositional: a fixed set of (shape, colour, position) combinations is never seen in SFT or RL prompts, and
accuracy on it measures whether the policy learned to follow instructions. Prompts read ``"a red circle at the top
left"``; the judge (``omnigrpo.rewards.judges.shapes``) reads pixels, never tokens.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from omnigrpo.worlds.world import sample_rendered

IMAGE_SIZE = 32
IMAGE_SHAPE = (IMAGE_SIZE, IMAGE_SIZE)
SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 70),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
}
BACKGROUND = (16, 16, 16)
POSITIONS: dict[str, tuple[int, int]] = {
    # name -> (row, col) of the shape's centre in a 32x32 image
    "top left": (8, 8),
    "top right": (8, 24),
    "bottom left": (24, 8),
    "bottom right": (24, 24),
}
# held-out metric name -> (reward name, factory kwargs); the first is the headline metric
EVAL: dict[str, tuple[str, dict]] = {"strict_acc": ("shapes_strict", {})}
# Combinations never shown in SFT or RL prompts; every single attribute value still occurs in training.
HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("circle", "red", "bottom right"),
    ("circle", "yellow", "top left"),
    ("square", "green", "bottom left"),
    ("square", "blue", "top right"),
    ("triangle", "red", "top right"),
    ("triangle", "yellow", "bottom left"),
    ("circle", "blue", "bottom left"),
    ("triangle", "green", "top left"),
)


@dataclass(frozen=True)
class Scene:
    """One scene's attributes; ``prompt`` is its text and ``metadata`` what rewards receive."""

    shape: str
    color: str
    position: str

    @property
    def prompt(self) -> str:
        return f"a {self.color} {self.shape} at the {self.position}"

    @property
    def metadata(self) -> dict[str, str]:
        return {"shape": self.shape, "color": self.color, "position": self.position}


def all_scenes() -> list[Scene]:
    return [Scene(s, c, p) for s, c, p in itertools.product(SHAPES, COLORS, POSITIONS)]


def train_items() -> list[Scene]:
    """The combinations SFT and RL may use (all but :data:`HELD_OUT`)."""
    return [s for s in all_scenes() if (s.shape, s.color, s.position) not in HELD_OUT]


def held_out_items() -> list[Scene]:
    return [Scene(*combo) for combo in HELD_OUT]


def words(prompt: str) -> list[str]:
    """Tokenizer words of a prompt: lower-cased, split on whitespace."""
    return prompt.lower().split()


def vocabulary() -> list[str]:
    """Every word the prompt grammar can produce (the text tokenizer's vocabulary)."""
    words = {"a", "at", "the"} | set(SHAPES) | set(COLORS)
    words |= {w for p in POSITIONS for w in p.split()}
    return sorted(words)


def render(scene: Scene, rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw a scene. With ``rng`` the size and centre are jittered by a few pixels.

    Returns:
        uint8 image ``[32, 32, 3]``.
    """
    cy, cx = POSITIONS[scene.position]
    half = 6.0
    if rng is not None:
        cy += int(rng.integers(-2, 3))
        cx += int(rng.integers(-2, 3))
        half += float(rng.uniform(-1.0, 1.0))
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5
    dy, dx = yy - cy, xx - cx
    if scene.shape == "circle":
        mask = dy**2 + dx**2 <= half**2
    elif scene.shape == "square":
        side = half * 0.9
        mask = (np.abs(dy) <= side) & (np.abs(dx) <= side)
    else:  # apex-up isosceles triangle inscribed in the shape's box
        top, bottom = -half, half
        rel = (dy - top) / (bottom - top)  # 0 at the apex, 1 at the base
        mask = (dy >= top) & (dy <= bottom) & (np.abs(dx) <= rel * half)
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    image[mask] = COLORS[scene.color]
    return image


def sample_pairs(scenes: list[Scene], n: int, rng: np.random.Generator) -> tuple[list[Scene], np.ndarray]:
    """``n`` random items rendered with variation: the items and uint8 images ``[n, *IMAGE_SHAPE, 3]``."""
    return sample_rendered(scenes, n, rng, render)
