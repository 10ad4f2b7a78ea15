"""The glyphs world's look judge: is the string drawn in the size, colour and height its prompt names?

Why: when prompts name their look (``world.look_share``), a policy that draws every string in one easy style must
lose reward on the prompts that ask for another, which the OCR judge cannot see. The named attributes come from
``metadata["look"]`` (else the prompt's look words, :func:`omnigrpo.worlds.glyphs.parse`), the drawn ones from
the pixels (:func:`omnigrpo.worlds.glyphs.read_style`); the score is the share of named attributes drawn as named.
A prompt that names none is not applicable (``None``): every sample of a group shares its prompt, so a plain
group is normalised on the other rewards alone, never against a constant. An image without ink matches nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from omnigrpo.rewards.registry import register_reward
from omnigrpo.worlds import glyphs


def named_look(prompt: str, metadata: dict | None) -> dict[str, str]:
    """The attributes a sample asks for (attribute -> word): ``metadata["look"]``, else the prompt's look words.
    A look word or attribute outside :data:`~omnigrpo.worlds.glyphs.LOOKS` is an error naming it."""
    look = (metadata or {}).get("look")
    if look is None:
        return dict(glyphs.parse(prompt).look)
    if not isinstance(look, dict):
        raise ValueError(f"metadata['look'] must map attributes to words, got {look!r}")
    for attribute, word in look.items():
        if attribute not in glyphs.LOOKS or word not in glyphs.LOOKS[attribute][1]:
            raise ValueError(f"metadata['look']: {attribute!r}: {word!r} is not a look glyphs draws "
                             f"({', '.join(f'{a}: {sorted(w)}' for a, (_, w) in glyphs.LOOKS.items())})")
    return dict(look)


def look_credit(image: np.ndarray, look: dict[str, str]) -> float | None:
    """Share of ``look``'s attributes that uint8 ``image`` ``[H, W, 3]`` is drawn in; None when it names none."""
    if not look:
        return None
    style = glyphs.read_style(image)
    drawn = glyphs.look_of(style) if style is not None else {}
    return sum(drawn.get(a) == w for a, w in look.items()) / len(look)


@register_reward("glyphs_look")
def glyphs_look_reward() -> Callable:
    """Partial credit: the share of the prompt's named look (size, colour, height) drawn as named.

    Inputs: uint8 images ``[B, H, W, 3]`` of the glyphs world, prompts and their metadata. Score range [0, 1];
    ``None`` for a prompt that names no look (not applicable).

    >>> from omnigrpo.worlds.glyphs import Item, render
    >>> item = Item("KP7", (("size", "large"), ("colour", "cyan")))
    >>> glyphs_look_reward()([render(item)], [item.prompt], [item.metadata])
    [1.0]
    """

    def judge(images, prompts, metadata):
        return [look_credit(np.asarray(image), named_look(prompt, meta))
                for image, prompt, meta in zip(images, prompts, metadata, strict=True)]

    return judge
