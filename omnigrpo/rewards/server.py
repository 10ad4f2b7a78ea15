"""The reward service: one reward served over HTTP (uvicorn + FastAPI), with dynamic batching and replicas.

Why: a judge scores a batch of 64 images far faster than 64 batches of one, but a training job sends
its batch as several concurrent requests (``batch_size`` images each). :class:`Batcher` queues every
request; a replica takes the oldest, keeps collecting until it holds ``max_batch`` images or
``max_wait_ms`` have passed since it took the first, calls the reward once on them all and splits the
scores back to each request. Requests are never split, and only images of one size are scored
together. ``replicas`` threads share the queue, each with its own reward object built in its own
thread (a judge's tokenizer or CUDA state need not be thread-safe; ``{replica}`` in a string argument
such as ``device=cuda:{replica}`` becomes the replica's index). A reward that raises fails every
request of that judge call (HTTP 500), which the client turns into failed samples.

Safety: the server binds 127.0.0.1 unless told otherwise and refuses (:class:`PublicBindRefused`)
any other interface unless ``OMNIGRPO_REWARD_TOKEN`` is set; with the variable set every ``/score``
needs ``Authorization: Bearer <token>`` (compared in constant time, never logged). The wire format
is in :mod:`omnigrpo.rewards.service`.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from omnigrpo.rewards.protocol import RewardFn, call_reward
from omnigrpo.rewards.transport import TOKEN_ENV, decode_image

log = logging.getLogger(__name__)


class PublicBindRefused(ValueError):
    """Binding an interface other than loopback without a token would let anyone on the network score."""


@dataclass
class _Job:
    images: np.ndarray
    prompts: list[str]
    metadata: list[dict]
    future: Future = field(default_factory=Future)


class Batcher:
    """A queue of scoring jobs served by ``replicas`` threads, each calling its own reward in batches.

    ``factory(i)`` builds replica ``i``'s reward inside that replica's thread. ``calls`` records the
    number of images of every judge call (what the batching achieved, for tests and benchmarks).
    """

    def __init__(self, factory: Callable[[int], RewardFn], replicas: int = 1, max_batch: int = 64,
                 max_wait_ms: float = 20.0):
        if replicas < 1 or max_batch < 1 or max_wait_ms < 0:
            raise ValueError("replicas and max_batch must be at least 1, max_wait_ms at least 0")
        self.factory, self.replicas, self.max_batch, self.max_wait = factory, replicas, max_batch, max_wait_ms / 1e3
        self.calls: list[int] = []
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Build every replica (each in its own thread) and start serving; re-raises a failed build."""
        built: queue.Queue[BaseException | None] = queue.Queue()
        self._threads = [threading.Thread(target=self._run, args=(i, built), name=f"reward-replica-{i}", daemon=True)
                         for i in range(self.replicas)]
        for thread in self._threads:
            thread.start()
        errors = [e for e in (built.get() for _ in self._threads) if e is not None]
        if errors:
            self.stop()
            raise errors[0]

    def stop(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=30)
        self._threads = []

    def submit(self, images: np.ndarray, prompts: list[str], metadata: list[dict]) -> Future:
        """Queue one request; its future resolves to its scores (or the judge call's error)."""
        job = _Job(images, prompts, metadata)
        self._queue.put(job)
        return job.future

    def _run(self, index: int, built: queue.Queue) -> None:
        try:
            reward = self.factory(index)
        except BaseException as err:  # noqa: BLE001 - handed to start(), which raises it
            built.put(err)
            return
        built.put(None)
        held: _Job | None = None
        while True:
            first = held or self._queue.get()
            if first is None:
                return
            batch, held, stop = self._collect(first)
            self._score(reward, batch)
            if stop:
                return

    def _collect(self, first: _Job) -> tuple[list[_Job], _Job | None, bool]:
        """``first`` plus what arrives within ``max_wait`` and fits; returns (batch, job held back, stop)."""
        batch, size = [first], len(first.prompts)
        deadline = time.monotonic() + self.max_wait
        while size < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return batch, None, True
            if size + len(job.prompts) > self.max_batch or job.images.shape[1:] != first.images.shape[1:]:
                return batch, job, False
            batch.append(job)
            size += len(job.prompts)
        return batch, None, False

    def _score(self, reward: RewardFn, batch: list[_Job]) -> None:
        prompts = [p for job in batch for p in job.prompts]
        metadata = [m for job in batch for m in job.metadata]
        self.calls.append(len(prompts))
        try:
            images = np.concatenate([job.images for job in batch])
            out = call_reward(reward, images, prompts, metadata)
            if not isinstance(out, list | tuple | np.ndarray) or len(out) != len(prompts):
                got = len(out) if hasattr(out, "__len__") else type(out).__name__
                raise ValueError(f"the reward returned {got} scores for {len(prompts)} images")
            scores = [None if s is None else float(s) for s in out]
        except Exception as err:  # noqa: BLE001 - every request of this call is answered with the error
            for job in batch:
                job.future.set_exception(err)
            return
        start = 0
        for job in batch:
            job.future.set_result(scores[start : start + len(job.prompts)])
            start += len(job.prompts)


def parse_request(body: bytes) -> tuple[np.ndarray, list[str], list[dict]]:
    """A ``/score`` body -> (images, prompts, metadata); raises on anything malformed."""
    data = json.loads(body)
    images = np.stack([decode_image(s) for s in data["images"]])
    prompts = [str(p) for p in data["prompts"]]
    metadata = list(data.get("metadata") or [{}] * len(images))
    if len(prompts) != len(images) or len(metadata) != len(images):
        raise ValueError(f"{len(images)} images, {len(prompts)} prompts and {len(metadata)} metadata entries")
    if not all(isinstance(m, dict) for m in metadata):
        raise ValueError("metadata must be a list of objects")
    return images, prompts, metadata


def create_app(name: str, batcher: Batcher, token: str = "", max_body_mb: int = 256) -> FastAPI:
    """The FastAPI app of one reward: ``GET /health`` and ``POST /score``."""
    app = FastAPI(title=f"omnigrpo reward {name}", docs_url=None, redoc_url=None, openapi_url=None)
    expected = f"Bearer {token}".encode()
    limit = max_body_mb * 2**20

    def error(code: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=code)

    @app.get("/health")
    def health() -> dict:
        return {"reward": name, "status": "ok"}

    @app.post("/score")
    async def score(request: Request) -> Response:
        if token and not hmac.compare_digest(request.headers.get("authorization", "").encode(), expected):
            return error(401, "missing or wrong bearer token")
        if int(request.headers.get("content-length") or 0) > limit:
            return error(413, f"body over {max_body_mb} MB")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                return error(413, f"body over {max_body_mb} MB")
        try:
            images, prompts, metadata = await run_in_threadpool(parse_request, bytes(body))
        except Exception as err:  # noqa: BLE001 - malformed JSON, base64, PNG or a decompression bomb
            return error(400, f"bad request: {type(err).__name__}: {err}")
        try:
            scores = await asyncio.wrap_future(batcher.submit(images, prompts, metadata))
        except Exception as err:  # noqa: BLE001 - reported to the caller, who records failed samples
            return error(500, f"{type(err).__name__}: {err}")
        # NaN stays NaN (a failed sample), as Python's json writes it; null means "not applicable"
        return Response(json.dumps({"scores": scores}), media_type="application/json")

    return app


def is_loopback(host: str) -> bool:
    """Does ``host`` (an address or a name) only reach this machine?"""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None)
        except OSError:
            return False
        return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


class RewardServer:
    """One reward served over HTTP: bound at construction (``url`` is known), then :meth:`start` in a
    thread (tests, notebooks; :meth:`stop` ends it) or :meth:`serve_forever` in the calling thread (CLI).

    ``reward`` is a reward function shared by every replica, or with ``replicas > 1`` usually a
    ``factory(index)`` building one per replica (``factory=True``).
    """

    def __init__(self, reward: RewardFn | Callable[[int], RewardFn], name: str, host: str = "127.0.0.1",
                 port: int = 0, *, factory: bool = False, replicas: int = 1, max_batch: int = 64,
                 max_wait_ms: float = 20.0, max_body_mb: int = 256):
        token = os.environ.get(TOKEN_ENV, "")
        if not token and not is_loopback(host):
            raise PublicBindRefused(f"refusing to serve on {host}, which is not loopback, without a token: set "
                                    f"{TOKEN_ENV} (clients send the same variable), or bind 127.0.0.1")
        build = reward if factory else (lambda index: reward)
        self.name = name
        self.batcher = Batcher(build, replicas, max_batch, max_wait_ms)
        app = create_app(name, self.batcher, token, max_body_mb)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._socket.bind((host, port))
            self._socket.listen(2048)  # connections made before uvicorn starts wait in the backlog
        except OSError:
            self._socket.close()
            raise
        self.host, self.port = self._socket.getsockname()[:2]
        # uvicorn leaves the process's logging alone and stays quiet: no access log (never any header)
        config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="off",
                                loop="asyncio", http="h11", ws="none", timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def serve_forever(self, started: bool = False) -> None:
        """Build the replicas (unless ``started``), then serve in this thread until SIGINT / SIGTERM."""
        if not started:
            self.batcher.start()
        try:
            self._server.run(sockets=[self._socket])
        finally:
            self.batcher.stop()
            self._socket.close()

    def start(self, timeout: float = 30.0) -> RewardServer:
        """Build the replicas and serve in a background thread; returns once requests are answered."""
        self.batcher.start()
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name=f"reward-server-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"reward server {self.name!r} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.batcher.stop()
        self._socket.close()

    def __enter__(self) -> RewardServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def per_replica(kwargs: dict, index: int) -> dict:
    """``kwargs`` with ``{replica}`` in string values replaced by ``index`` (``device=cuda:{replica}``)."""
    return {k: v.replace("{replica}", str(index)) if isinstance(v, str) else v for k, v in kwargs.items()}

