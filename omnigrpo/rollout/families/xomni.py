"""X-Omni's architecture, written here so its published checkpoints load without their remote code.

Why: X-Omni-En / -Zh / -SFT ship only as ``trust_remote_code`` checkpoints, which cannot be fetched in many clusters
(and should not be executed unreviewed). This is our own implementation of the architecture the public model code
describes, loading the published state dict by name: a Qwen2.5 body between vision-only blocks, separate ``lm_`` /
``mm_`` embeddings, norms and heads, and the image segment ``<SOM>{h} {w}<IMAGE>`` + codes + ``<EOM>``
(docs/families.md). The SigLIP-VQ tokenizer and the FLUX decoder are separate, frozen components
(:mod:`omnigrpo.rollout.families.diffusion`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel, Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding

from omnigrpo.config.schema import ModelConfig, WorldConfig
from omnigrpo.rollout import engine
from omnigrpo.rollout.families import tiny
from omnigrpo.rollout.family import Decoder, Family, Skeleton
from omnigrpo.rollout.hub import read_json
from omnigrpo.rollout.policy import GridPolicy, ImageLM, ImageSpace, PromptBatch, head_rows


class XOmniConfig(Qwen2Config):
    """Qwen2 configuration plus the multimodal fields of X-Omni's published ``config.json``."""

    model_type = "x-omni"

    def __init__(self, num_mm_adap_layers: int = 4, num_mm_head_layers: int = 4, mm_vocab_size: int = 16448,
                 image_vocab_size: int = 16384, mm_special_tokens: tuple[str, ...] = ("<SOM>", "<EOM>", "<IMAGE>"),
                 vision_config: dict | None = None, **kwargs):
        self.num_mm_adap_layers = num_mm_adap_layers
        self.num_mm_head_layers = num_mm_head_layers
        self.mm_vocab_size = mm_vocab_size
        self.image_vocab_size = image_vocab_size
        self.mm_special_tokens = list(mm_special_tokens)
        self.vision_config = vision_config or {}
        super().__init__(**kwargs)

    def image_only(self) -> list[bool]:
        """Per entry of ``model.layers``: is it a vision-only block?"""
        n = self.num_hidden_layers
        return [i < self.num_mm_adap_layers or i >= n - self.num_mm_head_layers for i in range(n)]


AutoConfig.register("x-omni", XOmniConfig, exist_ok=True)


class XOmniModel(PreTrainedModel):
    """The body: embeddings, the mixed layer stack and the two final norms (published names)."""

    config_class = XOmniConfig
    base_model_prefix = "model"
    _no_split_modules = ["Qwen2DecoderLayer"]
    _supports_sdpa = True

    def __init__(self, config: XOmniConfig):
        super().__init__(config)
        self.lm_embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.mm_embed_tokens = nn.Embedding(config.mm_vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.lm_norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mm_norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=config)
        self.image_only = config.image_only()
        self.post_init()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, L]`` (codes as ``vocab_size + k``) -> ``[B, L, D]`` from the matching table."""
        vocab = self.config.vocab_size
        image = ids >= vocab
        text = self.lm_embed_tokens(ids.masked_fill(image, 0))
        codes = self.mm_embed_tokens((ids - vocab).clamp_min(0))
        return torch.where(image[..., None], codes, text)

    def forward(self, inputs_embeds: torch.Tensor, image: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> torch.Tensor:
        """Full-sequence forward: ``[B, L, D]`` embeddings, bool ``image`` ``[B, L]``, 0/1 ``attention_mask``
        ``[B, L]`` (left padding) -> normed hidden states ``[B, L, D]``."""
        x = inputs_embeds
        allowed = engine.causal_mask(attention_mask.bool())  # additive: right under eager and SDPA attention
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device)
        mask = mask.masked_fill(~allowed, torch.finfo(x.dtype).min)
        rope = self.rotary_emb(x, position_ids)
        for layer, image_only in zip(self.layers, self.image_only, strict=True):
            out = layer(x, attention_mask=mask, position_ids=position_ids, position_embeddings=rope)
            x = torch.where(image[..., None], out, x) if image_only else out
        return torch.where(image[..., None], self.mm_norm(x), self.lm_norm(x))


class XOmniForCausalLM(PreTrainedModel):
    """``model`` + ``lm_head`` + ``mm_head``, as in the published checkpoints."""

    config_class = XOmniConfig
    supports_gradient_checkpointing = True
    base_model_prefix = ""
    _no_split_modules = ["Qwen2DecoderLayer"]
    _supports_sdpa = True

    def __init__(self, config: XOmniConfig):
        super().__init__(config)
        self.model = XOmniModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mm_head = nn.Linear(config.hidden_size, config.mm_vocab_size, bias=False)
        self.post_init()


class XOmniLM(ImageLM):
    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.body.embed(ids)  # the published mapping: an id at or above vocab_size is an mm row

    def prompt_image(self, ids: torch.Tensor) -> torch.Tensor:
        return ids >= self.module.config.vocab_size

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.body.mm_embed_tokens(codes)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Image mode: the first ``image_vocab_size`` rows of ``mm_head`` are the only logits."""
        return head_rows(self.module.mm_head, hidden, 0, self.space.num_codes)

    def hidden_states(self, embeds, mask, positions, image):
        return self.body(embeds, image, mask, positions)

    def fast_forward(self, embeds, positions, valid, image, cache):
        body = self.body
        x = engine.forward_layers(body.layers, self.packed, body.rotary_emb, embeds, positions, valid, cache,
                                  body.image_only, image)
        if torch.is_tensor(image):
            return torch.where(image[..., None], engine.rms_norm(x, body.mm_norm), engine.rms_norm(x, body.lm_norm))
        return engine.rms_norm(x, body.mm_norm if image else body.lm_norm)


class XOmniPolicy(GridPolicy):
    """X-Omni with its tokenizer; ``model.path`` is a published checkpoint or one of ours.

    Images are ``rows x cols`` codes (``xomni.json``, default 32 x 32 = 512 px at X-Omni's 16 px per
    code). Pixels come from the diffusion decoder stage; :meth:`decode` alone renders a code map."""

    family = "xomni"
    view = XOmniLM
    grid_file = "xomni.json"
    default_grid = (32, 32)

    def __init__(self, model: XOmniForCausalLM, tokenizer, grid: tuple[int, int], path: str | Path = ""):
        self.model, self.tokenizer, self.path = model, tokenizer, str(path)
        cfg = model.config
        self.space = ImageSpace(num_codes=cfg.image_vocab_size, rows=grid[0], cols=grid[1])
        self.image_shape = (grid[0] * 16, grid[1] * 16)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @classmethod
    def from_pretrained(cls, path: str | Path, grid: tuple[int, int] | None = None,
                        dtype: torch.dtype = torch.float32) -> XOmniPolicy:
        model = XOmniForCausalLM.from_pretrained(path, dtype=dtype).eval()
        return cls(model, AutoTokenizer.from_pretrained(path), cls.saved_grid(path, grid), path)

    @staticmethod
    def pixels(path: str | Path, grid: tuple[int, int] | None = None) -> tuple[int, int]:
        grid = XOmniPolicy.saved_grid(path, grid)
        return grid[0] * 16, grid[1] * 16

    @staticmethod
    def image_vocabulary(path: str | Path) -> int:
        return int(read_json(path)["image_vocab_size"])

    def image_prefix(self) -> str:
        som, _, img = self.model.config.mm_special_tokens
        return f"{som}{self.space.rows} {self.space.cols}{img}"

    def prompt_batch(self, prompts: list[str], drop_text: torch.Tensor | None = None) -> PromptBatch:
        prefix = self.image_prefix()
        drop = drop_text.tolist() if drop_text is not None else [False] * len(prompts)
        return self.prefixed_batch([("" if d else p) + prefix for p, d in zip(prompts, drop, strict=True)], prefix)


    def decode(self, codes: torch.Tensor) -> np.ndarray:
        """A code map, 16 px per code (a deterministic colour per code): X-Omni's real pixels come from its
        diffusion decoder stage (``decoder.path``), which the driver runs on its own actors."""
        rng = np.random.default_rng(0)
        palette = rng.integers(0, 256, size=(self.space.num_codes, 3), dtype=np.uint8)
        grid = palette[codes.cpu().numpy().reshape(-1, self.space.rows, self.space.cols)]
        return grid.repeat(16, 1).repeat(16, 2)


def skeleton(model: ModelConfig, world: WorldConfig) -> Skeleton:
    """The memory plan's view: the checkpoint's model over its ``rows x cols`` code grid."""
    config = XOmniConfig(**read_json(model.path))
    rows, cols = XOmniPolicy.saved_grid(model.path, tuple(model.image_grid) or None)
    return Skeleton(XOmniForCausalLM(config), rows * cols, config.image_vocab_size)


def tiny_checkpoint(directory: Path, seed: int = 0, grid: tuple[int, int] = (8, 8), specials_in_mm: bool = False
                    ) -> None:
    """X-Omni layout: 1 + 2 + 1 layers (vision, LM, vision), 64 image codes (80 mm rows). ``specials_in_mm``:
    ``<MM-Token-k>`` = id ``vocab_size + k`` and ``<SOM>``/``<EOM>``/``<IMAGE>`` after them, in the spare mm
    rows (the published tokenizer's layout could be either; the model handles both)."""
    specials = ["<SOM>", "<EOM>", "<IMAGE>"]
    mm = [f"<MM-Token-{k}>" for k in range(64)] + specials if specials_in_mm else []
    tok = tiny.bpe_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", *([] if specials_in_mm else specials)],
                             pad="<|endoftext|>", bos="<|im_start|>", eos="<|im_end|>", extra=mm)
    cfg = XOmniConfig(vocab_size=len(tok) - len(mm), **{**tiny.BODY, "num_hidden_layers": 4}, num_mm_adap_layers=1,
                      num_mm_head_layers=1, mm_vocab_size=80, image_vocab_size=64, tie_word_embeddings=False,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    XOmniForCausalLM(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    (Path(directory) / XOmniPolicy.grid_file).write_text(json.dumps({"grid": list(grid)}))


DIFFUSION_DECODER = Decoder(tiny=tiny.diffusion_decoder, memory_gib=48.0)
"""The diffusion decoder (:mod:`omnigrpo.rollout.families.diffusion`): a 12 B FLUX transformer loaded in fp32 by
diffusers (~45 GiB) plus VAE and projector; a decoder actor needs a GPU of its own."""
FAMILY = Family(policy=XOmniPolicy, model_types=("x-omni",), layout=("config.json",), skeleton=skeleton,
                tiny=tiny_checkpoint, decoder=DIFFUSION_DECODER)
