"""The diffusion-decoder stage: sampled image codes -> pixels with a FLUX-style transformer (diffusers).

Why: X-Omni does not paint its codes with a VQ decoder; a FLUX transformer conditioned on the codes' SigLIP-VQ
features renders them, which costs more than sampling the codes and can sit on other GPUs. So it is a role of its
own: :class:`DiffusionDecoder` is a plain class that ``omnigrpo.cluster`` runs as a pool of ``decoder`` actors;
rollout actors return codes, and the rewards receive the pool's images. A ``decoder.path`` holds diffusers folders
named after X-Omni's parts (``transformer/``, ``projector/``, ``vae/``, ``scheduler/``); docs/families.md has the
layout, the guidance and what is not done.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from omnigrpo.config.runtime import use_threads
from omnigrpo.config.schema import DecoderConfig
from omnigrpo.rollout.hub import read_json
from omnigrpo.rollout.policy import to_uint8


class CodeConditionedFlux(FluxTransformer2DModel):
    """FLUX transformer whose image stream receives ``siglip_embed(features)`` before the single-stream
    blocks (set per call with :meth:`condition`)."""

    @register_to_config
    def __init__(self, patch_size: int = 1, in_channels: int = 64, out_channels: int | None = None,
                 num_layers: int = 19, num_single_layers: int = 38, attention_head_dim: int = 128,
                 num_attention_heads: int = 24, joint_attention_dim: int = 4096, pooled_projection_dim: int = 768,
                 guidance_embeds: bool = False, axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
                 siglip_channels: int = 1536):
        super().__init__(patch_size, in_channels, out_channels, num_layers, num_single_layers, attention_head_dim,
                         num_attention_heads, joint_attention_dim, pooled_projection_dim, guidance_embeds,
                         axes_dims_rope)
        self.siglip_embed = nn.Linear(siglip_channels, self.inner_dim, bias=False)
        self._features: torch.Tensor | None = None
        first = self.single_transformer_blocks[0] if len(self.single_transformer_blocks) else None
        if first is not None:
            first.register_forward_pre_hook(self._add_features, with_kwargs=True)

    def condition(self, features: torch.Tensor | None) -> None:
        """``[N, T, code_channels]`` features for the next forward calls (None: no condition)."""
        self._features = features

    def _add_features(self, module, args, kwargs):
        if self._features is not None:
            kwargs["hidden_states"] = kwargs["hidden_states"] + self.siglip_embed(self._features)
        return args, kwargs


class CodeProjector(ModelMixin, ConfigMixin):
    """Codes ``[N, rows, cols]`` -> features ``[N, out_channels, rows, cols]``: codebook lookup, 1x1 conv,
    then residual 3x3 conv blocks (GroupNorm, SiLU)."""

    @register_to_config
    def __init__(self, codebook_size: int = 16384, codebook_dim: int = 2048, out_channels: int = 1536,
                 blocks: int = 2, groups: int = 32):
        super().__init__()
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(codebook_size, codebook_dim)
        self.post_quant_conv = nn.Conv2d(codebook_dim, out_channels, 1)
        self.post_conv = nn.ModuleList(_ResBlock(out_channels, groups) for _ in range(blocks))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        x = self.post_quant_conv(self.quantize.embedding(codes).permute(0, 3, 1, 2))
        for block in self.post_conv:
            x = block(x)
        return x


class _ResBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(groups, channels), nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(nn.functional.silu(self.norm2(self.conv1(nn.functional.silu(self.norm1(x))))))


class DiffusionDecoder:
    """Decodes code grids with the components under ``path`` in ``steps`` flow-matching steps."""

    def __init__(self, path: str, steps: int = 28, guidance: float = 1.0, seed: int = 0, threads: int = 0):
        self.path, self.steps, self.guidance, self.seed, self.threads = path, steps, guidance, seed, threads

    @staticmethod
    def arguments(decoder: DecoderConfig, seed: int, threads: int = 0) -> dict:
        """The constructor's arguments for a run's decoder (``decoder.*``; ``ray.remote`` takes them too)."""
        return {"path": decoder.path, "steps": decoder.steps, "guidance": decoder.guidance, "seed": seed,
                "threads": threads}

    @classmethod
    def from_config(cls, decoder: DecoderConfig, seed: int, threads: int = 0) -> DiffusionDecoder:
        """The decoder a run with these ``decoder.*`` settings paints with (the evaluator's too)."""
        return cls(**cls.arguments(decoder, seed, threads))

    def setup(self) -> None:
        use_threads(self.threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # each part by subfolder: a local directory or a hub id, resolved as diffusers pipelines are
        part = {"pretrained_model_name_or_path": str(self.path)}
        self.transformer = CodeConditionedFlux.from_pretrained(**part, subfolder="transformer").to(self.device).eval()
        self.projector = CodeProjector.from_pretrained(**part, subfolder="projector").to(self.device).eval()
        self.vae = AutoencoderKL.from_pretrained(**part, subfolder="vae").to(self.device).eval()
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(**part, subfolder="scheduler")
        self.generator = torch.Generator(self.device).manual_seed(self.seed)

    def _shift(self, seq_len: int) -> dict[str, float]:
        """FLUX.1's scheduler shifts its timesteps by image size (``use_dynamic_shifting``): ``mu`` grows
        linearly in the token count between ``base_image_seq_len`` and ``max_image_seq_len``, as diffusers'
        Flux pipeline computes it."""
        c = self.scheduler.config
        if not c.get("use_dynamic_shifting"):
            return {}
        slope = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
        return {"mu": c.base_shift + slope * (seq_len - c.base_image_seq_len)}

    @staticmethod
    def pixels(path: str | Path, grid: tuple[int, int]) -> tuple[int, int]:
        """(height, width) of decoded images for a ``grid`` of codes, from the VAE's config only."""
        vae = read_json(path, "vae/config.json")
        scale = 2 * 2 ** (len(vae["block_out_channels"]) - 1)
        return grid[0] * scale, grid[1] * scale

    @torch.no_grad()
    def decode(self, codes: np.ndarray | torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
        """Codes ``[N, rows * cols]`` -> uint8 images ``[N, H, W, 3]``."""
        codes = torch.as_tensor(codes, device=self.device).view(-1, *grid)
        n, (rows, cols) = codes.shape[0], grid
        features = self.projector(codes).flatten(2).transpose(1, 2)  # [N, T, C]
        cfg = self.transformer.config
        channels = cfg.in_channels // 4  # latent channels before 2x2 packing
        latents = torch.randn(n, rows * cols, cfg.in_channels, generator=self.generator, device=self.device)
        ids = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).flatten(0, 1)
        img_ids = torch.cat([torch.zeros(rows * cols, 1), ids.float()], -1).to(self.device)
        txt_ids = torch.zeros(1, 3, device=self.device)
        guided = self.guidance != 1.0
        rows_in = 2 * n if guided else n
        text = torch.zeros(rows_in, 1, cfg.joint_attention_dim, device=self.device)
        pooled = torch.zeros(rows_in, cfg.pooled_projection_dim, device=self.device)
        self.transformer.condition(torch.cat([features, torch.zeros_like(features)]) if guided else features)
        self.scheduler.set_timesteps(self.steps, device=self.device, **self._shift(rows * cols))
        # FLUX.1-dev-derived transformers embed a distilled guidance value; X-Omni's pipeline passes 1.0
        distilled = torch.ones(rows_in, device=self.device) if cfg.guidance_embeds else None
        for t in self.scheduler.timesteps:
            x = torch.cat([latents, latents]) if guided else latents
            pred = self.transformer(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
                                    timestep=(t / 1000).expand(rows_in), img_ids=img_ids, txt_ids=txt_ids,
                                    guidance=distilled).sample
            if guided:
                cond, uncond = pred.chunk(2)
                pred = uncond + self.guidance * (cond - uncond)
            latents = self.scheduler.step(pred, t, latents).prev_sample
        self.transformer.condition(None)
        # unpack 2x2 patches: [N, rows*cols, C*4] -> [N, C, rows*2, cols*2]
        latents = latents.view(n, rows, cols, channels, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(
            n, channels, rows * 2, cols * 2)
        vc = self.vae.config
        latents = latents / vc.scaling_factor + (vc.shift_factor or 0.0)
        pixels = self.vae.decode(latents).sample  # [N, 3, H, W] in [-1, 1]
        return to_uint8(pixels)
