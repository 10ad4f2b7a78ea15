"""OCR judge: does the image show the text the prompt asked for?

Why: text rendering is where RL moved discrete-token generators most (X-Omni, flow_grpo), and the reader must run
for real on any machine: PP-OCR through ``rapidocr``, whose ONNX models ship inside its wheel. The target is
``metadata["text"]``, else the prompt's double-quoted text (neither: ``None``), scored as ``edit`` (flow_grpo's
normalised edit distance), ``exact``, ``recall`` (LongText-Bench's word recall) or ``longtext`` (that recall with
:mod:`omnigrpo.worlds.text_match`'s normalisation, the ``longtext`` judge's). One reader per reading setting
serves every OCR reward of a process and remembers its last readings (docs/rewards.md, "Built-in judges").
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable

import numpy as np
from rapidfuzz.distance import Levenshtein

from omnigrpo.rewards.registry import register_reward
from omnigrpo.worlds.text_match import match_score

_QUOTED = re.compile(r"\"([^\"]+)\"|“([^”]+)”")
_WORDS = re.compile(r"[\u3400-\u9fff]|[^\W_]+", re.UNICODE)


def target_text(prompt: str, metadata: dict | None) -> str | None:
    """The text a sample should show: ``metadata["text"]``, else the prompt's double-quoted parts."""
    if metadata and isinstance(metadata.get("text"), str) and _WORDS.search(metadata["text"]):
        return metadata["text"]
    quoted = [a or b for a, b in _QUOTED.findall(prompt)]
    text = " ".join(quoted)
    return text if _WORDS.search(text) else None  # nothing readable asked for: not applicable


def edit_score(read: str, target: str) -> float:
    """flow_grpo's OCR reward: 1 - normalised edit distance, 1 when the target is contained in the reading.

    >>> edit_score("Grand OPENING", "open ing")
    1.0
    >>> round(edit_score("0PEN", "open"), 2)
    0.75
    """
    read_n, target_n = _squash(read), _squash(target)
    if not target_n:
        return 1.0
    if target_n in read_n:
        return 1.0
    return 1.0 - min(Levenshtein.distance(read_n, target_n), len(target_n)) / len(target_n)


def exact_score(read: str, target: str) -> float:
    """1.0 when the reading is the target (case and spaces ignored), else 0.0.

    >>> exact_score("K P7", "kp7"), exact_score("KP77", "KP7")
    (1.0, 0.0)
    """
    return float(_squash(read) == _squash(target))


def word_recall(read: str, target: str) -> float:
    """Share of the target's words (CJK: characters) found in the reading, counted as multisets.

    >>> word_recall("the the cat", "The cat and the dog")
    0.6
    """
    want = Counter(_WORDS.findall(target.lower()))
    if not want:
        return 1.0
    got = Counter(_WORDS.findall(read.lower()))
    return sum((want & got).values()) / sum(want.values())


def _squash(text: str) -> str:
    return "".join(text.lower().split())


class RapidOCRReader:
    """PP-OCR (detection + recognition) through ``rapidocr``; ``read(image) -> str``, remembering the last
    ``MEMORY`` readings by image content."""

    MEMORY = 1024
    """Readings kept (a few steps' batches; a reading is a short string)."""

    def __init__(self, detect: bool = True, min_height: int = 64, unclip_ratio: float = 1.2):
        from rapidocr import RapidOCR

        logging.getLogger("RapidOCR").setLevel(logging.WARNING)
        # rapidocr's default unclip ratio (1.6) grows neighbouring word boxes until they overlap, and
        # the overlap is then read twice ("omni grpo" -> "omni" + "i grpo"); 1.2 keeps words apart.
        self.engine = RapidOCR(params={"Det.unclip_ratio": unclip_ratio})
        self.detect = detect
        self.min_height = min_height
        # keyed by a digest, not the image: a thousand 1024 px images would hold 3 GB as keys
        self.memory: OrderedDict[tuple, str] = OrderedDict()
        self.lock = threading.Lock()  # a reward service may judge from several threads

    def read(self, image: np.ndarray) -> str:
        """uint8 ``[H, W, 3]`` -> the text read, lines joined by spaces ("" if nothing)."""
        image = np.ascontiguousarray(image)
        key = (image.shape, str(image.dtype), hashlib.blake2b(image.data, digest_size=16).digest())
        with self.lock:
            if key in self.memory:
                self.memory.move_to_end(key)
                return self.memory[key]
        text = self._read(image)
        with self.lock:
            self.memory[key] = text
            if len(self.memory) > self.MEMORY:
                self.memory.popitem(last=False)
        return text

    def _read(self, image: np.ndarray) -> str:
        factor = max(1, -(-self.min_height // image.shape[0]))
        if factor > 1:
            image = image.repeat(factor, axis=0).repeat(factor, axis=1)
        result = self.engine(np.ascontiguousarray(image), use_det=self.detect, use_cls=False, use_rec=True)
        return " ".join(result.txts or ())


def shared_reader(detect: bool = True, min_height: int = 64, unclip_ratio: float = 1.2) -> RapidOCRReader:
    """The process's one reader for these settings (an engine takes a second to load and holds its models)."""
    return _reader(bool(detect), int(min_height), float(unclip_ratio))


@functools.cache
def _reader(detect: bool, min_height: int, unclip_ratio: float) -> RapidOCRReader:
    return RapidOCRReader(detect=detect, min_height=min_height, unclip_ratio=unclip_ratio)


@register_reward("ocr")
def ocr_reward(score: str = "edit", detect: bool = True, min_height: int = 64, unclip_ratio: float = 1.2) -> Callable:
    """OCR judge (PP-OCR via rapidocr, models inside its wheel).

    Inputs: uint8 images ``[B, H, W, 3]``; target text from ``metadata["text"]`` or the prompt's
    double-quoted parts. ``score="edit"`` (flow_grpo, range [0, 1]), ``"exact"`` ({0, 1}), ``"recall"``
    (word recall, [0, 1]) or ``"longtext"`` (LongText-Bench's match, [0, 1]); ``None`` where a sample asks
    for no text.
    """
    scorers = {"edit": edit_score, "exact": exact_score, "recall": word_recall, "longtext": match_score}
    if score not in scorers:
        raise ValueError(f"ocr: score must be one of {sorted(scorers)}, got {score!r}")
    scorer = scorers[score]
    reader = shared_reader(detect, min_height, unclip_ratio)

    def judge(images, prompts, metadata):
        out: list[float | None] = []
        for image, prompt, meta in zip(images, prompts, metadata, strict=True):
            target = target_text(prompt, meta)
            out.append(None if target is None else scorer(reader.read(np.asarray(image)), target))
        return out

    return judge
