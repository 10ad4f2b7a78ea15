"""Image-token sampling and the log-probs of sampled images, sharing one distribution.

Why: GRPO's ratio pi_new / pi_old is only right if the learner scores a sampled image under exactly
the distribution the sampler drew it from. Both sides therefore go through :func:`image_logits`
(logits outside the image codes are masked, i.e. dropped) and :func:`guided_logprobs`
(classifier-free guidance, temperature, top-k / top-p / min-p, renormalised). With guidance the
returned log-probs are those of the *guided* distribution, and the learner back-propagates through
both branches: the policy trained is the one that was sampled, unlike forks that train on the
conditional branch only.

A token the new policy filters out of its support (possible with top-k/top-p/min-p after an update)
would have log-prob -inf; gathered log-probs are floored at :data:`LOGPROB_FLOOR` so the PPO ratio
and the k3 KL stay finite (the ratio is then ~0 and clipped).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

LOGPROB_FLOOR = -30.0


@dataclass(frozen=True)
class ImageSpace:
    """Where image codes live in the vocabulary: ids ``offset .. offset + num_codes - 1``."""

    offset: int
    num_codes: int
    tokens_per_image: int


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    cfg_scale: float = 1.0

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0


@dataclass
class PromptBatch:
    """Left-padded prompts ending in the image-start marker.

    ``ids``/``uncond_ids``/``mask``: ``[B, P]``; ``uncond_ids`` is the unconditional prompt of the
    same length (text replaced by padding, as Janus does), attended with the same ``mask``.
    """

    ids: torch.Tensor
    uncond_ids: torch.Tensor
    mask: torch.Tensor
    pad_id: int = 0

    def __len__(self) -> int:
        return self.ids.shape[0]

    def select(self, index: torch.Tensor | slice) -> PromptBatch:
        return PromptBatch(self.ids[index], self.uncond_ids[index], self.mask[index], self.pad_id)


def image_logits(logits: torch.Tensor, space: ImageSpace) -> torch.Tensor:
    """Image mode: ``[..., V]`` -> ``[..., num_codes]``, every non-image logit masked away.

    Slicing equals setting the other logits to -inf before the softmax, without the wasted work.
    """
    return logits[..., space.offset : space.offset + space.num_codes].float()


def guided_logprobs(cond: torch.Tensor, uncond: torch.Tensor | None, params: SamplingParams) -> torch.Tensor:
    """Log-probs ``[..., K]`` of the distribution sampled from: CFG, temperature, then filters."""
    logits = cond if uncond is None or not params.guided else uncond + params.cfg_scale * (cond - uncond)
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop_sorted = probs.cumsum(-1) - probs > params.top_p  # the most likely code is always kept
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return logits.log_softmax(-1)


def gather_logprobs(logprobs: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Pick ``codes`` ``[...]`` out of ``logprobs`` ``[..., K]``, floored at LOGPROB_FLOOR."""
    return logprobs.gather(-1, codes.unsqueeze(-1)).squeeze(-1).clamp_min(LOGPROB_FLOOR)


def entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """Entropy ``[...]`` of distributions given as log-probs ``[..., K]`` (filtered codes count 0)."""
    finite = torch.isfinite(logprobs)
    return -(logprobs.exp() * logprobs.masked_fill(~finite, 0.0)).sum(-1)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions of a left-padded batch: ``[B, L]`` counting only attended tokens."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


@torch.no_grad()
def sample_images(
    model: torch.nn.Module,
    prompts: PromptBatch,
    space: ImageSpace,
    params: SamplingParams,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one image per prompt, token by token with a KV cache; both CFG branches in one batch.

    Returns:
        codes ``[B, T]`` (0 .. K-1) and their log-probs ``[B, T]`` under the sampled distribution.
    """
    b, t_img = len(prompts), space.tokens_per_image
    ids, mask = prompts.ids, prompts.mask
    if params.guided:
        ids, mask = torch.cat([ids, prompts.uncond_ids]), torch.cat([mask, mask])
    positions = _positions(mask)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                use_cache=True, logits_to_keep=1)
    next_pos = positions[:, -1:] + 1
    codes = torch.empty(b, t_img, dtype=torch.long)
    logps = torch.empty(b, t_img)
    step_mask = torch.ones(mask.shape[0], t_img, dtype=mask.dtype)
    for t in range(t_img):
        logits = image_logits(out.logits[:, -1], space)
        cond, uncond = (logits[:b], logits[b:]) if params.guided else (logits, None)
        logprobs = guided_logprobs(cond, uncond, params)
        code = torch.multinomial(logprobs.exp(), 1, generator=generator).squeeze(-1)
        codes[:, t] = code
        logps[:, t] = gather_logprobs(logprobs, code)
        if t == t_img - 1:
            break
        step_ids = (code + space.offset).unsqueeze(-1)
        if params.guided:
            step_ids = torch.cat([step_ids, step_ids])
        out = model(input_ids=step_ids, attention_mask=torch.cat([mask, step_mask[:, : t + 1]], -1),
                    position_ids=next_pos + t, cache=cache, use_cache=True)
    return codes, logps


def sequence_logprobs(
    model: torch.nn.Module,
    prompts: PromptBatch,
    codes: torch.Tensor,
    space: ImageSpace,
    params: SamplingParams,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced log-probs of given images under the same distribution :func:`sample_images` uses.

    Args:
        codes: ``[B, T]`` image codes (0 .. K-1).

    Returns:
        log-probs ``[B, T]`` (differentiable) and per-token entropy ``[B, T]`` (detached).
    """
    b, p_len = codes.shape[0], prompts.ids.shape[1]
    body = codes[:, :-1] + space.offset
    ids = torch.cat([prompts.ids, body], -1)
    mask = torch.cat([prompts.mask, torch.ones_like(body, dtype=prompts.mask.dtype)], -1)
    if params.guided:
        ids = torch.cat([ids, torch.cat([prompts.uncond_ids, body], -1)])
        mask = torch.cat([mask, mask])
    logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits
    logits = image_logits(logits[:, p_len - 1 :], space)  # position i predicts image token i
    cond, uncond = (logits[:b], logits[b:]) if params.guided else (logits, None)
    logprobs = guided_logprobs(cond, uncond, params)
    return gather_logprobs(logprobs, codes), entropy(logprobs.detach())
