"""GenEval's rules: does one image's set of detections satisfy one prompt's requirements?

Why: GenEval (Ghosh et al., 2023) scores compositional prompts by detecting COCO objects and checking
counts, colours and relative positions. Kept free of models, the rules are tested on hand-made detections,
and the reward and the evaluator share one verdict. A *requirement* is one include's count, one include's
colour, one include's position or one exclude: the strict verdict is every requirement met, the partial
credit the fraction met. Colours come from a callable the caller supplies (the CLIP step in ``geneval``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
"""The 80 COCO class names as GenEval's metadata spells them."""
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")


@dataclass(frozen=True)
class Detection:
    """One detected object: its GenEval class name, its confidence in [0, 1], its box ``(x0, y0, x1, y1)`` in
    pixels (x to the right, y down, x1 and y1 the far edges) and its mask, bool ``[H, W]`` over the whole image
    (None: the box stands for the object)."""

    label: str
    score: float
    box: tuple[float, float, float, float]
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Include:
    """At least ``count`` objects of class ``label``; the ``count`` most confident of them all of ``color``,
    and each ``position[0]`` ("left of", ...) every object matched for include entry ``position[1]``."""

    label: str
    count: int
    color: str | None = None
    position: tuple[str, int] | None = None


@dataclass(frozen=True)
class Exclude:
    """Fewer than ``count`` objects of class ``label`` (a counting prompt excludes its count + 1)."""

    label: str
    count: int


@dataclass(frozen=True)
class GenEvalPrompt:
    """One prompt's requirements, read from its GenEval metadata (``tag``, ``include``, optional ``exclude``)."""

    tag: str
    include: tuple[Include, ...]
    exclude: tuple[Exclude, ...] = ()

    @classmethod
    def from_metadata(cls, metadata: Mapping, prompt: str | None = None) -> GenEvalPrompt:
        """Parse and check one metadata dict; ValueError naming the prompt and the field when it is not GenEval's."""
        where = f"geneval: prompt {prompt!r}" if prompt is not None else "geneval: metadata"
        if not isinstance(metadata, Mapping) or "include" not in metadata or not isinstance(metadata.get("tag"), str):
            raise ValueError(f"{where} carries no GenEval metadata (it needs 'tag' and 'include', as the lines of "
                             "GenEval's evaluation_metadata.jsonl have)")
        include = metadata["include"]
        if not isinstance(include, list) or not include:
            raise ValueError(f"{where}: 'include' must be a non-empty list")
        entries = tuple(_include(entry, i, where) for i, entry in enumerate(include))
        excludes = metadata.get("exclude") or []
        return cls(metadata["tag"], entries, tuple(Exclude(*_class_count(e, where)) for e in excludes))


def _class_count(entry: object, where: str) -> tuple[str, int]:
    if not isinstance(entry, Mapping) or entry.get("class") not in COCO_CLASSES:
        raise ValueError(f"{where}: {entry!r} names no COCO class (the 80 of GenEval's object_names.txt)")
    count = entry.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"{where}: count {count!r} of {entry['class']!r} is not a positive integer")
    return entry["class"], count


def _include(entry: object, index: int, where: str) -> Include:
    label, count = _class_count(entry, where)
    color, position = entry.get("color"), entry.get("position")
    if color is not None and color not in COLOURS:
        raise ValueError(f"{where}: colour {color!r} of {label!r} is none of {', '.join(COLOURS)}")
    if position is not None:
        ok = (isinstance(position, Sequence) and len(position) == 2 and position[0] in RELATIONS
              and isinstance(position[1], int) and 0 <= position[1] < index)
        if not ok:
            raise ValueError(f"{where}: position {position!r} of {label!r} must be [relation, index of an earlier "
                             f"include entry], a relation among {', '.join(RELATIONS)}")
        position = (position[0], position[1])
    return Include(label, count, color, position)


def relations(a: Detection, b: Detection, margin: float = 0.1) -> set[str]:
    """Where box ``a`` lies relative to box ``b``: a subset of {"left of", "right of", "above", "below"}.

    GenEval's rule: take the offset of the box centres, ``centre(a) - centre(b)``; shrink each axis toward
    0, not past it, by ``margin`` x the sum of the two boxes' sizes on that axis (widths on x, heights on y);
    a direction holds when the shrunk offset's component along it exceeds 0.5 x the length of the offset
    *before* shrinking (its share of the offset). Boxes that overlap on an axis by more than the margin allows
    thus have no relation along it, and a mostly diagonal offset counts for neither or both directions.
    """
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.box, b.box
    dx, dy = (ax0 + ax1 - bx0 - bx1) / 2, (ay0 + ay1 - by0 - by1) / 2
    length = math.hypot(dx, dy)
    sx = math.copysign(max(abs(dx) - margin * (ax1 - ax0 + bx1 - bx0), 0.0), dx)
    sy = math.copysign(max(abs(dy) - margin * (ay1 - ay0 + by1 - by0), 0.0), dy)
    if length == 0 or (sx == 0 and sy == 0):
        return set()
    share = {"left of": -sx, "right of": sx, "above": -sy, "below": sy}
    return {name for name, part in share.items() if part / length > 0.5}


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes (0 when both are empty)."""
    w = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    h = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


@dataclass(frozen=True)
class Check:
    """One requirement's verdict: ``kind`` is count, color, position or exclude, ``label`` the class it is
    about, ``reason`` what was asked and what was found (a caption's words)."""

    kind: str
    label: str
    passed: bool
    reason: str


@dataclass(frozen=True)
class Verdict:
    """One image's verdict against its prompt: every requirement's :class:`Check`, in metadata order."""

    tag: str
    checks: tuple[Check, ...]

    @property
    def strict(self) -> bool:
        """GenEval's score of the image: every requirement met."""
        return all(c.passed for c in self.checks)

    @property
    def partial(self) -> float:
        """The fraction of requirements met, in [0, 1]."""
        return sum(c.passed for c in self.checks) / len(self.checks)

    @property
    def reason(self) -> str:
        """The failed requirements' reasons, or ``"correct"``."""
        return "; ".join(c.reason for c in self.checks if not c.passed) or "correct"


ColourFn = Callable[[Sequence[Detection]], Sequence[str]]
"""Detections of one image -> the colour name of each (one of :data:`COLOURS`)."""


@dataclass(frozen=True)
class GenEvalRules:
    """The thresholds of the rules and the rules themselves (defaults: GenEval's)."""

    threshold: float = 0.3
    """A detection counts when its confidence exceeds this (every tag but counting)."""
    counting_threshold: float = 0.9
    """The same for the counting tag, whose exact counts a doubtful detection would spoil."""
    margin: float = 0.1
    """Position: the centre offset shrinks by this x the two boxes' summed sizes on each axis."""
    overlap: float | None = None
    """A detection whose box IoU with a more confident one of its class reaches this is dropped; None: off."""

    def kept(self, detections: Sequence[Detection], tag: str) -> dict[str, list[Detection]]:
        """Class name -> the detections that count for ``tag``, most confident first."""
        floor = self.counting_threshold if tag == "counting" else self.threshold
        found: dict[str, list[Detection]] = {}
        for det in sorted(detections, key=lambda d: -d.score):
            if det.score <= floor:
                continue
            same = found.setdefault(det.label, [])
            if self.overlap is None or all(box_iou(det.box, k.box) < self.overlap for k in same):
                same.append(det)
        return found

    def judge(self, detections: Sequence[Detection], prompt: GenEvalPrompt, colours: ColourFn | None = None) -> Verdict:
        """Every requirement of ``prompt`` against one image's ``detections``; ``colours`` is called on the
        ``count`` most confident detections of each include entry that asks for a colour and has them."""
        found = self.kept(detections, prompt.tag)
        checks: list[Check] = []
        matched: list[list[Detection] | None] = []  # per include entry: its top ``count`` detections, if enough
        for entry in prompt.include:
            have = found.get(entry.label, [])
            top = have[: entry.count] if len(have) >= entry.count else None
            checks.append(Check("count", entry.label, top is not None,
                                f"{entry.label} >= {entry.count}: found {len(have)}"))
            if entry.color:
                checks.append(self._colour(entry, top, colours))
            if entry.position:
                checks.append(self._position(entry, top, matched[entry.position[1]]))
            matched.append(top)
        for entry in prompt.exclude:
            n = len(found.get(entry.label, []))
            checks.append(Check("exclude", entry.label, n < entry.count, f"{entry.label} < {entry.count}: found {n}"))
        return Verdict(prompt.tag, tuple(checks))

    @staticmethod
    def _colour(entry: Include, top: list[Detection] | None, colours: ColourFn | None) -> Check:
        asked = f"{entry.color} {entry.label}"
        if top is None:
            return Check("color", entry.label, False, f"{asked}: too few {entry.label} to judge")
        if colours is None:
            raise ValueError(f"geneval: a colour is asked ({asked}) but no colour classifier was given")
        seen = list(colours(top))
        return Check("color", entry.label, all(c == entry.color for c in seen), f"{asked}: found {', '.join(seen)}")

    def _position(self, entry: Include, top: list[Detection] | None, targets: list[Detection] | None) -> Check:
        relation, _ = entry.position
        if top is None or targets is None:
            return Check("position", entry.label, False, f"{entry.label} {relation} its target: one of them is missing")
        seen = [relations(obj, target, self.margin) for obj in top for target in targets]
        held = all(relation in rels for rels in seen)
        found = ", ".join(" & ".join(sorted(rels)) or "overlapping" for rels in seen)
        target = targets[0].label
        return Check("position", entry.label, held, f"{entry.label} {relation} {target}: found {found}")
