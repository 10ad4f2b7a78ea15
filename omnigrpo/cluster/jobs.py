"""Runs as Ray jobs: ``omnigrpo submit | status | logs | stop`` against a cluster's Jobs API.

Why: a real run lives on a cluster, not in the user's terminal. ``submit`` validates the config here (a typo fails
before anything reaches the cluster) and hands Ray's Jobs API a runtime environment carrying the config, this
package's sources and the files the run needs (``omnigrpo.cluster.payload``), so the cluster runs exactly the
user's code and config. The entry point is the ordinary CLI, ``python -m omnigrpo.cli train config.yaml``, which
joins the cluster through ``RAY_ADDRESS``; Ray's auth token is never put in the job's environment or arguments
(docs/cluster.md, "Running on a Ray cluster").
"""

from __future__ import annotations

import asyncio
import shlex
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import tenacity

import omnigrpo
from omnigrpo.cluster.payload import CONFIG_NAME, Payload


def _agent_wait() -> tenacity.Retrying:
    """Ray answers "No available agent to submit job, please try again later" until a new head's job agent is up."""
    return tenacity.Retrying(retry=tenacity.retry_if_exception(lambda err: "No available agent" in str(err)),
                             wait=tenacity.wait_exponential(multiplier=1, max=10),
                             stop=tenacity.stop_after_delay(120), reraise=True)


TIMEOUT_S = 30.0
"""Default wait for one answer of the Jobs API (``--timeout`` of submit, status, logs and stop)."""


def _client(address: str, timeout: float = TIMEOUT_S):
    """Ray's Jobs client whose every HTTP call waits at most ``timeout`` seconds for an answer (Ray's own waits
    forever on a port that accepts and never answers); on expiry, a TimeoutError naming the address."""
    import requests
    from ray.job_submission import JobSubmissionClient

    class Client(JobSubmissionClient):
        def _do_request(self, method: str, endpoint: str, **kwargs):
            kwargs.setdefault("timeout", timeout)
            try:
                return super()._do_request(method, endpoint, **kwargs)
            except requests.Timeout:
                raise TimeoutError(f"the Ray Jobs API at {address} did not answer within {timeout:g} s") from None

    return Client(address)


def submit(payload: Payload, config_name: str, address: str, stop_grace_s: float,
           env_vars: dict[str, str] | None = None, submission_id: str | None = None, timeout: float = TIMEOUT_S) -> str:
    """Submit a run of a resolved, checked config as its ``payload`` (``omnigrpo.cluster.payload.gather``, which
    refuses what the cluster could not see); ``config_name``: the user's file, for the job's metadata;
    ``stop_grace_s``: ``cluster.stop_grace_s``. Returns the job id."""
    staging = Path(tempfile.mkdtemp(prefix="omnigrpo-job-"))
    try:
        # the resolved config travels whole, so the cluster never re-reads the user's files; omnigrpo's sources
        # are a staged copy of its .py files, so nothing else in the package directory is uploaded
        work, package = payload.write(staging)
        # Ray SIGKILLs a stopped job RAY_JOB_STOP_WAIT_TIME_S after its SIGTERM (3 s by default): long enough here
        # for the run to finish its step and write a resumable checkpoint
        grace = {"RAY_JOB_STOP_WAIT_TIME_S": str(stop_grace_s)}
        runtime_env = {"working_dir": str(work), "py_modules": [str(package)],
                       "env_vars": {**grace, **(env_vars or {})}}
        entrypoint = shlex.join(["python", "-m", "omnigrpo.cli", "train", CONFIG_NAME])
        metadata = {"omnigrpo": omnigrpo.__version__, "config": config_name}
        for attempt in _agent_wait():  # a head that has just started may not have its job agent up yet
            with attempt:
                return _client(address, timeout).submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                                   submission_id=submission_id, metadata=metadata)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # Ray uploaded its own copy


def status(address: str, job_id: str, timeout: float = TIMEOUT_S) -> str:
    """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    return str(_client(address, timeout).get_job_status(job_id).value)


def logs(address: str, job_id: str, timeout: float = TIMEOUT_S) -> str:
    return _client(address, timeout).get_job_logs(job_id)


def follow(address: str, job_id: str, timeout: float = TIMEOUT_S) -> Iterator[str]:
    """The job's output as it is written, from the start, until the job ends (Ray's asynchronous log tail,
    driven one chunk at a time; an interrupt cancels the pending read and closes the tail cleanly)."""
    loop = asyncio.new_event_loop()
    chunks = _client(address, timeout).tail_job_logs(job_id)
    try:
        while True:
            pending = loop.create_task(_next(chunks))
            try:
                yield loop.run_until_complete(pending)
            except StopAsyncIteration:
                return
            except BaseException:
                pending.cancel()
                loop.run_until_complete(asyncio.gather(pending, return_exceptions=True))
                raise
    finally:
        loop.run_until_complete(chunks.aclose())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def _next(chunks: AsyncIterator[str]) -> str:
    return await anext(chunks)


def stop(address: str, job_id: str, timeout: float = TIMEOUT_S) -> bool:
    """Ask the job to stop (SIGTERM): the run finishes its step and writes a resumable checkpoint within
    ``cluster.stop_grace_s``; True if a stop was sent."""
    return bool(_client(address, timeout).stop_job(job_id))
