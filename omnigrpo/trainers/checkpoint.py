"""Atomic policy checkpoints under ``<run.dir>/checkpoints``, keeping the last N.

Why: a crash must leave something to resume from, never a half-written directory. A checkpoint is
written into a temporary sibling and renamed into place (``os.replace`` is atomic on one file
system), so a reader sees either no ``step-000012`` or a whole one. Each is a ``save_pretrained``
directory that ``model.path`` can name directly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

_NAME = re.compile(r"^step-(\d+)$")


def write_checkpoint(root: str | Path, step: int, save: Callable[[Path], None], keep_last: int,
                     info: dict | None = None) -> Path:
    """Call ``save(tmp_dir)``, then atomically publish it as ``root/step-{step:06d}``; prune old ones."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        save(tmp)
        (tmp / "omnigrpo_step.json").write_text(json.dumps({"step": step, **(info or {})}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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
