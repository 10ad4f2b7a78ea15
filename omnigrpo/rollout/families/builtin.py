"""The built-in worlds' policy: a transformers ``Qwen2ForCausalLM`` over text words and image codes.

Why: the embedded default must run with real parts and no download. The model is the real Qwen2 class built from a
small config; its vocabulary is a word-level tokenizer built offline with ``tokenizers``, the image-segment markers
and one token per code of the world's :class:`~omnigrpo.rollout.families.codebook.PatchCodebook`. A checkpoint is
an ordinary ``save_pretrained`` directory (with ``policy.json`` naming the world), loaded through the same
``from_pretrained(path)`` a user's checkpoint takes. The sequence layout: docs/worlds.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from omnigrpo.config.schema import ModelConfig, WorldConfig
from omnigrpo.rollout.families.codebook import PATCH, PatchCodebook
from omnigrpo.rollout.family import Family, Skeleton
from omnigrpo.rollout.hub import checkpoint_file, read_json
from omnigrpo.rollout.policy import ImagePolicy, ImageSpace, PromptBatch, TextVocabLM
from omnigrpo.worlds import registry as worlds

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<som>", "<eom>"]


def build_tokenizer(world: str, num_codes: int) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: special tokens, the world's words, then ``<img_0> .. <img_{K-1}>``."""
    words = SPECIALS + worlds.get(world).vocabulary() + [f"<img_{k}>" for k in range(num_codes)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        padding_side="left",
    )




def qwen2_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast) -> Qwen2Config:
    """The built-in policy's architecture: ``model.*`` sizes over the tokenizer's vocabulary."""
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


class WorldPolicy(ImagePolicy):
    """Model + tokenizer + codebook, with the prompt and decoding conventions of a built-in world."""

    family = "builtin"
    view = TextVocabLM

    def __init__(self, model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, codebook: PatchCodebook,
                 world: str):
        self.world = world
        self.words = worlds.get(world).words
        self.model = model
        self.tokenizer = tokenizer
        self.codebook = codebook
        self.space = ImageSpace(
            num_codes=codebook.size, rows=codebook.grid[0], cols=codebook.grid[1],
            offset=tokenizer.convert_tokens_to_ids("<img_0>"),
        )
        self.image_shape = codebook.image_shape
        self.pad_id = tokenizer.pad_token_id
        self.som_id = tokenizer.convert_tokens_to_ids("<som>")

    @classmethod
    def create(cls, cfg: ModelConfig, codebook: PatchCodebook, seed: int, world: str = "shapes") -> WorldPolicy:
        """A randomly initialised policy of the configured size (what SFT starts from)."""
        tokenizer = build_tokenizer(world, codebook.size)
        config = qwen2_config(cfg, tokenizer)
        torch.manual_seed(seed)
        return cls(Qwen2ForCausalLM(config), tokenizer, codebook, world)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> WorldPolicy:
        """Load a checkpoint written by :meth:`save_pretrained`: a directory or a hub id (eval mode)."""
        saved = checkpoint_file(path, "policy.json", required=False)
        if saved is None:
            raise FileNotFoundError(f"{path} is not a built-in world policy checkpoint (no policy.json)")
        world = json.loads(saved.read_text())["world"]
        model = Qwen2ForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
        checkpoint_file(path, "codebook.json")  # both codebook files in one directory (a hub snapshot)
        codebook = PatchCodebook.load(checkpoint_file(path, "codebook.npy").parent)
        if model.config.vocab_size != len(tokenizer) or len(tokenizer) != (
            tokenizer.convert_tokens_to_ids("<img_0>") + codebook.size
        ):
            raise ValueError(
                f"{path}: model vocabulary ({model.config.vocab_size}) does not match tokenizer "
                f"({len(tokenizer)}) and codebook ({codebook.size} codes)"
            )
        return cls(model.eval(), tokenizer, codebook, world)

    def save_pretrained(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path, state_dict=state_dict)
        self.tokenizer.save_pretrained(path)
        self.codebook.save(path)
        (path / "policy.json").write_text(json.dumps({"world": self.world}))

    @staticmethod
    def pixels(path: str | Path, grid: tuple[int, int] | None = None) -> tuple[int, int]:
        return tuple(read_json(path, "codebook.json")["image_shape"])

    @staticmethod
    def image_vocabulary(path: str | Path) -> int:
        return int(np.load(checkpoint_file(path, "codebook.npy"), mmap_mode="r").shape[0])

    def prompt_text(self, prompt: str) -> str:
        """The tokenizer's input for a prompt: ``<bos>``, the world's words, ``<som>``."""
        return " ".join(["<bos>", *self.words(prompt), "<som>"])

    def prompt_batch(self, prompts: list[str], drop_text: torch.Tensor | None = None) -> PromptBatch:
        """Tokenise prompts into a left-padded :class:`PromptBatch`.

        Args:
            drop_text: optional bool ``[B]``; where True the conditional prompt is replaced by the
                unconditional one (SFT's prompt dropout, which teaches the guidance branch).
        """
        enc = self.tokenizer([self.prompt_text(p) for p in prompts], padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        keep = (ids == self.tokenizer.bos_token_id) | (ids == self.som_id)
        uncond = torch.where(keep, ids, torch.full_like(ids, self.pad_id))
        if drop_text is not None:
            ids = torch.where(drop_text[:, None], uncond, ids)
        return PromptBatch(ids=ids, uncond_ids=uncond, mask=mask, pad_id=self.pad_id)

    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        """uint8 ``[B, H, W, 3]`` -> codes ``[B, T]``."""
        return torch.from_numpy(self.codebook.encode(images))

    def decode(self, codes: torch.Tensor) -> np.ndarray:
        """codes ``[B, T]`` -> uint8 images ``[B, H, W, 3]``."""
        return self.codebook.decode(codes.cpu().numpy())


def skeleton(model: ModelConfig, world: WorldConfig) -> Skeleton:
    """The memory plan's view: the checkpoint's Qwen2 (else the one SFT would build), 4 x 4 px per code."""
    if model.path:
        net = Qwen2ForCausalLM(Qwen2Config(**read_json(model.path)))
    else:
        net = Qwen2ForCausalLM(qwen2_config(model, build_tokenizer(world.name, world.codebook_size)))
    height, width = worlds.get(world.name).IMAGE_SHAPE
    return Skeleton(net, (height // PATCH) * (width // PATCH), world.codebook_size)


def tiny_checkpoint(directory: Path, seed: int = 0) -> None:
    """An untrained shapes-world policy: 2 layers of width 32, 64 codes fitted on 128 of the world's images."""
    world = worlds.get("shapes")
    _, images = world.sample_pairs(world.train_items(), 128, np.random.default_rng(seed))
    sizes = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)
    WorldPolicy.create(sizes, PatchCodebook.fit(images, 64, seed), seed, "shapes").save_pretrained(directory)


FAMILY = Family(policy=WorldPolicy, model_types=("qwen2",),
                layout=("config.json", "policy.json", "codebook.json", "codebook.npy"),
                skeleton=skeleton, tiny=tiny_checkpoint, baseline="causal_lm")
