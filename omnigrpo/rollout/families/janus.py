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
from transformers import AutoTokenizer, JanusForConditionalGeneration

from omnigrpo.rollout.hub import read_json
from omnigrpo.rollout.policy import ImageLM, ImagePolicy, ImageSpace, PromptBatch, to_uint8

SFT_FORMAT = "<|User|>: {prompt}\n\n<|Assistant|>:"


class JanusLM(ImageLM):
    @property
    def body(self) -> torch.nn.Module:
        return self.module.model.language_model

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.module.model.generation_aligner(self.module.model.generation_embeddings(codes))

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.module.model.generation_head(hidden).float()


class JanusPolicy(ImagePolicy):
    family = "janus"

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

    def lm(self, module=None) -> JanusLM:
        return JanusLM(self.model if module is None else module, self.space)

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

