"""Tiny random checkpoints of every model family, built offline: ``omnigrpo tiny FAMILY DIR``.

Why: a config for Janus-Pro-7B should be debugged in seconds on a laptop before it meets eight GPUs,
and tests need each family's real classes without a download. These builders instantiate the *same*
classes the real checkpoints load into (``JanusForConditionalGeneration``, ``Emu3ForConditionalGeneration``,
our ``XOmniForCausalLM``) from small configs with the real shape logic, with a byte-level BPE tokenizer
trained in-process (``tokenizers``) carrying each family's special tokens, and write them with
``save_pretrained``: the directory is a valid ``model.path`` for its family.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Emu3Config,
    Emu3ForConditionalGeneration,
    JanusConfig,
    JanusForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from omnigrpo.rollout.families.emu3 import EOL, IMAGE_START, IMAGE_WRAPPER
from omnigrpo.rollout.families.xomni import XOmniConfig, XOmniForCausalLM

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


def janus(directory: Path, seed: int = 0) -> None:
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


def emu3(directory: Path, seed: int = 0, grid: tuple[int, int] = (8, 8), codes: int = 64) -> None:
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
    (Path(directory) / "emu3.json").write_text(json.dumps({"grid": list(grid)}))


def xomni(directory: Path, seed: int = 0, grid: tuple[int, int] = (8, 8), specials_in_mm: bool = False) -> None:
    """X-Omni layout: 1 + 2 + 1 layers (vision, LM, vision), 64 image codes (80 mm rows). ``specials_in_mm``:
    ``<MM-Token-k>`` = id ``vocab_size + k`` and ``<SOM>``/``<EOM>``/``<IMAGE>`` after them, in the spare mm
    rows (the published tokenizer's layout could be either; the model handles both)."""
    specials = ["<SOM>", "<EOM>", "<IMAGE>"]
    mm = [f"<MM-Token-{k}>" for k in range(64)] + specials if specials_in_mm else []
    tok = bpe_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", *([] if specials_in_mm else specials)],
                        pad="<|endoftext|>", bos="<|im_start|>", eos="<|im_end|>", extra=mm)
    cfg = XOmniConfig(vocab_size=len(tok) - len(mm), **{**BODY, "num_hidden_layers": 4}, num_mm_adap_layers=1,
                      num_mm_head_layers=1, mm_vocab_size=80, image_vocab_size=64, tie_word_embeddings=False,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    XOmniForCausalLM(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    (Path(directory) / "xomni.json").write_text(json.dumps({"grid": list(grid)}))


BUILDERS = {"janus": janus, "emu3": emu3, "xomni": xomni}


def build(family: str, directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny random ``family`` checkpoint to ``directory``."""
    if family not in BUILDERS:
        raise ValueError(f"no tiny builder for family {family!r}; known: {', '.join(BUILDERS)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    BUILDERS[family](directory, seed)
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
