"""Process environment for a private local Ray cluster, set before Ray is first imported.

Why: loopback is shared by every user of a machine, so a run's own cluster must admit only its owner.
With ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` set *before* ``import ray`` every socket stays on loopback;
with ``RAY_AUTH_MODE=token`` every connection must present a random token made for this cluster, kept
in a file only its owner can read (``RAY_AUTH_TOKEN_PATH``; never printed, logged or sent to MLflow).
Ray's session directory lives beside it in the same owner-only folder, removed when the process ends.
A user's own ``RAY_AUTH_MODE`` is kept. This module must not import Ray itself.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import tempfile
from pathlib import Path

LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}
MARKER = "OMNIGRPO_LOCAL_RAY_PID"
"""Set beside the token's path to the process that made it: a child process (a test worker, a benchmark's run)
makes its own cluster and token instead of reusing its parent's, which end with the parent."""
_HOME: list[Path] = []  # this process's owner-only folder for its local cluster, made once


def wants_local_cluster(address: str) -> bool:
    """True when a run will start its own cluster: no address in the config or in ``RAY_ADDRESS``."""
    return not address and not os.environ.get("RAY_ADDRESS")


def prepare_local_ray_env(address: str) -> dict[str, str]:
    """Set the loopback/auth defaults for a local cluster (and its token file, when token auth is on); returns
    what is now in effect, without the token's path."""
    if wants_local_cluster(address):
        ours = os.environ.get(MARKER) == str(os.getpid())
        inherited = MARKER in os.environ and not ours  # set by the omnigrpo process that started this one
        if inherited:
            for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", MARKER):
                os.environ.pop(key, None)
        chosen = "RAY_AUTH_MODE" in os.environ and not ours
        for key, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)
        if not chosen and not os.environ.get("RAY_AUTH_TOKEN"):
            os.environ["RAY_AUTH_TOKEN_PATH"] = str(local_cluster_home() / "auth_token")
            os.environ[MARKER] = str(os.getpid())
    return {k: os.environ[k] for k in LOCAL_RAY_ENV if k in os.environ}


def local_cluster_home() -> Path:
    """This process's owner-only folder (0700) holding its local cluster's token (0600) and Ray's session
    directory (``ray/``); made on first use, removed at exit."""
    if not _HOME:
        home = Path(tempfile.mkdtemp(prefix="omnigrpo-ray-"))
        atexit.register(shutil.rmtree, home, ignore_errors=True)
        token = os.open(home / "auth_token", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(token, "w") as f:
            f.write(secrets.token_hex(32))
        _HOME.append(home)
    return _HOME[0]


def private_dir(parent: str | Path) -> Path:
    """A new folder in ``parent`` that only this user can enter (mode 0700, made with ``mkdtemp``)."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".omnigrpo-", dir=Path(parent).resolve()))
