"""Janus-Pro (``JanusForConditionalGeneration``) in image-generation mode.

Why: Janus generates images through modules its text path never uses: code embeddings are
``generation_embeddings`` then ``generation_aligner``, the next code comes from ``generation_head``, not
``lm_head``, and the body is its Llama ``language_model``. This view feeds those to the shared sampler and learner,
with the prompts of transformers' ``generate(generation_mode="image")`` (docs/families.md): 576 codes for a 384 px
image, decoded by the checkpoint's VQ model inside the rollout worker.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, JanusConfig, JanusForConditionalGeneration

from omnigrpo.config.schema import ModelConfig, WorldConfig
from omnigrpo.rollout.families.tiny import BODY, bpe_tokenizer
from omnigrpo.rollout.family import Family, Skeleton
from omnigrpo.rollout.hub import read_json
from omnigrpo.rollout.policy import ImageLM, ImagePolicy, ImageSpace, PromptBatch, to_uint8

SFT_FORMAT = "<|User|>: {prompt}\n\n<|Assistant|>:"


class JanusLM(ImageLM):
    body_path = "model.language_model"

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.module.model.generation_aligner(self.module.model.generation_embeddings(codes))

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.module.model.generation_head(hidden).float()


class JanusPolicy(ImagePolicy):
    family = "janus"
    view = JanusLM

    def __init__(self, model: JanusForConditionalGeneration, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        cfg = model.config
        side = int(round(cfg.vision_config.num_image_tokens**0.5))
        if side * side != cfg.vision_config.num_image_tokens:
            raise ValueError(f"Janus num_image_tokens {cfg.vision_config.num_image_tokens} is not a square grid")
        self.space = ImageSpace(num_codes=cfg.vq_config.num_embeddings, rows=side, cols=side)
        scale = 2 ** (len(cfg.vq_config.channel_multiplier) - 1)
        self.image_shape = (side * scale, side * scale)
        self.boi = getattr(tokenizer, "boi_token", None) or "<begin_of_image>"
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else cfg.text_config.pad_token_id

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> JanusPolicy:
        model = JanusForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(model, tokenizer)

    @staticmethod
    def pixels(path: str | Path, grid: tuple[int, int] | None = None) -> tuple[int, int]:
        cfg = read_json(path)
        side = int(round(cfg["vision_config"].get("num_image_tokens", 576) ** 0.5))
        scale = 2 ** (len(cfg["vq_config"].get("channel_multiplier", [1, 1, 2, 2, 4])) - 1)
        return side * scale, side * scale

    @staticmethod
    def image_vocabulary(path: str | Path) -> int:
        return int(read_json(path)["vq_config"]["num_embeddings"])

    def save_pretrained(self, path, state_dict=None):
        self.model.save_pretrained(path, state_dict=state_dict)
        self.tokenizer.save_pretrained(path)

    def prompt_batch(self, prompts: list[str], drop_text: torch.Tensor | None = None) -> PromptBatch:
        bos = self.tokenizer.bos_token or ""  # written out: tokenizers differ on adding it themselves
        texts = [bos + SFT_FORMAT.format(prompt=p) + self.boi for p in prompts]
        enc = self.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        keep = (ids == self.tokenizer.bos_token_id) | (ids == self.tokenizer.convert_tokens_to_ids(self.boi))
        uncond = torch.where(keep, ids, torch.full_like(ids, self.pad_id))
        if drop_text is not None:
            ids = torch.where(drop_text[:, None], uncond, ids)
        return PromptBatch(ids=ids, uncond_ids=uncond, mask=mask, pad_id=self.pad_id)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> np.ndarray:
        pixels = self.model.decode_image_tokens(codes)  # [B, H, W, 3] in [-1, 1]
        return to_uint8(pixels, channels_first=False)


def skeleton(model: ModelConfig, world: WorldConfig) -> Skeleton:
    """The memory plan's view: every part of the checkpoint (SigLIP encoder and VQ model included), a fixed grid."""
    config = JanusConfig(**read_json(model.path))
    net = JanusForConditionalGeneration(config)
    return Skeleton(net, config.vision_config.num_image_tokens, config.vq_config.num_embeddings)


def tiny_checkpoint(directory: Path, seed: int = 0) -> None:
    """Janus-Pro layout: Llama body, SigLIP encoder, VQ model; 8 x 8 codes of 64, 32 px images."""
    tok = bpe_tokenizer(["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<begin_of_image>",
                         "<end_of_image>", "<image_placeholder>", "<|User|>", "<|Assistant|>"],
                        pad="<｜▁pad▁｜>", bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>",
                        extra_special_tokens={"boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>",
                                              "image_token": "<image_placeholder>"})
    cfg = JanusConfig(
        text_config={"model_type": "llama", "vocab_size": len(tok), **BODY, "pad_token_id": tok.pad_token_id,
                     "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id},
        vision_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 128,
                       "patch_size": 16, "projection_dim": 64, "num_image_tokens": 64},
        vq_config={"num_embeddings": 64, "embed_dim": 8, "latent_channels": 32, "base_channels": 32,
                   "channel_multiplier": [1, 2, 2], "num_res_blocks": 1, "projection_dim": 64,
                   "image_token_embed_dim": 64},
        image_token_id=tok.convert_tokens_to_ids("<image_placeholder>"),
    )
    torch.manual_seed(seed)
    JanusForConditionalGeneration(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)


FAMILY = Family(policy=JanusPolicy, model_types=("janus",), layout=("config.json",), skeleton=skeleton,
                tiny=tiny_checkpoint, baseline="image_generate")
