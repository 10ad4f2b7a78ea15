"""The built-in worlds by name (``world.name``): ``shapes`` (coloured shapes judged from pixels) and
``glyphs`` (rendered strings judged by OCR)."""

from __future__ import annotations

from types import ModuleType

from omnigrpo.worlds import glyphs, shapes
from omnigrpo.worlds.world import World, prompts_of

WORLDS: dict[str, ModuleType] = {"shapes": shapes, "glyphs": glyphs}


def get(name: str) -> World:
    """The world module called ``name``; raises KeyError naming the known ones."""
    if name not in WORLDS:
        raise KeyError(f"unknown world {name!r}; known: {', '.join(sorted(WORLDS))}")
    return WORLDS[name]  # type: ignore[return-value]


def train_items(name: str, look_share: float = 0.0) -> list:
    """The world's training items (held-out items excluded); ``look_share`` of them name their look
    (``world.look_share``, glyphs only)."""
    world = get(name)
    return world.train_items(look_share) if look_share else world.train_items()


def train_prompts(name: str, look_share: float = 0.0) -> tuple[list[str], list[dict]]:
    """The world's training prompts and metadata (:func:`train_items`)."""
    return prompts_of(train_items(name, look_share))


def held_out_prompts(name: str) -> tuple[list[str], list[dict]]:
    """The world's held-out prompts and metadata, never seen in SFT or RL."""
    return prompts_of(get(name).held_out_items())
