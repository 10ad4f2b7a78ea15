"""Process environment for a local Ray cluster, set before Ray is first imported.

Why: Ray decides at import time whether it runs as a multi-node cluster; left alone, a "local"
cluster's agents and workers listen on every interface. With ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
set *before* ``import ray`` every socket stays on loopback (checked with ``ss -ltnp``). Ray 2.60 also
turns token authentication on by default, which a private local cluster does not need. Both are set
only when the run starts its own cluster and only where the user has not chosen otherwise; this
module must not import Ray itself.
"""

from __future__ import annotations

import os

LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


def wants_local_cluster(address: str) -> bool:
    """True when a run will start its own cluster: no address in the config or in ``RAY_ADDRESS``."""
    return not address and not os.environ.get("RAY_ADDRESS")


def prepare_local_ray_env(address: str) -> dict[str, str]:
    """Set the loopback/auth defaults for a local cluster; returns what is now in effect."""
    if wants_local_cluster(address):
        for key, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)
    return {k: os.environ[k] for k in LOCAL_RAY_ENV if k in os.environ}
