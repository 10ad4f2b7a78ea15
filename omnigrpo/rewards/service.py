"""The client of a reward service: the reward function behind a ``url:`` reward entry.

Why: heavy judges (a 32B VLM, HPS on its own GPU) often live outside the training job (``omnigrpo serve-reward``,
:mod:`omnigrpo.rewards.server`), and a judge that is down must make a sample *failed*, never 0. The client sends a
batch as JSON requests of ``batch_size`` images, ``max_concurrency`` at once, each retried under
:func:`omnigrpo.rewards.transport.retry_policy`; only the requests that still fail give their samples NaN, and a
refusal (4xx) or a batch whose every request failed raises. ``OMNIGRPO_REWARD_TOKEN`` goes as a bearer token, never
logged. The wire format: docs/rewards.md, "Reward services".
"""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor

import requests

from omnigrpo.config.validation import has_credentials
from omnigrpo.rewards.transport import TOKEN_ENV, ServiceUnavailable, encode_image, post_json

log = logging.getLogger(__name__)


class RemoteReward:
    """A reward function that scores through a service at ``url`` (see the module docstring)."""

    def __init__(self, url: str, timeout: float = 60.0, retries: int = 3, backoff: float = 0.5,
                 batch_size: int = 16, max_concurrency: int = 4):
        if has_credentials(url):
            raise ValueError("reward service URL: put the token in $OMNIGRPO_REWARD_TOKEN, not in the URL")
        self.url = url.rstrip("/")
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.batch_size, self.max_concurrency = batch_size, max_concurrency
        token = os.environ.get(TOKEN_ENV, "")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def __call__(self, images, prompts, metadata) -> list[float | None]:
        metadata = list(metadata) if metadata is not None else [{}] * len(prompts)
        chunks = [slice(i, i + self.batch_size) for i in range(0, len(prompts), self.batch_size)]
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            futures = [pool.submit(self._score, images[c], list(prompts[c]), metadata[c]) for c in chunks]
        scores: list[float | None] = []
        errors: list[ServiceUnavailable] = []
        for chunk, future in zip(chunks, futures, strict=True):
            try:
                scores.extend(future.result())  # a ServiceRefused propagates: the whole batch fails
            except ServiceUnavailable as err:
                errors.append(err)
                scores.extend([math.nan] * len(range(*chunk.indices(len(prompts)))))
        if errors and len(errors) == len(chunks):
            raise errors[0]
        if errors:
            log.warning("%s: %d of %d requests failed, their samples are failed: %s", self.url, len(errors),
                        len(chunks), errors[0])
        return scores

    def _score(self, images, prompts: list[str], metadata: list[dict]) -> list[float | None]:
        body = {"images": [encode_image(im) for im in images], "prompts": prompts, "metadata": metadata}

        def read(reply: requests.Response) -> list:
            scores = reply.json()["scores"]
            if not isinstance(scores, list) or len(scores) != len(prompts):
                raise ValueError(f"answered {len(scores) if isinstance(scores, list) else scores!r} scores "
                                 f"for {len(prompts)} images")
            return scores

        return post_json(f"{self.url}/score", body, self.headers, read, self.timeout, self.retries, self.backoff)
