"""The ``geneval`` judge: GenEval's detector and colour steps around the rules of ``geneval_rules``.

Why: GenEval is the compositional yardstick X-Omni and its peers report, and its per-requirement checks make
a dense reward. An instance-segmentation model from transformers (Mask2Former Swin-S on COCO by default,
the paper's detector) finds the objects; open_clip (ViT-L/14, OpenAI weights) names each judged object's
colour zero-shot, seen pasted by its mask onto a #999999 canvas and cropped to its box. The reward is the
partial credit per image; :meth:`GenEvalJudge.judge` gives the evaluator the full verdicts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from omnigrpo.rewards.judges.clip import OpenClipScorer
from omnigrpo.rewards.judges.geneval_rules import COCO_CLASSES, COLOURS, Detection, GenEvalPrompt, GenEvalRules, Verdict
from omnigrpo.rewards.protocol import judge_device
from omnigrpo.rewards.registry import register_reward

DETECTOR = "facebook/mask2former-swin-small-coco-instance"
TEMPLATES = ("a photo of a {color} {label}", "a photo of a {color}-colored {label}", "a photo of a {color} object")
GREY = 153  # the #999999 canvas
ALIASES = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard",
           "motorbike": "motorcycle", "aeroplane": "airplane", "sofa": "couch", "tvmonitor": "tv",
           "pottedplant": "potted plant", "diningtable": "dining table", "hair dryer": "hair drier"}
"""Detector label -> GenEval class name. COCO checkpoints (detectron2's, mmdet's and the Mask2Former ones on the
hub) say mouse, remote and keyboard where GenEval says computer mouse, tv remote and computer keyboard; the
rest are the PASCAL-style spellings some checkpoints use."""


def geneval_labels(id2label: Mapping[int, str]) -> dict[int, str]:
    """A detector's class id -> GenEval class name; ids of other classes are left out. ValueError when a GenEval
    class has no id, since a prompt naming it could then never be satisfied."""
    names = {}
    for index, raw in id2label.items():
        name = " ".join(str(raw).lower().replace("_", " ").split())
        name = ALIASES.get(name, name)
        if name in COCO_CLASSES:
            names[int(index)] = name
    missing = sorted(set(COCO_CLASSES) - set(names.values()))
    if missing:
        raise ValueError(f"geneval: the detector has no class for {len(missing)} of GenEval's 80 COCO classes "
                         f"({', '.join(missing[:5])}...); give a COCO instance-segmentation checkpoint")
    return names


def instances(class_logits: torch.Tensor, mask_logits: torch.Tensor, pixel_mask: torch.Tensor,
              image_size: tuple[int, int], labels: Mapping[int, str], min_score: float) -> list[Detection]:
    """One image's queries -> its detections, Mask2Former's instance inference.

    ``class_logits [Q, C + 1]`` (the last is "no object"); ``mask_logits [Q, h, w]`` over the padded model
    input; ``pixel_mask [H_in, W_in]``: 1 where that input holds the resized image; ``image_size``: the
    original (H, W). The Q most likely (query, class) pairs are kept; each mask is upsampled to the input,
    cropped to the image and resized to ``image_size``; a score is the class probability x the mean mask
    probability inside the mask (logit > 0). Boxes enclose the masks; ``labels`` maps class ids to names.
    """
    queries, classes = class_logits.shape[0], class_logits.shape[1] - 1
    probs, flat = class_logits.softmax(-1)[:, :-1].flatten().topk(min(queries, queries * classes))
    keep = probs >= min_score  # the mask score is at most 1: nothing dropped here could pass below
    probs, query, label = probs[keep], flat[keep] // classes, flat[keep] % classes
    if not len(probs):
        return []
    rows, cols = int(pixel_mask.any(1).sum()), int(pixel_mask.any(0).sum())
    logits = mask_logits[query][None].float()
    logits = torch.nn.functional.interpolate(logits, size=pixel_mask.shape, mode="bilinear", align_corners=False)
    logits = torch.nn.functional.interpolate(logits[..., :rows, :cols], size=image_size, mode="bilinear",
                                             align_corners=False)[0]
    binary = logits > 0
    scores = probs * (logits.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    found = []
    for score, index, mask in zip(scores.tolist(), label.tolist(), binary.cpu().numpy(), strict=True):
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if score >= min_score and index in labels and len(rows):  # an empty mask places nothing
            box = (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))
            found.append(Detection(labels[index], score, box, mask))
    return found


class InstanceDetector:
    """A transformers instance-segmentation model by hub id or directory: ``images -> detections per image``."""

    def __init__(self, model: str = DETECTOR, device: str = "auto", min_score: float = 0.3, batch_size: int = 8):
        from transformers import AutoImageProcessor, AutoModelForUniversalSegmentation

        self.device = judge_device(device)
        self.processor = AutoImageProcessor.from_pretrained(model)
        self.model = AutoModelForUniversalSegmentation.from_pretrained(model).to(self.device).eval()
        self.model.requires_grad_(False)
        self.labels = geneval_labels(self.model.config.id2label)
        self.min_score, self.batch_size = min_score, batch_size

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        """uint8 ``[N, H, W, 3]`` (or a list of differently sized images) -> N lists of detections."""
        out: list[list[Detection]] = []
        for start in range(0, len(images), self.batch_size):
            chunk = [np.asarray(im) for im in images[start : start + self.batch_size]]
            inputs = self.processor(images=[Image.fromarray(im) for im in chunk], return_tensors="pt").to(self.device)
            pred = self.model(pixel_values=inputs["pixel_values"], pixel_mask=inputs["pixel_mask"])
            for i, image in enumerate(chunk):
                out.append(instances(pred.class_queries_logits[i], pred.masks_queries_logits[i],
                                     inputs["pixel_mask"][i], image.shape[:2], self.labels, self.min_score))
        return out


def object_crop(image: np.ndarray, detection: Detection) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> ``[h, w, 3]``: the object pasted by its mask onto a #999999 canvas, cropped to its
    box (rounded outward, at least one pixel). Without a mask, the box's pixels as they are."""
    height, width = image.shape[:2]
    x0, y0, x1, y1 = detection.box
    x0, y0 = min(max(math.floor(x0), 0), width - 1), min(max(math.floor(y0), 0), height - 1)
    x1, y1 = max(min(math.ceil(x1), width), x0 + 1), max(min(math.ceil(y1), height), y0 + 1)
    crop = np.asarray(image)[y0:y1, x0:x1]
    if detection.mask is None:
        return crop.copy()
    return np.where(detection.mask[y0:y1, x0:x1, None], crop, np.uint8(GREY))


class ColourClassifier:
    """Zero-shot colour of detected objects under open_clip: ``(image, detections) -> colour names``.

    Each colour's text embedding is the mean of its three normalised template embeddings (:data:`TEMPLATES`,
    with the object's class), normalised again; an object's colour is the most similar one of :data:`COLOURS`.
    ``model``/``pretrained`` as the ``clip`` judge takes them (an architecture, ``local-dir:``, ``hf-hub:``).
    """

    def __init__(self, model: str = "ViT-L-14", pretrained: str | None = "openai", device: str = "auto"):
        self.clip = OpenClipScorer(model, pretrained, None, device)
        self._texts: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def text_embeddings(self, label: str) -> torch.Tensor:
        """``[10, D]``: one normalised embedding per colour of :data:`COLOURS` for class ``label``."""
        if label not in self._texts:
            texts = [t.format(color=c, label=label) for c in COLOURS for t in TEMPLATES]
            model, tokens = self.clip.model, self.clip.tokenizer(texts).to(self.clip.device)
            per_template = model.encode_text(tokens, normalize=True).float().view(len(COLOURS), len(TEMPLATES), -1)
            self._texts[label] = torch.nn.functional.normalize(per_template.mean(1), dim=-1)
        return self._texts[label]

    def __call__(self, image: np.ndarray, detections: Sequence[Detection]) -> list[str]:
        if not detections:
            return []
        crops = self.clip.encode_images([object_crop(image, d) for d in detections])  # [n, D]
        texts = torch.stack([self.text_embeddings(d.label) for d in detections])  # [n, 10, D]
        best = torch.einsum("nd,ncd->nc", crops, texts).argmax(-1)
        return [COLOURS[i] for i in best.tolist()]


class GenEvalJudge:
    """Detector, colour classifier and rules: GenEval's verdicts for a batch, or its partial credit as a reward."""

    def __init__(self, detector: str = DETECTOR, clip_model: str = "ViT-L-14", clip_pretrained: str | None = "openai",
                 device: str = "auto", rules: GenEvalRules | None = None, batch_size: int = 8):
        self.rules = rules or GenEvalRules()
        floor = min(self.rules.threshold, self.rules.counting_threshold)
        self.detector = InstanceDetector(detector, device, floor, batch_size)
        self.colours = ColourClassifier(clip_model, clip_pretrained, device)

    def judge(self, images, metadata: Sequence[Mapping], prompts: Sequence[str] | None = None) -> list[Verdict]:
        """uint8 ``[N, H, W, 3]`` and N GenEval metadata dicts -> N verdicts. Every metadata dict is checked
        before anything runs: one that is not GenEval's raises ValueError naming its prompt."""
        named = prompts if prompts is not None else [None] * len(metadata)
        asked = [GenEvalPrompt.from_metadata(m, p) for m, p in zip(metadata, named, strict=True)]
        found = self.detector(images)
        return [self.rules.judge(dets, prompt, lambda chosen, image=image: self.colours(image, chosen))
                for image, dets, prompt in zip(images, found, asked, strict=True)]

    def __call__(self, images, prompts: Sequence[str], metadata: Sequence[Mapping]) -> list[float]:
        return [v.partial for v in self.judge(images, metadata, prompts)]


@register_reward("geneval")
def geneval_reward(detector: str = DETECTOR, clip_model: str = "ViT-L-14", clip_pretrained: str | None = "openai",
                   device: str = "auto", threshold: float = 0.3, counting_threshold: float = 0.9,
                   margin: float = 0.1, overlap: float | None = None, batch_size: int = 8) -> GenEvalJudge:
    """GenEval's partial credit: the fraction of the prompt's requirements (each include's count, colour and
    position, each exclude) the image meets, read from the prompt's GenEval metadata (a prompt without it is
    an error). Inputs: uint8 images ``[B, H, W, 3]``. ``detector``: a transformers instance-segmentation hub
    id or directory; ``clip_model``/``clip_pretrained``: the colour model, as the ``clip`` judge takes it;
    ``threshold``/``counting_threshold``: detection confidences; ``margin``: the position rule's;
    ``overlap``: box IoU for suppressing duplicates (None: off). Range [0, 1]; 1 is GenEval's "correct".
    """
    rules = GenEvalRules(threshold, counting_threshold, margin, overlap)
    return GenEvalJudge(detector, clip_model, clip_pretrained, device, rules, batch_size)
