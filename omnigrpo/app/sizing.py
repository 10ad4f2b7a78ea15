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

from omnigrpo.config.schema import Config
from omnigrpo.rollout.hub import read_json

BODY = {"builtin": "model", "janus": "model.language_model", "emu3": "model.text_model", "xomni": "model"}
"""Where each family's image-generating body sits in its model (what LoRA adapts; ``ImageLM.body``)."""
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


def _family_model(cfg: Config) -> torch.nn.Module:
    """The policy's model class built from its config on the ``meta`` device (no weights read or allocated)."""
    family, path = cfg.model.family, cfg.model.path
    with torch.device("meta"):
        if family == "builtin":
            from transformers import Qwen2Config, Qwen2ForCausalLM

            if path:
                return Qwen2ForCausalLM(Qwen2Config(**read_json(path)))
            from omnigrpo.rollout.families.builtin import build_tokenizer, qwen2_config

            return Qwen2ForCausalLM(qwen2_config(cfg.model, build_tokenizer(cfg.world.name, cfg.world.codebook_size)))
        if family == "janus":
            from transformers import JanusConfig, JanusForConditionalGeneration

            return JanusForConditionalGeneration(JanusConfig(**read_json(path)))
        if family == "emu3":
            from transformers import Emu3Config, Emu3ForConditionalGeneration

            return Emu3ForConditionalGeneration(Emu3Config(**read_json(path)))
        from omnigrpo.rollout.families.xomni import XOmniConfig, XOmniForCausalLM

        return XOmniForCausalLM(XOmniConfig(**read_json(path)))


def _image_space(cfg: Config, config) -> tuple[int, int]:
    """(fed image positions per sample, image vocabulary) from the config files."""
    family, path, grid = cfg.model.family, cfg.model.path, tuple(cfg.model.image_grid) or None
    if family == "builtin":
        from omnigrpo.worlds import registry as worlds

        height, width = worlds.get(cfg.world.name).IMAGE_SHAPE
        return (height // 4) * (width // 4), cfg.world.codebook_size  # 4 x 4 patches
    if family == "janus":
        return config.vision_config.num_image_tokens, config.vq_config.num_embeddings
    from omnigrpo.rollout.loader import family_class

    rows, cols = family_class(family).saved_grid(path, grid)
    if family == "emu3":
        return rows * (cols + 1), config.vq_config.codebook_size  # an end-of-line token after every row
    return rows * cols, config.image_vocab_size


def model_size(cfg: Config) -> ModelSize:
    """Exact counts for ``cfg.model`` (and its LoRA adapters for ``cfg.trainer``)."""
    model = _family_model(cfg)
    text = getattr(model.config, "text_config", None) or model.config
    body = model.get_submodule(BODY[cfg.model.family])
    tr = cfg.trainer
    adapter = 0
    if tr.lora_rank:
        for name, module in body.named_modules():
            if name.rsplit(".", 1)[-1] in tr.lora_targets and isinstance(module, torch.nn.Linear):
                adapter += tr.lora_rank * (module.in_features + module.out_features)
    image_tokens, codes = _image_space(cfg, model.config)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return ModelSize(params=sum(p.numel() for p in model.parameters()), adapter=adapter,
                     layers=text.num_hidden_layers, hidden=text.hidden_size, kv_heads=kv_heads, head_dim=head_dim,
                     intermediate=text.intermediate_size, image_tokens=image_tokens, codes=codes)
