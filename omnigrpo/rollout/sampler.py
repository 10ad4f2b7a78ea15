"""Image-token sampling and the log-probs of sampled images, sharing one distribution.

Why: GRPO's ratio pi_new / pi_old is only right if the learner scores a sampled image under exactly the
distribution the sampler drew it from. Both sides go through the family's image head and :func:`guided_logprobs`
(classifier-free guidance, temperature, top-k / top-p / min-p, renormalised), and the learner back-propagates
through both guided branches. The log-prob of a code the new policy filters out of its support is floored at
:data:`LOGPROB_FLOOR`, so the PPO ratio and the k3 KL stay finite (docs/design.md, "The GRPO step").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from omnigrpo.rollout.policy import ImageLM, PromptBatch

if TYPE_CHECKING:  # a type only: the sampler runs without pydantic (the GPU benchmark)
    from omnigrpo.config.schema import RolloutConfig

LOGPROB_FLOOR = -30.0


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

    @classmethod
    def of(cls, rollout: RolloutConfig) -> SamplingParams:
        """The sampling settings of a run's ``rollout`` section."""
        return cls(rollout.temperature, rollout.top_k, rollout.top_p, rollout.min_p, rollout.cfg_scale)


def guided_logprobs(cond: torch.Tensor, uncond: torch.Tensor | None, params: SamplingParams) -> torch.Tensor:
    """Log-probs ``[..., K]`` of the distribution sampled from: CFG, temperature, then filters."""
    logits = cond if uncond is None or not params.guided else torch.lerp(uncond, cond, params.cfg_scale)
    if params.temperature != 1.0:
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


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One code per row of ``probs`` ``[B, K]``, without ``torch.multinomial`` (which spends most of a small model's
    sampling step on the CPU) and without a host sync: :func:`exponential_race` on CUDA (four kernels, no cumulative
    sum), :func:`inverse_cdf` elsewhere (on the CPU the race's ``K`` uniforms per row cost more than the rest of
    the step's draw)."""
    return exponential_race(probs, generator) if probs.is_cuda else inverse_cdf(probs, generator)


def exponential_race(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``argmax_k p_k / E_k``, ``E_k = -log U_k`` i.i.d. Exp(1), picks code k with probability ``p_k``: codes ``[B]``.

    Written as ``argmin_k p_k / log U_k``: ``U`` in [0, 1) makes ``log U`` negative or -inf, never 0, so no 0/0 arises
    and a code of probability 0 scores 0, above every code with mass: it is never drawn."""
    noise = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=probs.dtype).log_()
    return torch.div(probs, noise).min(-1).indices  # min(dim), not argmin: one kernel on CUDA


def inverse_cdf(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The first code whose cumulative mass passes ``U`` times the row's total, one uniform ``U`` per row: codes
    ``[B]``.

    Scaling by the total keeps a rounding shortfall of the cumulative sum from selecting past the last code with
    mass; ``right=True`` skips a code of probability 0 (its cumulative mass equals its predecessor's)."""
    cdf = probs.cumsum(-1)
    u = torch.rand((probs.shape[0], 1), generator=generator, device=probs.device, dtype=probs.dtype)
    return torch.searchsorted(cdf, u.mul_(cdf[:, -1:]), right=True).squeeze(-1)


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


def _rows(prompts: PromptBatch, guided: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return prompts.both() if guided else (prompts.ids, prompts.mask)


def sample_code(lm: ImageLM, hidden: torch.Tensor, params: SamplingParams, b: int,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One code per image from the last hidden states ``[R, 1, D]`` (``R = b`` or ``2b`` with CFG): codes ``[b]``
    and their log-probs ``[b]`` under the sampled distribution."""
    logits = lm.head(hidden)[:, 0]
    cond, uncond = (logits[:b], logits[b:]) if params.guided else (logits, None)
    logprobs = guided_logprobs(cond, uncond, params)
    code = draw(logprobs.exp(), generator)
    return code, gather_logprobs(logprobs, code)


def sample_images(
    lm: ImageLM,
    prompts: PromptBatch,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    graphed=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one image per prompt, token by token over a static KV cache; both CFG branches in one batch.

    Forced segment tokens (Emu3's end-of-line) are fed without sampling. ``graphed``:
    :meth:`omnigrpo.rollout.graphs.GraphSet.decoder` (CUDA), to replay each step from CUDA graphs captured once
    per batch shape, or :func:`~omnigrpo.rollout.graphs.static_decoder`, the same fixed-shape loop run eagerly; it
    may answer None (a failed capture), and the growing-cache decode runs instead.

    Runs under ``torch.inference_mode`` (no version counters or view tracking: about a tenth of a small model's
    step on the CPU). The module's weights are packed first, outside it, so they stay ordinary tensors that a
    weight load may write; the results are returned as ordinary tensors (the learner gathers with them).

    Returns:
        codes ``[B, T]`` (0 .. K-1) and their log-probs ``[B, T]`` under the sampled distribution.
    """
    with torch.no_grad():
        lm.packed  # noqa: B018 (packs and re-points the weights once, outside inference mode)
    with torch.inference_mode():
        codes, logps = _sample(lm, prompts, params, generator, graphed)
    return codes.clone(), logps.clone()


def _sample(lm: ImageLM, prompts: PromptBatch, params: SamplingParams, generator: torch.Generator | None,
            graphed) -> tuple[torch.Tensor, torch.Tensor]:
    b = len(prompts)
    ids, mask = _rows(prompts, params.guided)
    rows, segment = ids.shape[0], lm.space.segment.tolist()
    loop = None if graphed is None else graphed(lm, params, b, rows, ids.shape[1] + len(segment), generator)
    positions = _positions(mask)
    cache = lm.new_cache(rows, ids.shape[1] + len(segment)) if loop is None else loop.cache
    hidden = lm.fast_forward(lm.embed_text(ids), positions, mask.bool(), lm.prompt_image(ids), cache)[:, -1:]
    last = len(segment) - 1 - segment[::-1].index(True)  # the last code: nothing is fed after it
    if loop is not None:
        loop.prime(hidden, positions[:, -1:] + 1)
        for is_code in segment[:last]:
            loop.step("code" if is_code else "eol")
        return loop.finish()
    return _decode(lm, hidden, positions[:, -1:] + 1, segment[:last], cache, params, b, generator)


def _decode(lm: ImageLM, hidden: torch.Tensor, step_pos: torch.Tensor, segment: list[bool], cache, params, b: int,
            generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The growing-cache decode from the prefill's last ``hidden`` ``[R, 1, D]``: the codes at ``segment``'s True
    positions are drawn and fed, the others (end-of-line) fed, then the last code is drawn."""
    rows, device = hidden.shape[0], hidden.device
    valid = torch.ones(rows, 1, dtype=torch.bool, device=device)
    eol = None if lm.space.eol_id is None else lm.embed_text(torch.full((rows, 1), lm.space.eol_id, device=device))
    codes, logps = [], []
    for j, is_code in enumerate(segment):
        if is_code:
            code, logp = sample_code(lm, hidden, params, b, generator)
            codes.append(code)
            logps.append(logp)
            x = lm.embed_codes(code[:, None].repeat(rows // b, 1))
        hidden = lm.fast_forward(x if is_code else eol, step_pos + j, valid, True, cache)
    code, logp = sample_code(lm, hidden, params, b, generator)
    return torch.stack(codes + [code], 1), torch.stack(logps + [logp], 1)


def segment_embeds(lm: ImageLM, codes: torch.Tensor) -> torch.Tensor:
    """The fed image segment for ``codes`` ``[B, T]``: code embeddings with forced tokens between rows,
    ``[B, S, D]``."""
    space = lm.space
    x = lm.embed_codes(codes)
    if space.eol_id is None:
        return x
    b, d = x.shape[0], x.shape[-1]
    eol = lm.embed_text(torch.full((b, space.rows, 1), space.eol_id, device=codes.device).flatten(1))
    return torch.cat([x.view(b, space.rows, space.cols, d), eol.view(b, space.rows, 1, d)], 2).flatten(1, 2)


def sequence_logprobs(
    lm: ImageLM,
    prompts: PromptBatch,
    codes: torch.Tensor,
    params: SamplingParams,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced log-probs of given images under the same distribution :func:`sample_images` uses,
    through the model's own (differentiable) forward.

    Args:
        codes: ``[B, T]`` image codes (0 .. K-1).

    Returns:
        log-probs ``[B, T]`` (differentiable) and per-token entropy ``[B, T]`` (detached).
    """
    b, p_len = codes.shape[0], prompts.ids.shape[1]
    ids, mask = _rows(prompts, params.guided)
    rows = ids.shape[0]
    seg = segment_embeds(lm, codes.repeat(rows // b, 1))[:, :-1]  # the last token is never fed
    embeds = torch.cat([lm.embed_text(ids), seg], 1)
    mask = torch.cat([mask, torch.ones(rows, seg.shape[1], dtype=mask.dtype, device=mask.device)], -1)
    image = torch.ones(mask.shape, dtype=torch.bool, device=mask.device)
    image[:, :p_len] = lm.prompt_image(ids)
    hidden = lm.hidden_states(embeds, mask, _positions(mask), image)
    predicts = p_len - 1 + torch.nonzero(lm.space.segment).squeeze(-1)  # positions predicting each code
    logits = lm.head(hidden[:, predicts.to(hidden.device)])
    cond, uncond = (logits[:b], logits[b:]) if params.guided else (logits, None)
    logprobs = guided_logprobs(cond, uncond, params)
    return gather_logprobs(logprobs, codes), entropy(logprobs.detach())
