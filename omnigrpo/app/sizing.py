"""What the memory planner needs to know about a model, read from its ``config.json`` alone.

Why: a plan must run before any weight is downloaded, on a laptop. A hub id resolves through the Hugging Face
cache (``omnigrpo.rollout.hub``: a snapshot with only ``config.json`` is enough), the family's model class is
built on the ``meta`` device (shapes, no storage), and its parameters are counted exactly, as the learner and
the rollout will hold them, including parts image generation never uses (Janus's SigLIP encoder, the VQ
models).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omnigrpo.config.schema import ModelConfig, TrainerConfig, WorldConfig
from omnigrpo.rollout.loader import family_record

PROMPT_TOKENS = 64
"""Prompt tokens assumed per sample (a T2I prompt in the family's template); ``omnigrpo plan --prompt-tokens``."""


@dataclass(frozen=True)
class ModelSize:
    """Exact parameter counts and the body's shape.

    ``params``: every parameter of the model (what rollout and learner load); ``adapter``: LoRA parameters
    ``sum r * (in + out)`` over the adapted projections of the body (0 without LoRA); ``image_tokens``: fed
    image positions per sample (Emu3: with its end-of-line tokens); ``codes``: image vocabulary ``K``."""

    params: int
    adapter: int
    layers: int
    hidden: int
    kv_heads: int
    head_dim: int
    intermediate: int
    image_tokens: int
    codes: int


def model_size(model: ModelConfig, world: WorldConfig, trainer: TrainerConfig) -> ModelSize:
    """Exact counts for ``model`` (its family's :attr:`~omnigrpo.rollout.family.Family.skeleton` built on the
    ``meta`` device: no weights read or allocated) and the LoRA adapters of ``trainer``."""
    family = family_record(model.family)
    with torch.device("meta"):
        skeleton = family.skeleton(model, world)
    net = skeleton.model
    text = getattr(net.config, "text_config", None) or net.config
    body = net.get_submodule(family.policy.view.body_path)
    adapter = 0
    if trainer.lora_rank:
        for name, module in body.named_modules():
            if name.rsplit(".", 1)[-1] in trainer.lora_targets and isinstance(module, torch.nn.Linear):
                adapter += trainer.lora_rank * (module.in_features + module.out_features)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return ModelSize(params=sum(p.numel() for p in net.parameters()), adapter=adapter,
                     layers=text.num_hidden_layers, hidden=text.hidden_size, kv_heads=kv_heads, head_dim=head_dim,
                     intermediate=text.intermediate_size, image_tokens=skeleton.image_tokens, codes=skeleton.codes)
