"""The one policy interface rollout and learner share; every model family implements it.

Why: Janus-Pro, Emu3, X-Omni and the built-in policy disagree on almost everything a GRPO loop touches (the
generation prompt, where image codes live, what predicts the next code, forced tokens inside the image, how codes
become pixels), and sampling, CFG, the GRPO ratio and the weight sync must not care. So a family supplies an
:class:`ImagePolicy` (loading, prompts, decoding to pixels, saving) and an :class:`ImageLM`, a view of *one* module
instance (rollout copy, learner's DeepSpeed module, frozen reference) with embeddings, the image-code head
``[..., K]``, hidden states and the static-cache path. ``omnigrpo.rollout.loader`` loads it by ``model.family``.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from operator import attrgetter
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from omnigrpo.rollout import engine
from omnigrpo.rollout.hub import checkpoint_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageSpace:
    """The image segment a policy samples: ``rows x cols`` codes out of ``num_codes``, raster order.

    ``offset``: id of code 0 where codes are text-vocabulary tokens (built-in, Emu3), else 0.
    ``eol_id``: a token the model expects after every row (Emu3's end-of-line); it is fed, never
    sampled, and carries no log-prob.
    """

    num_codes: int
    rows: int
    cols: int
    offset: int = 0
    eol_id: int | None = None

    @property
    def tokens_per_image(self) -> int:
        return self.rows * self.cols

    @property
    def segment(self) -> torch.Tensor:
        """bool ``[S]``: which positions of the fed image segment are sampled codes (False = forced EOL)."""
        row = [True] * self.cols + ([False] if self.eol_id is not None else [])
        return torch.tensor(row * self.rows)


@dataclass
class PromptBatch:
    """Left-padded prompts ending in the family's image-start marker(s).

    ``ids``/``mask``: ``[B, P]`` conditional prompt; ``uncond_ids``/``uncond_mask``: ``[B, P]`` the
    family's unconditional prompt (Janus: text replaced by padding, attended; Emu3 / X-Omni: an
    empty or negative prompt, left-padded). ``uncond_mask`` defaults to ``mask``.
    """

    ids: torch.Tensor
    uncond_ids: torch.Tensor
    mask: torch.Tensor
    pad_id: int = 0
    uncond_mask: torch.Tensor | None = field(default=None)

    def __post_init__(self) -> None:
        if self.uncond_mask is None:
            self.uncond_mask = self.mask

    def __len__(self) -> int:
        return self.ids.shape[0]

    def select(self, index: torch.Tensor | slice) -> PromptBatch:
        return PromptBatch(self.ids[index], self.uncond_ids[index], self.mask[index], self.pad_id,
                           self.uncond_mask[index])

    def to(self, device: torch.device | str) -> PromptBatch:
        return PromptBatch(self.ids.to(device), self.uncond_ids.to(device), self.mask.to(device), self.pad_id,
                           self.uncond_mask.to(device))

    def both(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Conditional rows then unconditional rows: ids and mask ``[2B, P]`` (CFG in one batch)."""
        return torch.cat([self.ids, self.uncond_ids]), torch.cat([self.mask, self.uncond_mask])


class ImageLM(ABC):
    """One module seen in image mode. The defaults fit a Llama-family ``body`` (``layers``, ``norm``,
    ``rotary_emb``) called with ``inputs_embeds``; families override what differs.

    ``packed_layers``: the fast path's packed weights of ``module``, held by the module's owner and shared by its
    views (:meth:`ImagePolicy.lm`); a view of another module gets a cache of its own."""

    body_path: ClassVar[str] = "model"
    """Where the image-generating body sits in the module (what LoRA adapts and the memory plan sizes)."""

    def __init__(self, module: torch.nn.Module, space: ImageSpace, packed_layers: engine.PackedLayers | None = None):
        self.module = module
        self.space = space
        self.packed_layers = engine.PackedLayers() if packed_layers is None else packed_layers

    @property
    def body(self) -> torch.nn.Module:
        return attrgetter(self.body_path)(self.module)

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` token ids -> ``[B, L, D]``."""
        return self.body.embed_tokens(ids)

    def prompt_image(self, ids: torch.Tensor) -> torch.Tensor:
        """bool ``[B, P]``: prompt positions the model treats as image positions (X-Omni: ids at or above
        its text vocabulary); none by default."""
        return torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)

    @abstractmethod
    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` image codes (0 .. K-1) -> ``[B, L, D]``."""

    @abstractmethod
    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, L, D]`` final hidden states -> fp32 logits over the image codes ``[B, L, K]``."""

    def hidden_states(self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                      image: torch.Tensor) -> torch.Tensor:
        """The model's own full-sequence forward (what the learner differentiates): ``[B, L, D]``.

        ``image``: bool ``[B, L]``, True at positions fed with the image segment."""
        return self.body(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state

    def new_cache(self, batch: int, max_len: int, static: bool = False) -> engine.StaticKV:
        weight = next(self.module.parameters())
        return engine.StaticKV(self.body.layers, batch, max_len, weight.dtype, weight.device, static)

    @property
    def packed(self) -> list[tuple]:
        """The body's layers packed for the fast path (:class:`engine.PackedLayers`: packed on first use, or the
        copies its owner holds; the learner scores through :meth:`hidden_states` and never packs its DeepSpeed
        module)."""
        return self.packed_layers.of(self.body.layers)

    def fast_forward(self, embeds: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
                     image: bool | torch.Tensor, cache: engine.StaticKV) -> torch.Tensor:
        """Static-cache forward of new tokens ``[B, L, D]`` -> final hidden states ``[B, L, D]``; ``image``:
        whether they are image positions (a bool, or bool ``[B, L]`` for a prompt)."""
        body = self.body
        return engine.rms_norm(engine.forward_layers(body.layers, self.packed, body.rotary_emb, embeds, positions,
                                                     valid, cache), body.norm)


class ImagePolicy(ABC):
    """A family's model with its prompt, decoding and checkpoint conventions.

    ``model`` is the module the learner trains and the weight sync sends (its full ``state_dict``).
    """

    family: ClassVar[str]
    view: ClassVar[type[ImageLM]]
    """The family's image-mode view (where its body and image head are)."""
    model: torch.nn.Module
    space: ImageSpace
    image_shape: tuple[int, int]
    """(height, width) in pixels of a decoded image."""

    @classmethod
    @abstractmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> ImagePolicy:
        """Load from a hub id or a local directory (weights in ``dtype``, eval mode)."""

    @staticmethod
    @abstractmethod
    def pixels(path: str | Path, grid: tuple[int, int] | None = None) -> tuple[int, int]:
        """(height, width) of a decoded image, from the checkpoint's config files only (no weights)."""

    def positions(self) -> int | None:
        """The language model's position limit (``max_position_embeddings``), None where the config has none."""
        config = self.model.config
        for part in (config, getattr(config, "text_config", None), getattr(config, "language_config", None)):
            limit = getattr(part, "max_position_embeddings", None)
            if limit:
                return int(limit)
        return None

    def bounded_batch(self, prompts: list[str]) -> PromptBatch:
        """``prompt_batch(prompts)`` where no prompt's tokens and image segment pass the model's positions: a
        longer prompt's text is cut from its end (one warning naming it) instead of indexing past the position
        table or sizing a KV cache by it. The rewards still judge the prompt as written."""
        batch = self.prompt_batch(prompts)
        limit = self.positions()
        room = limit - len(self.space.segment) if limit else None
        if room is None or batch.ids.shape[1] <= room:
            return batch
        fitted = [self._cut(p, room) if int(n) > room else p for p, n in zip(prompts, batch.mask.sum(1), strict=True)]
        return self.prompt_batch(fitted)

    def _cut(self, prompt: str, room: int) -> str:
        """The longest head of ``prompt`` (in characters) whose generation prompt fits ``room`` tokens."""
        lo, hi = 0, len(prompt)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if int(self.prompt_batch([prompt[:mid]]).mask.sum()) <= room else (lo, mid - 1)
        if int(self.prompt_batch([prompt[:lo]]).mask.sum()) > room:
            raise ValueError(f"the {self.family} model's {self.positions()} positions leave no room for a prompt "
                             f"before its {len(self.space.segment)}-token image")
        log.warning("a prompt of %d characters passes the %s model's %d positions with its image: cut to its first "
                    "%d characters (%r...)", len(prompt), self.family, self.positions(), lo, prompt[:40])
        return prompt[:lo]

    @abstractmethod
    def save_pretrained(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write a directory ``from_pretrained`` (and ``model.path``) accepts; ``state_dict`` overrides
        the weights written (the learner's gathered ones)."""

    @cached_property
    def packed_layers(self) -> engine.PackedLayers:
        """The fast path's packed weights of ``model``: held here, so every view of it packs once."""
        return engine.PackedLayers()

    def lm(self, module: torch.nn.Module | None = None) -> ImageLM:
        """The image-mode view of ``module`` (default: this policy's ``model``, whose views share
        :attr:`packed_layers`)."""
        if module is None or module is self.model:
            return self.view(self.model, self.space, self.packed_layers)
        return self.view(module, self.space)

    @abstractmethod
    def prompt_batch(self, prompts: list[str], drop_text: torch.Tensor | None = None) -> PromptBatch:
        """Tokenise prompts into the family's generation prompt (and its unconditional twin).

        ``drop_text``: optional bool ``[B]``; True rows get the unconditional prompt as their
        conditional one (SFT's prompt dropout)."""

    @abstractmethod
    def decode(self, codes: torch.Tensor) -> np.ndarray:
        """codes ``[B, T]`` -> uint8 images ``[B, H, W, 3]`` (the family's VQ decoder)."""



class GridPolicy(ImagePolicy):
    """A family whose image size is a choice (Emu3, X-Omni): the code grid is saved next to the checkpoint
    (``grid_file``), and the prompt ends in an image prefix that names it; the unconditional prompt is that
    prefix without text, left-padded to the conditional batch's width."""

    grid_file: ClassVar[str]
    default_grid: ClassVar[tuple[int, int]]
    tokenizer: object
    pad_id: int

    @classmethod
    def saved_grid(cls, path: str | Path, grid: tuple[int, int] | None = None) -> tuple[int, int]:
        """``grid`` if given, else the one saved with the checkpoint, else the family's default."""
        if grid:
            return tuple(grid)
        meta = checkpoint_file(path, cls.grid_file, required=False)
        return tuple(json.loads(meta.read_text())["grid"]) if meta else cls.default_grid

    def save_pretrained(self, path, state_dict=None):
        path = Path(path)
        self.model.save_pretrained(path, state_dict=state_dict)
        self.tokenizer.save_pretrained(path)
        (path / self.grid_file).write_text(json.dumps({"grid": [self.space.rows, self.space.cols]}))

    def prefixed_batch(self, texts: list[str], uncond: str, **tokenize) -> PromptBatch:
        """Conditional ``texts`` (left-padded) and ``uncond`` for every row, padded to the same width."""
        cond = self.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt", **tokenize)
        plain = self.tokenizer([uncond] * len(texts), return_tensors="pt", **tokenize)
        pad = cond["input_ids"].shape[1] - plain["input_ids"].shape[1]
        u_ids = torch.nn.functional.pad(plain["input_ids"], (pad, 0), value=self.pad_id)
        u_mask = torch.nn.functional.pad(plain["attention_mask"], (pad, 0), value=0)
        return PromptBatch(cond["input_ids"], u_ids, cond["attention_mask"], self.pad_id, u_mask)


def to_uint8(pixels: torch.Tensor, channels_first: bool = True) -> np.ndarray:
    """A decoder's output in ``[-1, 1]`` (``[B, 3, H, W]``, or ``[B, H, W, 3]`` if not ``channels_first``) ->
    uint8 images ``[B, H, W, 3]``.

    >>> to_uint8(torch.tensor([[[[-1.0]], [[0.0]], [[1.0]]]])).tolist()
    [[[[0, 128, 255]]]]
    """
    images = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return (images.permute(0, 2, 3, 1) if channels_first else images).cpu().numpy()


def head_rows(linear: torch.nn.Linear, hidden: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``linear(hidden)[..., lo:hi]`` computing only those rows; under ZeRO-3 (a partitioned weight, marked
    by DeepSpeed's ``ds_id`` and gathered only when the module is called) it calls the module and slices."""
    if hasattr(linear.weight, "ds_id"):
        return linear(hidden)[..., lo:hi].float()
    bias = None if linear.bias is None else linear.bias[lo:hi]
    return torch.nn.functional.linear(hidden, linear.weight[lo:hi], bias).float()


class TextVocabLM(ImageLM):
    """Image codes as text-vocabulary tokens ``offset .. offset + K - 1`` of a ``*ForCausalLM``; the
    image head is the LM head restricted to those rows (equal to masking every other logit, without
    computing them)."""

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.body.embed_tokens(codes + self.space.offset)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        lo = self.space.offset
        return head_rows(self.module.lm_head, hidden, lo, lo + self.space.num_codes)
