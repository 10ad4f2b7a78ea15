"""VLM judges: a vision-language model asked about the image and its prompt, in-process or over HTTP.

Why: X-Omni's strongest signal was a Qwen2.5-VL alignment judge, UnifiedReward-style judges rate quality on a 1-5
scale, and large judges are served by vLLM or SGLang. So one judge runs in the reward worker
(``backend="transformers"``) or against any OpenAI-compatible endpoint (``backend="openai"``, retried as
:mod:`omnigrpo.rewards.transport` says, its key read from the variable ``api_key_env`` names), and scores ``yes``
(P("yes") over the yes/no variants) or ``score`` (a parsed ``Final Score: X``, over 5). An answer that cannot be
read scores NaN, a failure, never 0 (docs/rewards.md, "Built-in judges").
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from omnigrpo.config.validation import has_credentials
from omnigrpo.rewards.protocol import judge_device
from omnigrpo.rewards.registry import register_reward
from omnigrpo.rewards.transport import ServiceUnavailable, encode_image, post_json

TEMPLATES = {
    "alignment": 'Does this image show "{prompt}"? Answer yes or no.',
    "unifiedreward": (
        "You are given a text caption and an image generated from it. Rate the image on how well it "
        "matches the caption and on its overall quality (clarity, detail, no artifacts).\n"
        "Caption: {prompt}\nEnd your answer with 'Final Score: X', X an integer from 1 to 5."
    ),
}
_SCORE = re.compile(r"final\s*score\s*[:：]?\s*(\d+(?:\.\d+)?)(?![\d.])", re.IGNORECASE)
_YES, _NO = ("yes",), ("no",)
log = logging.getLogger(__name__)


def parse_score(answer: str) -> float:
    """``"... Final Score: 4"`` -> 0.8; NaN when no score in 1-5 can be found.

    >>> parse_score("Sharp and faithful. Final Score: 4")
    0.8
    """
    found = _SCORE.findall(answer)
    value = float(found[-1]) if found else math.nan
    return value / 5.0 if 1.0 <= value <= 5.0 else math.nan


def yes_probability(logprobs: dict[str, float]) -> float:
    """``{token: logprob}`` of the first answer token -> p_yes / (p_yes + p_no); NaN if neither appears."""
    p_yes = sum(math.exp(lp) for tok, lp in logprobs.items() if tok.strip().lower() in _YES)
    p_no = sum(math.exp(lp) for tok, lp in logprobs.items() if tok.strip().lower() in _NO)
    return p_yes / (p_yes + p_no) if p_yes + p_no > 0 else math.nan


class TransformersVLM:
    """An in-process VLM: ``first_token_logprobs`` and ``generate`` for one image and question."""

    def __init__(self, model: str, processor: str | None = None, device: str = "auto", max_new_tokens: int = 64,
                 top_logprobs: int = 20):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        device = judge_device(device)  # "auto": the reward actor's GPU if it was given one
        self.processor = AutoProcessor.from_pretrained(processor or model)
        self.model = AutoModelForImageTextToText.from_pretrained(model).to(device).eval().requires_grad_(False)
        self.device, self.max_new_tokens, self.top_logprobs = device, max_new_tokens, top_logprobs

    def _inputs(self, image: np.ndarray, question: str):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.processor(text=[text], images=[Image.fromarray(np.asarray(image))], return_tensors="pt").to(
            self.device)

    @torch.no_grad()
    def first_token_logprobs(self, image: np.ndarray, question: str) -> dict[str, float]:
        """The ``top_logprobs`` most likely first answer tokens and their log-probs."""
        logits = self.model(**self._inputs(image, question)).logits[0, -1].float()
        top = torch.topk(logits.log_softmax(-1), min(self.top_logprobs, logits.shape[-1]))
        # decoded text, not raw BPE pieces ("Ġyes"), so both backends see " yes" the same way
        tokens = [self.processor.tokenizer.decode([i]) for i in top.indices.tolist()]
        out: dict[str, float] = {}
        for token, lp in zip(tokens, top.values.tolist(), strict=True):
            out[token] = float(np.logaddexp(out[token], lp)) if token in out else float(lp)
        return out

    @torch.no_grad()
    def generate(self, image: np.ndarray, question: str) -> str:
        inputs = self._inputs(image, question)
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return self.processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


class OpenAIVLM:
    """A VLM behind an OpenAI-compatible ``/chat/completions`` endpoint (vLLM, SGLang, ...)."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 120.0,
                 retries: int = 3, backoff: float = 1.0, max_new_tokens: int = 64, top_logprobs: int = 20):
        if has_credentials(base_url):
            raise ValueError("vlm_judge: put credentials in the environment (api_key_env), not in base_url")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.timeout, self.retries, self.backoff = model, timeout, retries, backoff
        self.max_new_tokens, self.top_logprobs = max_new_tokens, top_logprobs
        key = os.environ.get(api_key_env, "")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def _ask(self, image: np.ndarray, question: str, **extra) -> dict:
        content = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{encode_image(image)}"}},
                   {"type": "text", "text": question}]
        body = {"model": self.model, "messages": [{"role": "user", "content": content}], "temperature": 0.0, **extra}
        return post_json(self.url, body, self.headers, lambda reply: reply.json()["choices"][0], self.timeout,
                         self.retries, self.backoff)

    def first_token_logprobs(self, image: np.ndarray, question: str) -> dict[str, float]:
        choice = self._ask(image, question, max_tokens=1, logprobs=True, top_logprobs=self.top_logprobs)
        first = choice["logprobs"]["content"][0]
        return {entry["token"]: float(entry["logprob"]) for entry in first["top_logprobs"]}

    def generate(self, image: np.ndarray, question: str) -> str:
        return self._ask(image, question, max_tokens=self.max_new_tokens)["message"]["content"] or ""


@register_reward("vlm_judge")
def vlm_judge_reward(model: str, backend: str = "transformers", base_url: str | None = None,
                     processor: str | None = None, template: str = "alignment", mode: str = "yes",
                     max_concurrency: int = 8, device: str = "auto", **backend_kwargs) -> Callable:
    """A VLM asked about each image and its prompt (Qwen2-VL / Qwen2.5-VL family).

    Inputs: uint8 images ``[B, H, W, 3]`` and prompts. ``template``: ``alignment`` (yes/no) or
    ``unifiedreward`` (1-5), or any string with ``{prompt}``. ``mode``: ``yes`` -> P(yes) in [0, 1];
    ``score`` -> parsed ``Final Score`` / 5 in [0.2, 1]. Unreadable answers are NaN (failures).
    """
    question = TEMPLATES.get(template, template)
    if "{prompt}" not in question:
        raise ValueError(f"vlm_judge: template must be one of {sorted(TEMPLATES)} or contain {{prompt}}")
    if mode not in ("yes", "score"):
        raise ValueError(f"vlm_judge: mode must be 'yes' or 'score', got {mode!r}")
    if backend == "transformers":
        judge = TransformersVLM(model, processor, device, **backend_kwargs)
        workers = 1  # one model in this process: requests run one after another
    elif backend == "openai":
        if not base_url:
            raise ValueError("vlm_judge: backend 'openai' needs base_url (e.g. http://127.0.0.1:8000/v1)")
        judge, workers = OpenAIVLM(base_url, model, **backend_kwargs), max_concurrency
    else:
        raise ValueError(f"vlm_judge: backend must be 'transformers' or 'openai', got {backend!r}")

    def one(image, prompt: str) -> float:
        asked = question.format(prompt=prompt)
        try:
            if mode == "yes":
                return yes_probability(judge.first_token_logprobs(image, asked))
            return parse_score(judge.generate(image, asked))
        except (ServiceUnavailable, KeyError, IndexError, TypeError) as err:
            # this sample's answer never came or cannot be read: a failure of this sample only.
            # A refusal (ServiceRefused: wrong key, unknown model) propagates and fails the whole batch,
            # so the reward actor's dry run stops a misconfigured run at start-up.
            log.warning("vlm_judge: %s: %s", type(err).__name__, err)
            return math.nan

    def score(images, prompts, metadata):
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(one, list(images), list(prompts)))

    return score
