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
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import requests
from PIL import Image

from omnigrpo.platform.registry import RewardFn

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


def make_server(reward: RewardFn, name: str, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """An HTTP server scoring with ``reward`` (call ``serve_forever``; ``server_address`` has the port)."""
    token = os.environ.get(TOKEN_ENV, "")

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
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                images = np.stack([decode_image(s) for s in body["images"]])
                prompts, metadata = list(body["prompts"]), list(body.get("metadata") or [{}] * len(images))
            except (ValueError, KeyError, TypeError, OSError) as err:
                return self._send(400, {"error": f"bad request: {err}"})
            try:
                scores = reward(images, prompts, metadata)
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
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                reply = requests.post(f"{self.url}/score", json=body, headers=self.headers, timeout=self.timeout)
                if reply.status_code in (400, 401, 403, 404):  # the request itself is wrong: retrying won't help
                    raise RuntimeError(f"{self.url} refused the request ({reply.status_code}): {reply.text[:200]}")
                reply.raise_for_status()
                scores = reply.json()["scores"]
                if not isinstance(scores, list) or len(scores) != len(prompts):
                    raise ValueError(f"{self.url} answered {len(scores) if isinstance(scores, list) else scores!r} "
                                     f"scores for {len(prompts)} images")
                return scores
            except RuntimeError:
                raise
            except (requests.RequestException, ValueError, KeyError, TypeError) as err:
                last = err
        raise RuntimeError(f"reward service {self.url} failed after {self.retries + 1} attempts: {last}")
