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


def train_prompts(name: str) -> tuple[list[str], list[dict]]:
    """The world's training prompts and metadata (held-out items excluded)."""
    return prompts_of(get(name).train_items())


def held_out_prompts(name: str) -> tuple[list[str], list[dict]]:
    """The world's held-out prompts and metadata, never seen in SFT or RL."""
    return prompts_of(get(name).held_out_items())
