"""How much of a target text a reading shows: LongText-Bench's word (or character) match, as pure functions.

Why: the LongText judge, the OCR reward and the glyphs world's held-out report must count the same way, so
one copy lives at the bottom layer where worlds and rewards both import it. Both texts are normalised
(letters, digits, CJK and whitespace kept); English is lower-cased and split into words, Chinese (a target
with CJK ideographs) into characters, and the score is the share of the target's units found in the reading
counted as multisets: a word the target repeats must be read as often to count every time.
"""

from __future__ import annotations

import re
from collections import Counter

_CJK = re.compile(r"[\u3007\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]")


def is_chinese(text: str) -> bool:
    """Whether a text is matched by characters: it holds a CJK ideograph.

    >>> is_chinese("本地烘焙，始于1998"), is_chinese("Locally Roasted Since 1998")
    (True, False)
    """
    return _CJK.search(text) is not None


def normalise(text: str, chinese: bool = False) -> str:
    """Letters, digits, CJK and whitespace kept, everything else dropped; English lower-cased with whitespace
    collapsed to single spaces, Chinese with whitespace removed (its units are characters).

    >>> normalise("CENTRAL PARK - 2 BLOCKS!"), normalise("中央公园 - 2公里", chinese=True)
    ('central park 2 blocks', '中央公园2公里')
    """
    kept = "".join(ch for ch in text if ch.isalnum() or ch.isspace())
    return "".join(kept.split()) if chinese else " ".join(kept.lower().split())


def units(text: str, chinese: bool = False) -> list[str]:
    """The units a text is counted in after :func:`normalise`: words, or characters for Chinese."""
    kept = normalise(text, chinese)
    return list(kept) if chinese else kept.split()


def match(reading: str, target: str | list[str]) -> tuple[int, int]:
    """``(matched, total)``: the target's units found in the reading (multiset intersection) and its unit count.

    A list target (a prompt's several strings) is joined by spaces; Chinese when any of it is.

    >>> match("the the cat", "The cat and the dog")
    (3, 5)
    >>> match("每日新鲜", ["每日新鲜烘焙"])
    (4, 6)
    """
    joined = target if isinstance(target, str) else " ".join(target)
    chinese = is_chinese(joined)
    want = Counter(units(joined, chinese))
    got = Counter(units(reading, chinese))
    return sum((want & got).values()), sum(want.values())


def match_score(reading: str, target: str | list[str]) -> float:
    """Matched over total units of :func:`match`; 1.0 for a target with nothing to read.

    >>> match_score("Fresh brews, every DAY", "FRESH BREWS, EVERY MORNING, EVERY DAY")
    0.6666666666666666
    """
    matched, total = match(reading, target)
    return matched / total if total else 1.0
