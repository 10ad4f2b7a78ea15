"""Reward services: any reward served over HTTP, and the client a ``url:`` reward entry uses.

Why: heavy judges (a 32B VLM, HPS on its own GPU) often live outside the training job, and a judge
that is down must make a sample *failed*, never 0. ``omnigrpo serve-reward NAME key=value ...`` serves
one reward; ``{name: "url:http://host:port"}`` in a run's ``rewards`` calls it.

Wire format (JSON both ways, never pickle)::

    POST /score   {"images": [<base64 PNG>, ...], "prompts": [...], "metadata": [{...}, ...]}
              ->  {"scores": [<float or null>, ...]}
    GET  /health  ->  {"reward": NAME, "status": "ok"}

The server binds 127.0.0.1 unless ``--host`` says otherwise. If ``OMNIGRPO_REWARD_TOKEN`` is set in
its environment it requires ``Authorization: Bearer <token>``, and the client sends the same variable
from its own environment; the token is never logged. The client splits a batch into requests of
``batch_size`` images, sends up to ``max_concurrency`` at once, gives each ``timeout`` seconds, and
retries ``retries`` times with exponential backoff; whatever still fails raises, so the reward
worker records the failure.
"""

from __future__ import annotations

import base64
import hmac
import io
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import requests
from PIL import Image

from omnigrpo.config.validation import has_credentials
from omnigrpo.rewards.protocol import RewardFn, call_reward

TOKEN_ENV = "OMNIGRPO_REWARD_TOKEN"
log = logging.getLogger(__name__)


def encode_image(image: np.ndarray) -> str:
    """uint8 ``[H, W, 3]`` -> base64 PNG (lossless)."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(data: str) -> np.ndarray:
    """base64 PNG -> uint8 ``[H, W, 3]``."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data, validate=True))).convert("RGB"))


def make_server(reward: RewardFn, name: str, host: str = "127.0.0.1", port: int = 0,
                max_body_mb: int = 256) -> ThreadingHTTPServer:
    """An HTTP server scoring with ``reward`` (call ``serve_forever``; ``server_address`` has the port).

    Requests are read concurrently but scored one at a time: a judge (its tokenizer, its GPU memory)
    is not assumed to be thread-safe. Bodies over ``max_body_mb`` are refused.
    """
    token = os.environ.get(TOKEN_ENV, "")
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorised(self) -> bool:
            if not token:
                return True
            given = self.headers.get("Authorization", "")
            return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())

        def do_GET(self):  # noqa: N802 - http.server's naming
            if self.path != "/health":
                return self._send(404, {"error": "not found"})
            return self._send(200, {"reward": name, "status": "ok"})

        def do_POST(self):  # noqa: N802
            if self.path != "/score":
                return self._send(404, {"error": "not found"})
            if not self._authorised():
                return self._send(401, {"error": "missing or wrong bearer token"})
            length = int(self.headers.get("Content-Length") or 0)
            if length > max_body_mb * 2**20:
                return self._send(413, {"error": f"body over {max_body_mb} MB"})
            try:
                body = json.loads(self.rfile.read(length))
                images = np.stack([decode_image(s) for s in body["images"]])
                prompts, metadata = list(body["prompts"]), list(body.get("metadata") or [{}] * len(images))
            except Exception as err:  # noqa: BLE001 - malformed JSON, base64, PNG or a decompression bomb
                return self._send(400, {"error": f"bad request: {type(err).__name__}: {err}"})
            try:
                with lock:
                    scores = call_reward(reward, images, prompts, metadata)
                scores = [None if s is None else float(s) for s in scores]
            except Exception as err:  # noqa: BLE001 - reported to the caller, who records a failure
                return self._send(500, {"error": f"{type(err).__name__}: {err}"})
            return self._send(200, {"scores": scores})

        def log_message(self, fmt, *args):  # requests at debug level, never headers
            log.debug("%s " + fmt, self.address_string(), *args)

    return ThreadingHTTPServer((host, port), Handler)


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
            parts = pool.map(lambda c: self._score(images[c], list(prompts[c]), metadata[c]), chunks)
            return [s for part in parts for s in part]

    def _score(self, images, prompts: list[str], metadata: list[dict]) -> list[float | None]:
        body = {"images": [encode_image(im) for im in images], "prompts": prompts, "metadata": metadata}

        def read(reply: requests.Response) -> list:
            scores = reply.json()["scores"]
            if not isinstance(scores, list) or len(scores) != len(prompts):
                raise ValueError(f"answered {len(scores) if isinstance(scores, list) else scores!r} scores "
                                 f"for {len(prompts)} images")
            return scores

        return post_json(f"{self.url}/score", body, self.headers, read, self.timeout, self.retries, self.backoff)


class ServiceRefused(RuntimeError):
    """The server answered 4xx: the request itself is wrong (token, path, body); retrying cannot help."""


class ServiceUnavailable(RuntimeError):
    """No usable answer within the retries: down, too slow, 5xx, or an unreadable reply."""


def post_json(url: str, body: dict, headers: dict, read, timeout: float, retries: int, backoff: float):
    """POST ``body`` as JSON and return ``read(reply)``, retrying what a retry can fix.

    Connection errors, timeouts, 5xx answers (their text kept for the error) and replies that ``read``
    rejects (ValueError, KeyError, IndexError, TypeError) are retried ``retries`` times with
    exponential backoff from ``backoff`` seconds, then raise :class:`ServiceUnavailable`; a 4xx raises
    :class:`ServiceRefused` at once.
    """
    last: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            reply = requests.post(url, json=body, headers=headers, timeout=timeout)
        except (requests.ConnectionError, requests.Timeout) as err:
            last = err
            continue
        if 400 <= reply.status_code < 500:
            raise ServiceRefused(f"{url} refused the request ({reply.status_code}): {reply.text[:200]}")
        if reply.status_code >= 500:
            last = RuntimeError(f"HTTP {reply.status_code}: {reply.text[:200]}")
            continue
        try:
            return read(reply)
        except (ValueError, KeyError, IndexError, TypeError) as err:
            last = ValueError(f"unreadable reply ({type(err).__name__}: {err}): {reply.text[:200]}")
    raise ServiceUnavailable(f"{url} failed after {retries + 1} attempts: {last}")
