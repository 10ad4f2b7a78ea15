"""Rewards that cause a fault on their ``call``-th call with real images (the blank dry run is not counted), so
a fault test fires at a known step instead of polling MLflow for one. Each scores 0 and is given ``weight: 0``,
so a run with one trains exactly as it would without it."""
import os
import signal
import time
from pathlib import Path


def _on_call(call: int, act):
    calls = [0]

    def score(images, prompts, metadata):
        if images.any():
            calls[0] += 1
            if calls[0] == call:
                act()
        return [0.0] * len(images)

    return score


def stops_the_driver(call: int):
    """SIGTERM to the driver (``OMNIGRPO_TEST_DRIVER_PID``), as ``omnigrpo stop`` and ``ray job stop`` send."""
    return _on_call(call, lambda: os.kill(int(os.environ["OMNIGRPO_TEST_DRIVER_PID"]), signal.SIGTERM))


def kills_a_rollout_actor(call: int):
    """Kills rollout actor 0 by its handle, from inside the cluster."""
    import ray

    def kill():
        names = [a["name"] if isinstance(a, dict) else a for a in ray.util.list_named_actors()]
        ray.kill(ray.get_actor(next(n for n in names if n.startswith("omnigrpo-rollout-0-"))))

    return _on_call(call, kill)


def kills_the_rollout_on(call: int, address: str, marker: str):
    """Kills the run's rollout actor on the node at ``address`` (another host's), from inside the cluster, and
    writes its name to ``marker``."""
    import ray

    def kill():
        for entry in ray.util.list_named_actors(all_namespaces=True):
            if entry["name"].startswith("omnigrpo-rollout-"):
                actor = ray.get_actor(entry["name"], namespace=entry["namespace"])
                try:  # dead already (each reward actor of the step makes this call)
                    where = ray.get(actor.__ray_call__.remote(lambda self: ray.util.get_node_ip_address()), timeout=60)
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                    continue
                if where == address:
                    ray.kill(actor)
                    Path(marker).write_text(entry["name"])

    return _on_call(call, kill)


def ends_a_process_group(call: int, pgid: int, marker: str):
    """SIGKILL to process group ``pgid`` (a tracking server), then writes ``marker``."""
    def end():
        os.killpg(pgid, signal.SIGKILL)
        Path(marker).write_text(str(time.time()))

    return _on_call(call, end)


def fills_a_disk(call: int, path: str):
    """Writes zeros to ``path`` until its file system is full (a disk that fills up while a run goes on)."""
    def fill():
        with open(path, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * (1 << 16))
                    f.flush()
            except OSError:
                pass

    return _on_call(call, fill)
