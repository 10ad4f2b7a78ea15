"""Emu3 (``Emu3ForConditionalGeneration``) in image-generation mode.

Why: Emu3 keeps its visual codes inside the text vocabulary and ends every row of the image with an end-of-line
token that the model expects but that is never a choice: the sampler feeds it and the GRPO loss ignores it
(``ImageSpace.eol_id``). The image head is ``lm_head`` restricted to the visual tokens, which must be contiguous ids
(checked on load). Prompts follow transformers' ``Emu3Processor(return_for_image_generation=True)``; the code grid
comes from ``emu3.json`` or ``grid``, decoded by the checkpoint's VQ model at 8 px per code (docs/families.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, Emu3Config, Emu3ForConditionalGeneration

from omnigrpo.config.schema import ModelConfig, WorldConfig
from omnigrpo.rollout.families.tiny import BODY, bpe_tokenizer
from omnigrpo.rollout.family import Family, Skeleton
from omnigrpo.rollout.hub import read_json
from omnigrpo.rollout.policy import GridPolicy, ImageSpace, PromptBatch, TextVocabLM, to_uint8

EOL, IMAGE_START, IMAGE_WRAPPER = "<|extra_200|>", "<|image start|>", "<|image token|>"


class Emu3LM(TextVocabLM):
    body_path = "model.text_model"


class Emu3Policy(GridPolicy):
    family = "emu3"
    view = Emu3LM
    grid_file = "emu3.json"
    default_grid = (90, 90)

    def __init__(self, model: Emu3ForConditionalGeneration, tokenizer, grid: tuple[int, int]):
        self.model, self.tokenizer = model, tokenizer
        mapping = model.model.vocabulary_mapping
        ids = torch.tensor([mapping.img2bpe[k] for k in range(len(mapping.img2bpe))])
        if not torch.equal(ids, ids[0] + torch.arange(len(ids))):
            raise ValueError("Emu3 checkpoint: visual tokens are not contiguous ids in the vocabulary")
        self.space = ImageSpace(num_codes=len(ids), rows=grid[0], cols=grid[1], offset=int(ids[0]),
                                eol_id=mapping.eol_token_id)
        scale = model.model.vqmodel.spatial_scale_factor
        self.image_shape = (grid[0] * scale, grid[1] * scale)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @classmethod
    def from_pretrained(cls, path: str | Path, grid: tuple[int, int] | None = None,
                        dtype: torch.dtype = torch.float32) -> Emu3Policy:
        model = Emu3ForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()
        return cls(model, AutoTokenizer.from_pretrained(path), cls.saved_grid(path, grid))

    @staticmethod
    def pixels(path: str | Path, grid: tuple[int, int] | None = None) -> tuple[int, int]:
        grid = Emu3Policy.saved_grid(path, grid)
        cfg = read_json(path)
        scale = 2 ** (len(cfg["vq_config"].get("channel_multiplier", [1, 2, 2, 4])) - 1)
        return grid[0] * scale, grid[1] * scale

    @staticmethod
    def image_vocabulary(path: str | Path) -> int:
        return int(read_json(path)["vq_config"]["codebook_size"])

    def prompt_batch(self, prompts: list[str], drop_text: torch.Tensor | None = None) -> PromptBatch:
        prefix = f"{IMAGE_START}{self.space.rows}*{self.space.cols}{IMAGE_WRAPPER}"
        bos = self.tokenizer.bos_token or ""
        drop = drop_text.tolist() if drop_text is not None else [False] * len(prompts)
        texts = [bos + ("" if d else p) + prefix for p, d in zip(prompts, drop, strict=True)]
        return self.prefixed_batch(texts, bos + prefix, add_special_tokens=False)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> np.ndarray:
        grid = codes.view(-1, self.space.rows, self.space.cols)
        pixels = self.model.model.vqmodel.decode(grid)  # [B, 3, H, W] in [-1, 1]
        return to_uint8(pixels)


def skeleton(model: ModelConfig, world: WorldConfig) -> Skeleton:
    """The memory plan's view: the checkpoint's model, and an end-of-line token fed after every row of codes."""
    config = Emu3Config(**read_json(model.path))
    rows, cols = Emu3Policy.saved_grid(model.path, tuple(model.image_grid) or None)
    return Skeleton(Emu3ForConditionalGeneration(config), rows * (cols + 1), config.vq_config.codebook_size)


def tiny_checkpoint(directory: Path, seed: int = 0, grid: tuple[int, int] = (8, 8), codes: int = 64) -> None:
    """Emu3 layout: visual tokens in the vocabulary, EOL per row; 8 x 8 codes of 64, 32 px images."""
    visual = [f"<|visual token {k:06d}|>" for k in range(codes)]
    tok = bpe_tokenizer(["<|endoftext|>", "<|extra_203|>", "<|extra_204|>", IMAGE_START, "<|image end|>",
                         IMAGE_WRAPPER, EOL, "<|extra_201|>", "<image>"],
                        pad="<|endoftext|>", bos="<|extra_203|>", eos="<|extra_204|>", extra=visual)
    cfg = Emu3Config(
        text_config={"vocab_size": len(tok), **BODY, "pad_token_id": tok.pad_token_id,
                     "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id},
        vq_config={"codebook_size": codes, "embed_dim": 4, "latent_channels": 4, "base_channels": 32,
                   "channel_multiplier": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [],
                   "hidden_size": 64, "num_attention_heads": 1},
        vocabulary_map=tok.get_vocab(),
    )
    torch.manual_seed(seed)
    Emu3ForConditionalGeneration(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    (Path(directory) / Emu3Policy.grid_file).write_text(json.dumps({"grid": list(grid)}))


FAMILY = Family(policy=Emu3Policy, model_types=("emu3",), layout=("config.json",), skeleton=skeleton,
                tiny=tiny_checkpoint, baseline="vocabulary")
