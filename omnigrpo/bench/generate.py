"""Hugging Face ``generate`` set up to draw the same images our sampler draws: the speed baseline.

Why: a speed-up over ``generate`` means something only against a reference that samples the *same distribution*.
Every baseline here restricts sampling to the image codes and applies the same guidance, temperature and top-k as
:func:`omnigrpo.rollout.sampler.sample_images`: HF's own CFG, ``generate`` on our doubled batch, and Janus-Pro's
own image ``generate``. It needs only torch and transformers, so the GPU benchmark uses it too; docs/bench.md says
what each baseline isolates.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from omnigrpo.rollout.policy import ImageSpace, PromptBatch
from omnigrpo.rollout.sampler import SamplingParams, guided_logprobs


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1,
                   sync: Callable[[], None] = lambda: None) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` runs after ``warmup`` untimed ones; ``sync`` waits for
    the device (``torch.cuda.synchronize``) around each run."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(sides: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                        sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median wall seconds per side, the sides timed in turn within each of ``repeats`` rounds (after ``warmup``
    untimed calls of each): a slow spell of a shared machine then hits every side, not whichever ran during it."""
    for fn in sides.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


class ImageOnly(LogitsProcessor):
    """Scores ``[N, V]`` -> same shape with every non-image id at -inf; at the segment's forced positions
    (Emu3's end-of-line after every row) only that token is left."""

    def __init__(self, space: ImageSpace, prompt_len: int = 0):
        self.lo, self.hi = space.offset, space.offset + space.num_codes
        self.space, self.prompt_len = space, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(scores, float("-inf"))
        j = input_ids.shape[1] - self.prompt_len  # position inside the image segment
        if self.space.eol_id is not None and j % (self.space.cols + 1) == self.space.cols:
            out[:, self.space.eol_id] = 0.0
        else:
            out[:, self.lo : self.hi] = scores[:, self.lo : self.hi]
        return out


class BatchedCFG(LogitsProcessor):
    """Rows ``[:B]`` cond, ``[B:]`` uncond: draw one code per pair from our guided distribution and
    return scores ``[2B, V]`` that are 0 at that code and -inf elsewhere, so ``generate`` (with its own
    temperature / top-k off) emits it on both rows."""

    def __init__(self, batch: int, space: ImageSpace, params: SamplingParams):
        self.b, self.space, self.params = batch, space, params

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        lo = self.space.offset
        img = scores[:, lo : lo + self.space.num_codes].float()
        logprobs = guided_logprobs(img[: self.b], img[self.b :], self.params)
        code = torch.multinomial(logprobs.exp(), 1).repeat(2, 1) + lo
        return torch.full_like(scores, float("-inf")).scatter(-1, code, 0.0)


def _common(space: ImageSpace, pad_id: int) -> dict:
    t = len(space.segment)  # codes, and end-of-line tokens where the family has them
    return dict(do_sample=True, max_new_tokens=t, min_new_tokens=t, pad_token_id=pad_id, top_p=1.0)


@torch.no_grad()
def hf_generate(model: torch.nn.Module, prompts: PromptBatch, space: ImageSpace,
                params: SamplingParams) -> torch.Tensor:
    """HF's own CFG (or none) on a model whose codes are vocabulary tokens (built-in, Emu3): image codes
    ``[B, T]`` (0 .. K-1)."""
    extra: dict = {}
    if params.guided:
        extra = dict(guidance_scale=params.cfg_scale, negative_prompt_ids=prompts.uncond_ids,
                     negative_prompt_attention_mask=prompts.uncond_mask)
    width = prompts.ids.shape[1]
    out = model.generate(input_ids=prompts.ids, attention_mask=prompts.mask,
                         logits_processor=LogitsProcessorList([ImageOnly(space, width)]),
                         temperature=params.temperature, top_k=params.top_k, **_common(space, prompts.pad_id), **extra)
    return out[:, width:][:, space.segment.to(out.device)] - space.offset


@torch.no_grad()
def hf_generate_batched(model: torch.nn.Module, prompts: PromptBatch, space: ImageSpace,
                        params: SamplingParams) -> torch.Tensor:
    """``generate`` on both CFG branches in one batch: image codes ``[B, T]`` (0 .. K-1)."""
    b = len(prompts)
    out = model.generate(input_ids=torch.cat([prompts.ids, prompts.uncond_ids]),
                         attention_mask=torch.cat([prompts.mask, prompts.mask]),
                         logits_processor=LogitsProcessorList([BatchedCFG(b, space, params)]),
                         temperature=1.0, top_k=0, **_common(space, prompts.pad_id))
    return out[:b, prompts.ids.shape[1] :] - space.offset


@torch.no_grad()
def hf_generate_janus(model: torch.nn.Module, prompts: PromptBatch, boi_id: int, params: SamplingParams) -> (
        torch.Tensor):
    """``JanusForConditionalGeneration.generate(generation_mode="image")``: image codes ``[B, T]``.

    Janus's ``generate`` always runs both branches and breaks without guidance (scale <= 1), so it is a
    baseline only for guided sampling; its CFG mixes log-softmax scores, ours logits, which differ only
    by a per-row constant (the same distribution)."""
    from transformers import GenerationConfig

    if not params.cfg_scale > 1:
        raise ValueError("Janus's image generate needs classifier-free guidance (cfg_scale > 1)")
    config = GenerationConfig(do_sample=True, temperature=params.temperature, top_k=params.top_k or None,
                              top_p=params.top_p, min_p=params.min_p or None, guidance_scale=params.cfg_scale,
                              pad_token_id=prompts.pad_id, bos_token_id=int(prompts.ids[0][prompts.mask[0].bool()][0]),
                              generation_kwargs={"boi_token_id": boi_id}, max_length=prompts.ids.shape[1] + 1)
    return model.generate(inputs=prompts.ids, attention_mask=prompts.mask, generation_mode="image",
                          generation_config=config)
