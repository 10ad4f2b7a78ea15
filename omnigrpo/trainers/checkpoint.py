"""Atomic policy checkpoints under ``<run.dir>/checkpoints``, keeping the last N.

Why: a crash must leave something to resume from, never a half-written directory. A checkpoint is
written into a temporary sibling and renamed into place (``os.replace`` is atomic on one file
system), so a reader sees either no ``step-000012`` or a whole one. Each is a ``save_pretrained``
directory that ``model.path`` can name directly. The driver gives every MLflow run its own folder
(``<run.dir>/checkpoints/<run id>``), so re-using a run directory never prunes another run's work.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

_NAME = re.compile(r"^step-(\d+)$")
_RESUMABLE = re.compile(r"^(?:step|crash)-\d+$")


def write_checkpoint(root: str | Path, step: int, save: Callable[[Path], None], keep_last: int,
                     info: dict | None = None, name: str = "step", staging: Path | None = None) -> Path:
    """Call ``save(tmp_dir)``, then atomically publish it as ``root/{name}-{step:06d}``.

    ``staging``: use this (hidden) directory as ``tmp_dir``, e.g. one other processes have already
    written their part into; by default a fresh temporary one.

    Only ``step-*`` checkpoints are pruned to the newest ``keep_last``; others (``crash-*``) are kept.
    An existing checkpoint of the same name is moved aside before the new one takes its place and
    deleted after, so a complete copy exists at every moment.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{name}-{step:06d}"
    tmp = staging or Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    aside = None
    try:
        save(tmp)
        stamp = {"step": step, "written_ns": time.time_ns(), **(info or {})}
        (tmp / "omnigrpo_step.json").write_text(json.dumps(stamp))
        if target.exists():
            aside = target.with_name(f".{target.name}-old")
            os.replace(target, aside)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_resumable(root: str | Path) -> Path | None:
    """The newest checkpoint under ``root/<run id>/`` that carries a run state: a ``step-*`` one, or a
    ``crash-*`` one written between updates."""
    found = [p for p in _all(root) if (p / "run_state.pt").exists()]
    return max(found, key=written) if found else None


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint of any kind under ``root/<run id>/`` (resumable or not)."""
    found = _all(root)
    return max(found, key=written) if found else None


def written(checkpoint: Path) -> tuple[int, str]:
    """When a checkpoint was published (recorded in it; the directory's time where it predates that)."""
    info = json.loads((checkpoint / "omnigrpo_step.json").read_text())
    return info.get("written_ns") or int(checkpoint.stat().st_mtime * 1e9), checkpoint.name


def _all(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return [p for run in root.iterdir() if run.is_dir() for p in run.iterdir()
            if p.is_dir() and _RESUMABLE.match(p.name) and (p / "omnigrpo_step.json").exists()]
