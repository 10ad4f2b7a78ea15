"""Runs as Ray jobs: ``omnigrpo submit | status | logs | stop`` against a cluster's Jobs API.

Why: a real run lives on a cluster, not in the user's terminal. ``submit`` validates the config here
(a typo fails before anything reaches the cluster), then hands Ray's Jobs API a runtime environment
that carries the config (as the job's working directory) and this package's source (``py_modules``),
so the cluster runs exactly the code and config the user has. The job's entry point is the ordinary
CLI, ``python -m omnigrpo.platform.cli train config.yaml [overrides]``, which inside a job joins the
cluster through the ``RAY_ADDRESS`` Ray sets. The same run can therefore be started by hand with
``ray job submit --address ... --working-dir DIR -- omnigrpo train config.yaml``.

The cluster's nodes need omnigrpo's dependencies installed (same image or venv); only the package
source and config travel. Auth follows Ray: with token auth on (Ray 2.60's default) set
``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` on both sides; the token is never put in the
job's runtime environment or arguments.
"""

from __future__ import annotations

import shlex
import shutil
import tempfile
from pathlib import Path

import yaml

import omnigrpo
from omnigrpo.platform.config import ConfigError, load_config, to_dict

CONFIG_NAME = "config.yaml"


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def submit(config: str, address: str, overrides: list[str], env_vars: dict[str, str] | None = None,
           submission_id: str | None = None) -> str:
    """Validate ``config`` + ``overrides`` locally and submit the run; returns the job id."""
    cfg = load_config(config, overrides)  # raises ConfigError naming the key before any network call
    if not Path(cfg.run.dir).is_absolute():
        raise ConfigError(f"run.dir: a submitted run needs an absolute path on storage the cluster sees (got "
                          f"{cfg.run.dir!r}; a relative one would land in the job's temporary working directory)")
    staging = Path(tempfile.mkdtemp(prefix="omnigrpo-job-"))
    try:
        # the resolved config travels whole, so the cluster never re-reads the user's files
        (staging / CONFIG_NAME).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        package = Path(omnigrpo.__file__).resolve().parent
        runtime_env = {"working_dir": str(staging), "py_modules": [str(package)],
                       "env_vars": dict(env_vars or {})}
        entrypoint = shlex.join(["python", "-m", "omnigrpo.platform.cli", "train", CONFIG_NAME])
        return _client(address).submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                           submission_id=submission_id,
                                           metadata={"omnigrpo": omnigrpo.__version__, "config": Path(config).name})
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # Ray uploaded its own copy


def status(address: str, job_id: str) -> str:
    """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    return str(_client(address).get_job_status(job_id).value)


def logs(address: str, job_id: str) -> str:
    return _client(address).get_job_logs(job_id)


def stop(address: str, job_id: str) -> bool:
    """Ask the job to stop; True if a stop was sent (the run writes a crash checkpoint on the way out)."""
    return bool(_client(address).stop_job(job_id))
