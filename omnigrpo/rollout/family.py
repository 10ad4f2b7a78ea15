"""What omnigrpo knows of a model family, declared once: a :class:`Family` record.

Why: adding a family should mean writing one module. Each module of ``omnigrpo/rollout/families`` that is a
``model.family`` ends in a ``FAMILY`` record naming its policy class, its checkpoints' ``model_type``, what its
checkpoint holds, its sizing for the memory plan, its tiny checkpoint and its bench baseline; the loader, the
checks before launch, the memory plan, ``omnigrpo tiny`` and the bench all read the records
(:func:`omnigrpo.rollout.loader.family_record`). ``docs/families.md`` shows how to add one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from omnigrpo.config.schema import ModelConfig, WorldConfig
from omnigrpo.rollout.policy import ImagePolicy

Baseline = Literal["causal_lm", "vocabulary", "image_generate", ""]
"""What ``omnigrpo bench --parts rollout`` sets the fast sampler against: ``causal_lm`` (codes are tokens of a
plain ``*ForCausalLM``: HF ``generate``, its batched CFG and per-step kernel counts), ``vocabulary`` (codes are
text-vocabulary tokens: HF ``generate`` with an image-only processor), ``image_generate`` (the model's own image
``generate``, Janus's ``generation_mode="image"``), or nothing."""


@dataclass(frozen=True)
class Skeleton:
    """What the memory plan reads of a family's model, built from its config files alone."""

    model: torch.nn.Module
    """The family's model class built from ``config.json`` (the caller holds the ``meta`` device: no storage)."""
    image_tokens: int
    """Image positions fed per sample (Emu3: with its end-of-line tokens)."""
    codes: int
    """Image vocabulary ``K``."""


@dataclass(frozen=True)
class Decoder:
    """A stage that paints a family's codes on actors of its own (``decoder.path``: X-Omni's diffusion decoder)."""

    tiny: Callable[..., Path]
    """``tiny(directory, seed=0)`` writes a tiny random decoder directory (``omnigrpo tiny decoder``)."""
    memory_gib: float
    """GPU memory of one decoder actor, for the memory plan."""


@dataclass(frozen=True)
class Family:
    """One model family: every fact about it that lives outside its classes' own code."""

    policy: type[ImagePolicy]
    """Its policy class: loading, prompts, decoding; ``policy.view`` finds the body (``body_path``) and image head."""
    model_types: tuple[str, ...]
    """The ``model_type`` of its checkpoints' ``config.json``: a checkpoint of another type is refused by name."""
    layout: tuple[str, ...]
    """Hub layout: the files a checkpoint directory (or hub snapshot) holds that omnigrpo reads itself, besides the
    weights and tokenizer; ``config.json`` first. A local ``model.path`` without one is refused before launch."""
    skeleton: Callable[[ModelConfig, WorldConfig], Skeleton]
    """Sizing for the memory plan: the model from its config files, its image positions and vocabulary."""
    tiny: Callable[..., None]
    """``tiny(directory, seed=0)`` writes a tiny random checkpoint of the real classes (a valid ``model.path``)."""
    baseline: Baseline = ""
    """The bench's reference sampler for it (:data:`Baseline`)."""
    decoder: Decoder | None = None
    """The stage that paints its codes, when a separate one does."""

    @property
    def name(self) -> str:
        """``model.family``: the policy class's ``family``."""
        return self.policy.family
