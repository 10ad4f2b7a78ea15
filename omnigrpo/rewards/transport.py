"""JSON over HTTP for judges that live elsewhere: PNG codec, the retry policy, and what a failure is.

Why: a reward service and an OpenAI-compatible VLM fail the same ways (down, overloaded, slow, a proxy's error
page), and a judge that fails must make its samples *failed*, never 0. Retrying is urllib3's
:class:`~urllib3.util.Retry` on a requests adapter, not a loop of our own: 429, 500/502/503/504, connection errors
and read timeouts are retried with exponential backoff, jitter and ``Retry-After``; any other 4xx raises
:class:`ServiceRefused` at once, and what still fails raises :class:`ServiceUnavailable` (docs/design.md, "Reward
services").
"""

from __future__ import annotations

import base64
import io
import math
import random
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import requests
from PIL import Image
from requests.adapters import HTTPAdapter
from urllib3.exceptions import MaxRetryError
from urllib3.util import Retry

TOKEN_ENV = "OMNIGRPO_REWARD_TOKEN"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
T = TypeVar("T")


class ServiceRefused(RuntimeError):
    """The server answered 4xx (not 429): the request itself is wrong; retrying cannot help."""


class ServiceUnavailable(RuntimeError):
    """No usable answer within the retries: down, too slow, 429/5xx, or an unreadable reply."""


def encode_image(image: np.ndarray) -> str:
    """uint8 ``[H, W, 3]`` -> base64 PNG (lossless)."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def open_image(data: str) -> Image.Image:
    """base64 PNG -> a PIL image whose header alone is read (its size is known, its pixels not decoded).

    Only PNG is opened (ValueError otherwise): the wire format is PNG, and each decoder Pillow has is
    code a hostile body could reach.
    """
    raw = base64.b64decode(data, validate=True)
    if not raw.startswith(PNG_SIGNATURE):
        raise ValueError(f"not a PNG (it starts with {raw[:8]!r})")
    return Image.open(io.BytesIO(raw), formats=["PNG"])


def decode_image(data: str) -> np.ndarray:
    """base64 PNG -> uint8 ``[H, W, 3]``."""
    return np.asarray(open_image(data).convert("RGB"))


class _Retry(Retry):
    """urllib3's Retry, its first wait ``backoff_factor`` rather than none (a judge that has just
    answered 503 is rarely back a millisecond later), so ``backoff`` keeps its meaning."""

    def get_backoff_time(self) -> float:
        failures = sum(1 for h in self.history if h.redirect_location is None)
        if failures == 0 or self.backoff_factor <= 0:
            return 0.0
        wait = self.backoff_factor * 2 ** (failures - 1) + random.uniform(0, self.backoff_jitter)
        return float(min(self.backoff_max, wait))


def retry_policy(retries: int, backoff: float, timeout: float) -> Retry:
    """The retry policy described in the module docstring."""
    return _Retry(total=retries, redirect=0, allowed_methods=None, status_forcelist=RETRY_STATUS,
                  backoff_factor=backoff, backoff_jitter=backoff, backoff_max=max(timeout, backoff),
                  respect_retry_after_header=True, retry_after_max=max(1, math.ceil(timeout)),
                  raise_on_status=False, raise_on_redirect=False)


def post_json(url: str, body: dict, headers: dict, read: Callable[[requests.Response], T], timeout: float,
              retries: int, backoff: float) -> T:
    """POST ``body`` as JSON under :func:`retry_policy` and return ``read(reply)``.

    ``read`` may raise ValueError, KeyError, IndexError or TypeError on a reply it cannot use; that
    becomes :class:`ServiceUnavailable` (not retried: a server that answers 200 with garbage will
    most likely do so again).
    """
    with requests.Session() as session:  # one per call: requests does not promise a shared Session is thread-safe
        adapter = HTTPAdapter(max_retries=retry_policy(retries, backoff, timeout))
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        try:
            reply = session.post(url, json=body, headers=headers, timeout=timeout)
        except requests.RequestException as err:
            raise ServiceUnavailable(f"{url} failed after {retries + 1} attempts: {_reason(err)}") from None
    retried = getattr(reply.raw, "retries", None)  # urllib3 keeps the history of the retries it made
    attempts = 1 + (len(retried.history) if retried is not None else 0)
    if reply.status_code in RETRY_STATUS:
        raise ServiceUnavailable(f"{url} failed after {attempts} attempts: HTTP {reply.status_code}: "
                                 f"{reply.text[:200]}")
    if 400 <= reply.status_code < 500:
        raise ServiceRefused(f"{url} refused the request ({reply.status_code}): {reply.text[:200]}")
    if reply.status_code >= 500:
        raise ServiceUnavailable(f"{url} answered HTTP {reply.status_code}: {reply.text[:200]}")
    try:
        return read(reply)
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise ServiceUnavailable(f"{url}: unreadable reply ({type(err).__name__}: {err}): "
                                 f"{reply.text[:200]}") from None


def _reason(err: requests.RequestException) -> str:
    """The underlying cause of a requests error, without urllib3's 'Max retries exceeded' wrapper."""
    inner: Any = err.args[0] if err.args else err
    if isinstance(inner, MaxRetryError) and inner.reason is not None:
        inner = inner.reason
    return f"{type(inner).__name__}: {inner}"
