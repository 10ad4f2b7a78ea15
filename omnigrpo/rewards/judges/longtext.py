"""LongText judge: a VLM reads each image as OCR; the score is the share of the asked-for words it shows.

Why: LongText-Bench (X-Omni) measures long text rendering this way, and the same per-image share is a dense
reward for training on such prompts. The reader is :mod:`omnigrpo.rewards.judges.vlm`'s (``transformers``:
Qwen2.5-VL and kin in-process; ``openai``: any OpenAI-compatible server), asked with :data:`QUESTION` to reply
with the image's text only (our wording of the paper's instruction). Reading and ``metadata["text"]`` are
matched by :mod:`omnigrpo.worlds.text_match` (words, or characters for Chinese, as multisets); the benchmark
score sums matched and ground-truth units over all images (:func:`aggregate`), per category and length too.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from omnigrpo.rewards.judges.vlm import OpenAIVLM, TransformersVLM
from omnigrpo.rewards.registry import register_reward
from omnigrpo.rewards.transport import ServiceUnavailable
from omnigrpo.worlds.text_match import match

QUESTION = ("Transcribe all of the text that appears in this image. Reply with that text only, exactly as it is "
            "written, without any description, quotation marks or explanation.")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reading:
    """One image's reading: ``text`` the VLM's reply (None when none came back), ``matched`` of ``total``
    ground-truth units (words, or characters for Chinese) found in it."""

    text: str | None
    matched: int
    total: int

    @property
    def score(self) -> float:
        """``matched / total``; NaN for a failed reading (a failure, never a 0)."""
        return math.nan if self.text is None else self.matched / self.total


@dataclass(frozen=True)
class LongTextScore:
    """The benchmark's aggregate: matched over ground-truth units summed over every image read, overall and
    per ``category`` and ``length`` value of the metadata; failed readings are counted, not scored."""

    score: float
    images: int
    failed: int
    by_category: dict[str, float] = field(default_factory=dict)
    by_length: dict[str, float] = field(default_factory=dict)

    def metrics(self, prefix: str = "longtext") -> dict[str, float]:
        """Flat metric names: ``<prefix>/score``, ``<prefix>/failed``, ``<prefix>/category/<c>``,
        ``<prefix>/length/<l>``."""
        out = {f"{prefix}/score": self.score, f"{prefix}/failed": float(self.failed)}
        out.update({f"{prefix}/category/{k}": v for k, v in self.by_category.items()})
        out.update({f"{prefix}/length/{k}": v for k, v in self.by_length.items()})
        return out


def aggregate(readings: Sequence[Reading], metadata: Sequence[dict]) -> LongTextScore:
    """The benchmark score of per-image readings and their metadata (same order, any images per prompt).

    >>> aggregate([Reading("a b", 2, 2), Reading("c", 1, 4)], [{"length": "short"}, {"length": "long"}]).score
    0.5
    """
    sums: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for reading, meta in zip(readings, metadata, strict=True):
        if reading.text is None:
            continue
        keys = [("all", "")] + [(k, str(meta[k])) for k in ("category", "length") if k in meta]
        for key in keys:
            sums[key][0] += reading.matched
            sums[key][1] += reading.total
    ratio = {key: m / t if t else math.nan for key, (m, t) in sums.items()}
    return LongTextScore(score=ratio.get(("all", ""), math.nan), images=len(readings),
                         failed=sum(r.text is None for r in readings),
                         by_category={v: s for (k, v), s in ratio.items() if k == "category"},
                         by_length={v: s for (k, v), s in ratio.items() if k == "length"})


def ground_truth(meta: dict | None, index: int) -> list[str]:
    """The strings sample ``index`` must show (``metadata["text"]``: a string or a list of strings)."""
    text = (meta or {}).get("text")
    if isinstance(text, str):
        text = [text]
    if not isinstance(text, list) or not text or not all(isinstance(t, str) for t in text):
        raise ValueError(f"longtext: sample {index} has no 'text' metadata (a string or a list of strings the "
                         f"image must show, as LongText-Bench's prompt files give); got {text!r}")
    if match("", text)[1] == 0:
        raise ValueError(f"longtext: sample {index}'s 'text' {text!r} has no letter, digit or CJK character to read")
    return text


class LongTextJudge:
    """Reads images with a VLM ``reader`` (``generate(image, question) -> str``), ``workers`` at a time."""

    def __init__(self, reader, workers: int = 1, question: str = QUESTION):
        self.reader, self.workers, self.question = reader, workers, question

    def judge(self, images, metadata: Sequence[dict]) -> list[Reading]:
        """One :class:`Reading` per uint8 image ``[B, H, W, 3]``; ValueError when a sample has no ``text``."""
        if len(metadata) != len(images):
            raise ValueError(f"longtext: {len(images)} images but {len(metadata)} metadata rows")
        targets = [ground_truth(meta, i) for i, meta in enumerate(metadata)]
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(self._read, list(images), targets))

    def __call__(self, images, prompts, metadata) -> list[float]:
        """The reward: each image's matched / total (NaN where the reading failed)."""
        return [reading.score for reading in self.judge(images, metadata)]

    def _read(self, image, target: list[str]) -> Reading:
        try:
            text = self.reader.generate(np.asarray(image), self.question)
        except (ServiceUnavailable, KeyError, IndexError, TypeError) as err:
            # this sample's answer never came or cannot be read: its failure only (a refusal propagates)
            log.warning("longtext: %s: %s", type(err).__name__, err)
            return Reading(None, 0, match("", target)[1])
        return Reading(text, *match(text, target))


@register_reward("longtext")
def longtext_reward(model: str, backend: str = "transformers", base_url: str | None = None,
                    processor: str | None = None, max_concurrency: int = 8, device: str = "auto",
                    max_new_tokens: int = 512, **backend_kwargs) -> Callable:
    """LongText-Bench's OCR score as a reward (Qwen2.5-VL-7B-Instruct in the paper).

    Inputs: uint8 images ``[B, H, W, 3]``; ``metadata["text"]`` (a string or list of strings) is required.
    Output: per image, the share of its text's words (characters for Chinese) the VLM reads, in [0, 1].
    ``backend``/``base_url``/``processor``/``device``: as ``vlm_judge``'s.
    """
    if backend == "transformers":
        reader = TransformersVLM(model, processor, device, max_new_tokens=max_new_tokens, **backend_kwargs)
        return LongTextJudge(reader, workers=1)  # one model in this process: one request at a time
    if backend == "openai":
        if not base_url:
            raise ValueError("longtext: backend 'openai' needs base_url (e.g. http://127.0.0.1:8000/v1)")
        reader = OpenAIVLM(base_url, model, max_new_tokens=max_new_tokens, **backend_kwargs)
        return LongTextJudge(reader, workers=max_concurrency)
    raise ValueError(f"longtext: backend must be 'transformers' or 'openai', got {backend!r}")
