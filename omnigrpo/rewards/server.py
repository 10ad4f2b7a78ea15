"""The reward service: one reward served over HTTP (uvicorn + FastAPI), with dynamic batching and replicas.

Why: a judge scores a batch far faster per image than one image at a time, but a training job sends its batch as
several concurrent requests. :class:`Batcher` queues them; each of ``replicas`` threads (each with its own reward)
takes the oldest, collects up to ``max_batch`` images of one size within ``max_wait_ms``, calls the reward once and
splits the scores back; a reward that raises fails every request of that call (500), never scores 0. Limits,
connections and access live in their own modules (docs/rewards.md, "Reward services"; docs/design.md).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Collection
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from omnigrpo.rewards.access import HostCheck, PublicBindRefused, is_loopback, served_hosts
from omnigrpo.rewards.admission import CONTAINER_BYTES, MB, Admission, Limits, Refused, Ticket, pixel_bytes
from omnigrpo.rewards.connections import Connections
from omnigrpo.rewards.protocol import RewardFn, call_reward, is_score
from omnigrpo.rewards.transport import TOKEN_ENV, open_image

log = logging.getLogger(__name__)
DEFAULT_LIMITS = Limits()


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
        if replicas < 1 or max_batch < 1 or not 0 <= max_wait_ms < math.inf:
            raise ValueError("replicas and max_batch must be at least 1, max_wait_ms finite and at least 0")
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

    def stop(self, timeout: float = 5.0) -> None:
        """Ask every replica to end and wait up to ``timeout`` seconds in all (a hung judge's thread is
        a daemon: it does not keep the process alive)."""
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
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
        batch = [job for job in batch if job.future.set_running_or_notify_cancel()]  # not those past their deadline
        if not batch:
            return
        prompts = [p for job in batch for p in job.prompts]
        metadata = [m for job in batch for m in job.metadata]
        self.calls.append(len(prompts))
        try:
            images = np.concatenate([job.images for job in batch])
            out = call_reward(reward, images, prompts, metadata)
            if not isinstance(out, list | tuple | np.ndarray) or len(out) != len(prompts):
                got = len(out) if hasattr(out, "__len__") else type(out).__name__
                raise ValueError(f"the reward returned {got} scores for {len(prompts)} images")
            scores = [None if s is None else float(s) if is_score(s) else math.nan for s in out]  # NaN: failed
        except Exception as err:  # noqa: BLE001 - every request of this call is answered with the error
            for job in batch:
                job.future.set_exception(err)
            return
        start = 0
        for job in batch:
            job.future.set_result(scores[start : start + len(job.prompts)])
            start += len(job.prompts)


def parse_request(body: bytes | bytearray, ticket: Ticket | None = None,
                  limits: Limits = DEFAULT_LIMITS) -> tuple[np.ndarray, list[str], list[dict]]:
    """A ``/score`` body -> (images ``[N, H, W, 3]`` uint8, prompts, metadata); raises on anything malformed.

    At most ``limits.max_images`` images; their sizes are read from their PNG headers, checked against
    ``limits.max_pixels`` and reserved on ``ticket`` (with the decode of the largest) before a pixel is
    decoded (:class:`~omnigrpo.rewards.admission.Refused` otherwise); then they are decoded one at a
    time into the batch array.
    """
    data = json.loads(body)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not data["images"]:
        raise ValueError('the body must be a JSON object with a non-empty "images" list')
    if len(data["images"]) > limits.max_images:
        raise Refused(413, f"{len(data['images'])} images, over this server's limit of {limits.max_images}")
    opened = [_open(i, s) for i, s in enumerate(data["images"])]
    sizes = [image.size for image in opened]
    for i, (width, height) in enumerate(sizes):
        if width * height > limits.max_pixels:
            raise Refused(413, f"image {i} declares {width}x{height} pixels, over this server's limit of "
                               f"{limits.max_pixels}")
    if len(set(sizes)) > 1:
        raise ValueError(f"the images of one request must share one size, got {sorted(set(sizes))[:3]}")
    prompts, metadata = data.get("prompts"), data.get("metadata") or [{}] * len(sizes)
    if not (isinstance(prompts, list) and isinstance(metadata, list) and len(prompts) == len(metadata) == len(sizes)):
        raise ValueError(f'"prompts" and "metadata" must be lists of one entry per image ({len(sizes)})')
    if not all(isinstance(m, dict) for m in metadata):
        raise ValueError("metadata must be a list of objects")
    if ticket is not None:
        ticket.take(pixel_bytes(sizes))
    width, height = sizes[0]
    images = np.empty((len(opened), height, width, 3), np.uint8)
    for i, image in enumerate(opened):
        images[i] = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))  # no copy when RGB already
        image.close()
    return images, [str(p) for p in prompts], metadata


def _open(index: int, data: object) -> Image.Image:
    """Image ``index`` of a request, its header read (413 for a decompression bomb, ValueError if not PNG)."""
    try:
        return open_image(data)  # type: ignore[arg-type] - a non-string fails here too
    except Image.DecompressionBombError as err:
        raise Refused(413, f"image {index} declares too many pixels ({err})") from None
    except Exception as err:  # noqa: BLE001 - base64, signature or PNG header
        raise ValueError(f"image {index} is not a readable PNG ({type(err).__name__}: {err})") from None


async def read_body(request: Request, ticket: Ticket, limits: Limits) -> bytearray:
    """The body within ``body_timeout_s`` (408), reserved on ``ticket`` as it arrives (then twice for parsing)."""
    limit = limits.max_body_mb * MB
    declared = request.headers.get("content-length") or "0"
    if not declared.isdigit():
        raise ValueError(f"Content-Length {declared[:20]!r} is not a number")
    if int(declared) > limit:
        raise Refused(413, f"body of {int(declared)} bytes, over this server's limit of {limit // MB} MB")
    body = bytearray()
    try:
        async with asyncio.timeout(limits.body_timeout_s):
            async for chunk in request.stream():
                ticket.take(len(chunk))
                body += chunk
                if len(body) > limit:
                    raise Refused(413, f"body over this server's limit of {limit // MB} MB")
    except TimeoutError:
        raise Refused(408, f"the body did not arrive within {limits.body_timeout_s:g} s") from None
    # the parsed JSON's strings and the PNG bytes, and each object or list it builds (a body of "{}," is mostly those)
    ticket.take(2 * len(body) + CONTAINER_BYTES * (body.count(b"{") + body.count(b"[")))
    return body


def error(code: int, message: str) -> JSONResponse:
    """An error answer ``{"error": message}``; 503 asks to retry in a second; a slow body (408), a wrong token
    (401) or content type (415) also closes the connection, so a client that cannot be served holds no slot."""
    headers = {"Retry-After": "1"} if code == 503 else {"Connection": "close"} if code in (401, 408, 415) else None
    return JSONResponse({"error": message}, status_code=code, headers=headers)


def create_app(name: str, batcher: Batcher, token: str = "", limits: Limits = DEFAULT_LIMITS,
               hosts: Collection[str] | None = None) -> FastAPI:
    """The FastAPI app of one reward: ``GET /health`` and ``POST /score`` under ``limits``, for requests
    whose ``Host`` is one of ``hosts`` (:func:`served_hosts`; None: any)."""
    app = FastAPI(title=f"omnigrpo reward {name}", docs_url=None, redoc_url=None, openapi_url=None)
    if hosts is not None:
        app.add_middleware(HostCheck, hosts=hosts)
    app.state.admission = admission = Admission(limits)
    expected = f"Bearer {token}".encode()

    @app.get("/health")
    def health() -> dict:
        return {"reward": name, "status": "ok"}

    async def answer(request: Request, ticket: Ticket) -> Response:
        deadline = asyncio.get_running_loop().time() + limits.request_timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                body = await read_body(request, ticket, limits)
        except ClientDisconnect:
            log.warning("reward %s: a client (%s) left before sending its whole body", name, _peer(request))
            return Response(status_code=400)
        ticket.enter()  # in flight only now: a slow body holds no place a good request needs
        try:
            images, prompts, metadata = await run_in_threadpool(parse_request, body, ticket, limits)
        except Refused:
            raise  # answered with its own status by score()
        except Exception as err:  # noqa: BLE001 - malformed JSON, base64 or PNG
            return error(400, f"bad request: {type(err).__name__}: {err}")
        del body
        try:
            async with asyncio.timeout_at(deadline):
                scores = await asyncio.wrap_future(batcher.submit(images, prompts, metadata))
        except TimeoutError:
            raise  # answered 504 by score()
        except Exception as err:  # noqa: BLE001 - reported to the caller, who records failed samples
            return error(500, f"{type(err).__name__}: {err}")
        if await request.is_disconnected():
            log.warning("reward %s: a client (%s) left before its scores were sent", name, _peer(request))
        # NaN stays NaN (a failed sample), as Python's json writes it; null means "not applicable"
        return Response(json.dumps({"scores": scores}), media_type="application/json")

    @app.post("/score")
    async def score(request: Request) -> Response:
        if token and not hmac.compare_digest(request.headers.get("authorization", "").encode(), expected):
            return error(401, "missing or wrong bearer token")
        media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media != "application/json":
            return error(415, f"the body must be application/json, not {media[:60]!r}")
        ticket = admission.ticket()
        try:
            return await answer(request, ticket)
        except Refused as err:
            return error(err.status, str(err))
        except ValueError as err:
            return error(400, f"bad request: {err}")
        except TimeoutError:
            return error(504, f"no scores within {limits.request_timeout_s:g} s (the judge call goes on)")
        finally:
            ticket.leave()

    return app


def _peer(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "unknown peer"


class RewardServer:
    """One reward served over HTTP: bound at construction (``url`` is known), then :meth:`start` in a
    thread (tests, notebooks; :meth:`stop` ends it) or :meth:`serve_forever` in the calling thread (CLI).

    ``reward`` is a reward function shared by every replica, or with ``replicas > 1`` usually a
    ``factory(index)`` building one per replica (``factory=True``). ``allowed_hosts``: ``Host`` values
    served beside the bound address (:func:`~omnigrpo.rewards.access.served_hosts`).
    """

    def __init__(self, reward: RewardFn | Callable[[int], RewardFn], name: str, host: str = "127.0.0.1",
                 port: int = 0, *, factory: bool = False, replicas: int = 1, max_batch: int = 64,
                 max_wait_ms: float = 20.0, limits: Limits = DEFAULT_LIMITS, allowed_hosts: Collection[str] = ()):
        token = os.environ.get(TOKEN_ENV, "")
        if not token and not is_loopback(host):
            raise PublicBindRefused(f"refusing to serve on {host}, which is not loopback, without a token: set "
                                    f"{TOKEN_ENV} (clients send the same variable), or bind 127.0.0.1")
        build = reward if factory else (lambda index: reward)
        self.name = name
        self.batcher = Batcher(build, replicas, max_batch, max_wait_ms)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._socket.bind((host, port))
            if not token and not is_loopback(self._socket.getsockname()[0]):  # the name resolved anew to bind
                raise PublicBindRefused(f"{host} resolved to {self._socket.getsockname()[0]} to bind, not loopback")
            self._socket.listen(2048)  # connections made before uvicorn starts wait in the backlog
        except (OSError, PublicBindRefused):
            self._socket.close()
            raise
        self.host, self.port = self._socket.getsockname()[:2]
        self.app = create_app(name, self.batcher, token, limits, served_hosts(self.host, self.port, allowed_hosts))
        self.connections = Connections(limits)
        # uvicorn leaves the process's logging alone and stays quiet: no access log (never any header)
        config = uvicorn.Config(self.app, log_config=None, log_level="warning", access_log=False, lifespan="off",
                                loop="asyncio", http=self.connections.protocol(), ws="none",  # type: ignore[arg-type] - a factory
                                timeout_graceful_shutdown=5)
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

