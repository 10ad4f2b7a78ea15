"""The built-in world "glyphs": short strings rendered in a real font, judged by real OCR.

Why: text rendering is where RL moved discrete-token generators most (X-Omni, flow_grpo), and it is the claim a user
most wants to check. A 2-4 character string from an alphabet without look-alikes is drawn at 24 x 72 in DejaVu Sans
Mono Bold (fixed-width slots stay legible after patch quantisation) in a random size, height and colour, and the
OCR judge scores what a reader sees. Strings come from a fixed world seed, so the held-out set is the same for every
run; prompts read ``write "KP7"``, tokenised one character at a time (:func:`words`; docs/worlds.md). A share of
the training prompts may name part of the look (``write "KP7" small yellow top``, :data:`LOOKS`), so that RL cannot
gain by drawing every string in one easy style.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from omnigrpo.worlds.world import sample_rendered

IMAGE_SHAPE = (24, 72)
ALPHABET = "ACEHKLMNPRTUVXY34679"
COLORS: dict[str, tuple[int, int, int]] = {"white": (240, 240, 240), "yellow": (250, 220, 60), "cyan": (90, 220, 250)}
BACKGROUND = (16, 16, 16)
MARGIN = 4  # the string starts this many pixels from the left edge (one patch)
ADVANCES = (8, 12)  # character widths in pixels (2 or 3 patches): the two font sizes, 13.3 and 19.9 px
LENGTHS = (2, 4)  # inclusive range of string lengths
TRAIN_STRINGS, HELD_OUT_STRINGS = 600, 32
WORLD_SEED = 20261128
# headline metric first: held-out metric name -> (reward name, factory kwargs)
EVAL = {
    "exact_match": ("ocr", {"score": "exact", "detect": False}),
    "ocr_score": ("ocr", {"score": "edit", "detect": False}),
    "longtext_score": ("ocr", {"score": "longtext", "detect": False}),  # LongText-Bench's word match
}
_QUOTED = re.compile(r'"[^"]*"|\S+')
LOOKS: dict[str, tuple[str, dict[str, str | int]]] = {
    "size": ("advance", {"small": ADVANCES[0], "large": ADVANCES[1]}),
    "colour": ("colour", {name: name for name in COLORS}),
    "height": ("shift", {"top": -1, "middle": 0, "bottom": 1}),
}
"""What a prompt may name, in the order it names it: attribute -> (the :class:`Style` field it fixes, its words
and the values they stand for)."""


@dataclass(frozen=True)
class Item:
    """One string to draw; ``prompt`` is its text and ``metadata`` what rewards receive. ``look`` holds the
    ``(attribute, word)`` pairs the prompt names, in :data:`LOOKS` order (empty: the look is left open)."""

    text: str
    look: tuple[tuple[str, str], ...] = ()

    @property
    def prompt(self) -> str:
        return " ".join([f'write "{self.text}"', *(word for _, word in self.look)])

    @property
    def metadata(self) -> dict:
        return {"text": self.text, "look": dict(self.look)} if self.look else {"text": self.text}


@functools.cache
def _strings() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(training strings, held-out strings), disjoint, drawn once from the world seed."""
    rng = np.random.default_rng(WORLD_SEED)
    seen: dict[str, None] = {}
    while len(seen) < TRAIN_STRINGS + HELD_OUT_STRINGS:
        n = int(rng.integers(LENGTHS[0], LENGTHS[1] + 1))
        seen["".join(rng.choice(list(ALPHABET), n))] = None
    strings = list(seen)
    return tuple(strings[HELD_OUT_STRINGS:]), tuple(strings[:HELD_OUT_STRINGS])


def train_items(look_share: float = 0.0) -> list[Item]:
    """The training strings; ``look_share`` of them (rounded, the same in every process) name a look."""
    order, looks = _named_looks()
    named = set(order[: round(look_share * TRAIN_STRINGS)].tolist())
    return [Item(t, looks[i] if i in named else ()) for i, t in enumerate(_strings()[0])]


@functools.cache
def _named_looks() -> tuple[np.ndarray, tuple[tuple[tuple[str, str], ...], ...]]:
    """(an order of the training strings, a look for each), drawn once from the world seed. A string names its
    look when it is among the first ``look_share`` of the order, so a larger share names more strings, each with
    the same look. Each attribute is named with probability 1/2, drawn again until one is (a look is one of the 7
    non-empty subsets, uniformly), its word uniform among the attribute's."""
    rng = np.random.default_rng([WORLD_SEED, 1])
    looks = []
    for _ in range(TRAIN_STRINGS):
        named = np.zeros(len(LOOKS), bool)
        while not named.any():
            named = rng.random(len(LOOKS)) < 0.5
        picks = [list(words)[int(rng.integers(len(words)))] for _, words in LOOKS.values()]
        looks.append(tuple((a, w) for a, w, k in zip(LOOKS, picks, named, strict=True) if k))
    return rng.permutation(TRAIN_STRINGS), tuple(looks)


def held_out_items() -> list[Item]:
    return [Item(t) for t in _strings()[1]]


def words(prompt: str) -> list[str]:
    """Tokenizer words of a prompt: text outside quotes by whitespace, a quoted string per character
    (padded with ``_`` to :data:`LENGTHS`'s maximum).

    >>> words('write "KP7"')
    ['write', '"', 'K', 'P', '7', '_', '"']
    >>> words('write "AE" large cyan')
    ['write', '"', 'A', 'E', '_', '_', '"', 'large', 'cyan']
    """
    out: list[str] = []
    for part in _QUOTED.findall(prompt):
        if part.startswith('"') and part.endswith('"') and len(part) >= 2:
            chars = list(part[1:-1].replace(" ", ""))
            out += ['"', *chars, *["_"] * (LENGTHS[1] - len(chars)), '"']
        else:
            out.append(part.lower())
    return out


def vocabulary() -> list[str]:
    """Every word the prompt grammar can produce (the text tokenizer's vocabulary)."""
    return sorted({"write", '"', "_", *ALPHABET, *(w for _, words in LOOKS.values() for w in words)})


def parse(prompt: str) -> Item:
    """The item a prompt of this grammar asks for: its quoted text and the look words after it (the first of
    each attribute's), the inverse of :attr:`Item.prompt`.

    >>> parse('write "KP7" small yellow top').look
    (('size', 'small'), ('colour', 'yellow'), ('height', 'top'))
    """
    parts = prompt.split('"')
    tail = parts[-1].lower().split() if len(parts) >= 3 else []
    look = ((a, next((w for w in tail if w in words), None)) for a, (_, words) in LOOKS.items())
    return Item(parts[1] if len(parts) >= 3 else "", tuple((a, w) for a, w in look if w is not None))


def font_path() -> Path:
    """DejaVu Sans Mono Bold, the TrueType font matplotlib's wheel ships (matplotlib is imported only here,
    so loading a config or listing worlds does not pay for it)."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSansMono-Bold.ttf"


@functools.cache
def _font(advance: int) -> ImageFont.FreeTypeFont:
    """The font at the size whose character advance is ``advance`` pixels (1233/2048 em in this font)."""
    return ImageFont.truetype(str(font_path()), size=advance * 2048 / 1233)


@dataclass(frozen=True)
class Style:
    """How a string is drawn: ``colour`` (a :data:`COLORS` name), ``advance`` (character width, one of
    :data:`ADVANCES`: the font size) and ``shift`` (-1, 0, 1: a patch above, at or below the centre)."""

    colour: str = "white"
    advance: int = ADVANCES[0]
    shift: int = 0


def with_look(style: Style, look: tuple[tuple[str, str], ...]) -> Style:
    """``style`` with the attributes ``look`` names (:attr:`Item.look`'s pairs) set as named."""
    return dataclasses.replace(style, **{LOOKS[a][0]: LOOKS[a][1][w] for a, w in look})


def look_of(style: Style) -> dict[str, str]:
    """The words that name a style: ``{"size": ..., "colour": ..., "height": ...}``."""
    return {a: next(w for w, v in words.items() if v == getattr(style, field)) for a, (field, words) in LOOKS.items()}


def random_style(rng: np.random.Generator) -> Style:
    """A style drawn from ``rng`` (size, colour, then height: the order the SFT data was always drawn in)."""
    advance = ADVANCES[int(rng.integers(len(ADVANCES)))]
    colour = list(COLORS)[int(rng.integers(len(COLORS)))]
    return Style(colour, advance, int(rng.integers(-1, 2)))


def render(item: Item, rng: np.random.Generator | None = None, style: Style | None = None) -> np.ndarray:
    """Draw a string in ``style``, or else in one drawn from ``rng`` (or small, white and centred) with the
    attributes its item names set as named.

    Sizes and positions move in whole 4-pixel patches (:data:`ADVANCES`, shifts of 4 px), so a glyph
    has the same patch codes wherever it stands: the tiny policy learns letters, not sub-patch phases.

    Returns:
        uint8 image ``[24, 72, 3]``.
    """
    style = style or with_look(random_style(rng) if rng is not None else Style(), item.look)
    h, w = IMAGE_SHAPE
    font = _font(style.advance)
    image = Image.new("RGB", (w, h), BACKGROUND)
    draw = ImageDraw.Draw(image)
    top, bottom = font.getbbox("H")[1], font.getbbox("H")[3]  # cap height: where upper-case glyphs sit
    y = 4 * round((h - (bottom - top)) / 8) - top + 4 * style.shift
    draw.text((MARGIN, y), item.text, fill=COLORS[style.colour], font=font)
    return np.asarray(image)


INK = 60
"""A pixel is ink when its channels differ from :data:`BACKGROUND` by more than this in sum."""


@functools.cache
def _style_references() -> dict[tuple[int, int], tuple[float, float]]:
    """(advance, shift) -> (top, bottom) ink rows of a capital drawn that way (what :func:`read_style` matches)."""
    out = {}
    for advance in ADVANCES:
        for shift in (-1, 0, 1):
            ink = _ink(render(Item("HX"), style=Style("white", advance, shift)))
            rows = np.nonzero(ink.any(1))[0]
            out[advance, shift] = (float(rows[0]), float(rows[-1]))
    return out


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-9)


def _ink(image: np.ndarray) -> np.ndarray:
    return np.abs(image.astype(int) - np.array(BACKGROUND)).sum(-1) > INK


def read_style(image: np.ndarray) -> Style | None:
    """The style an image's text is drawn in (None when it has no ink): the colour whose direction from the
    background is closest to the ink's, and the size and height whose reference ink rows
    (:func:`_style_references`) are nearest the image's."""
    ink = _ink(image)
    if ink.sum() < 4:
        return None
    # anti-aliasing blends the colour towards the background: compare directions away from the background
    away = (image[ink].astype(float) - np.array(BACKGROUND)).sum(0)
    colour = max(COLORS, key=lambda c: float(_unit(away) @ _unit(np.array(COLORS[c]) - np.array(BACKGROUND))))
    rows = np.nonzero(ink.any(1))[0]
    top, bottom = float(rows[0]), float(rows[-1])
    advance, shift = min(_style_references().items(),
                         key=lambda kv: (kv[1][0] - top) ** 2 + (kv[1][1] - bottom) ** 2)[0]
    return Style(colour, advance, shift)


def sample_pairs(items: list[Item], n: int, rng: np.random.Generator) -> tuple[list[Item], np.ndarray]:
    """``n`` random items rendered with variation: the items and uint8 images ``[n, *IMAGE_SHAPE, 3]``."""
    return sample_rendered(items, n, rng, render)
