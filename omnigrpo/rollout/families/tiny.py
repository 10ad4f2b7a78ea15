"""Tiny random checkpoints of every model family, built offline: ``omnigrpo tiny FAMILY DIR``.

Why: a config for Janus-Pro-7B should be debugged in seconds on a laptop before it meets eight GPUs,
and tests need each family's real classes without a download. Each family's record names its builder (in the
family's module), which writes the *same* classes the real checkpoints load into from small configs; this module
holds what they share (a byte-level BPE tokenizer trained in-process) and picks a builder by name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from omnigrpo.rollout.loader import family_records

CORPUS = [
    "a red circle at the top left", "a blue square at the bottom right", "a green triangle in the middle",
    "write the word on a sign", "a photo of a cat and a dog", "0 1 2 3 4 5 6 7 8 9 * , . : ! ?",
    "User Assistant image picture drawing painting of", "<|User|>: <|Assistant|>:",
]
BODY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=1024, attention_dropout=0.0)


def bpe_tokenizer(specials: list[str], pad: str, bos: str, eos: str, extra: list[str] = (), **named) -> (
        PreTrainedTokenizerFast):
    """A small byte-level BPE over :data:`CORPUS`, with ``specials`` and then ``extra`` tokens appended."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(CORPUS, trainer)
    if extra:
        core.add_special_tokens(list(extra))
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=pad, bos_token=bos, eos_token=eos,
                                   padding_side="left", **named)


def builders() -> dict[str, Callable[..., object]]:
    """``omnigrpo tiny`` names: each family's tiny checkpoint, and ``decoder`` for the stage that paints a family's
    codes (every family module is imported)."""
    out: dict[str, Callable[..., object]] = {}
    for family in family_records():
        out[family.name] = family.tiny
        if family.decoder is not None:
            out["decoder"] = family.decoder.tiny
    return out


def build(family: str, directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny random ``family`` checkpoint (or, for ``decoder``, a decoder directory) to ``directory``."""
    known = builders()
    if family not in known:
        raise ValueError(f"no tiny builder for family {family!r}; known: {', '.join(known)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    known[family](directory, seed=seed)
    return directory


def diffusion_decoder(directory: str | Path, codes: int = 64, seed: int = 0, flux_dev: bool = False) -> Path:
    """A tiny decoder directory for :class:`~omnigrpo.rollout.families.diffusion.DiffusionDecoder`: FLUX transformer
    (1 + 1 blocks), 2-level VAE (4 px per code), 8-dim codebook projected to 32 channels. ``flux_dev``:
    FLUX.1-dev's settings (a guidance-embedding transformer, a dynamically shifted scheduler)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    from omnigrpo.rollout.families.diffusion import CodeConditionedFlux, CodeProjector

    directory = Path(directory)
    torch.manual_seed(seed)
    CodeConditionedFlux(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                        axes_dims_rope=(4, 6, 6), siglip_channels=32, guidance_embeds=flux_dev).save_pretrained(
        directory / "transformer")
    CodeProjector(codebook_size=codes, codebook_dim=8, out_channels=32, blocks=1, groups=8).save_pretrained(
        directory / "projector")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  layers_per_block=1, norm_num_groups=8).save_pretrained(directory / "vae")
    shift = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                 max_image_seq_len=4096, shift=3.0) if flux_dev else {}  # FLUX.1-dev's scheduler_config.json
    FlowMatchEulerDiscreteScheduler(**shift).save_pretrained(directory / "scheduler")
    return directory
