"""Atomic policy checkpoints under ``<run.dir>/checkpoints``, keeping the last N.

Why: a crash must leave something to resume from, never a half-written directory: a checkpoint is written into a
temporary sibling and renamed into place, so a reader sees none or a whole one, each a ``save_pretrained``
directory ``model.path`` can name, in a folder per MLflow run. Loading is as careful, since a run directory may be
shared and a pickle runs code: every ``.pt`` file is read ``weights_only`` (:func:`load_state`), and
:func:`unsafe_contents` names each file that could carry code before anything loads (docs/security.md).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from omnigrpo.config.inputs import read_input

SAFE_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address")
"""The classes (besides tensors and plain containers) a checkpoint's pickles may name: DeepSpeed's loss scaler,
ZeRO stage and fragment addresses, which its ZeRO optimiser states hold. Each is plain data."""
REFERENCE_DIR = "reference"
"""A checkpoint's folder for the KL reference once it was refreshed to the policy (``trainer.ref_refresh_*``): a
``model.path``-ready policy (safetensors weights) that a resume takes as its reference; absent before any refresh,
when the reference is the run's starting policy."""
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
"""Names of files that torch, transformers or DeepSpeed would unpickle."""

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
    info = json.loads(read_input(checkpoint / "omnigrpo_step.json", 16 << 20))  # checked by preflight first
    stamp = info.get("written_ns") if isinstance(info, dict) else None
    return stamp if type(stamp) is int else int(checkpoint.stat().st_mtime * 1e9), checkpoint.name


def _all(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return [p for run in root.iterdir() if run.is_dir() for p in run.iterdir()
            if p.is_dir() and _RESUMABLE.match(p.name) and (p / "omnigrpo_step.json").exists()]


def unsafe_contents(directory: str | Path) -> list[str]:
    """Each file under ``directory`` that a load could run code from, or hang on, as ``"path: why"`` (empty: none).

    Torch files are read as zip archives and their pickles' imports listed without unpickling anything
    (``torch.serialization.get_unsafe_globals_in_checkpoint``); any import outside :data:`SAFE_GLOBALS` is unsafe,
    as is any other file named like a pickle (the legacy formats, whose imports cannot be listed that way). A
    ``.npy`` file may not hold objects. Nothing but regular files and folders belongs in a checkpoint: a FIFO,
    a device or a link to one (a read would wait, or never end), or a link to a folder (loads follow it, the
    scan would not), is named too."""
    import torch

    found = []
    for path in sorted(Path(directory).rglob("*")):
        why = _not_plain(path)
        if why or path.is_dir():
            pass
        elif path.suffix == ".npy":
            why = _npy_objects(path)
        elif zipfile.is_zipfile(path) and path.suffix != ".safetensors":
            try:
                names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except Exception:  # noqa: BLE001 - a damaged torch file: its weights-only load fails, naming it
                names = []
            extra = sorted(set(names) - set(SAFE_GLOBALS))
            why = f"its pickle imports {', '.join(extra[:3])}" if extra else ""
        elif path.suffix in PICKLE_SUFFIXES and path.stat().st_size and not _truncated_zip(path):
            why = "a pickle in a legacy format, whose imports cannot be listed"
        if why:
            found.append(f"{path}: {why}")
    return found


def _not_plain(path: Path) -> str:
    """Why ``path`` is neither a regular file nor a folder of the checkpoint's own ("" when it is one)."""
    if path.is_symlink() and path.is_dir():
        return f"a link to the folder {path.resolve()}"
    try:
        mode = path.stat().st_mode
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return ""
    return "not a regular file (a FIFO, a device or a socket, or a link to one)"


def load_state(path: str | Path, map_location=None):
    """``torch.load`` of a file this project (or DeepSpeed for it) wrote: tensors, containers and
    :data:`SAFE_GLOBALS` only; anything else raises ``pickle.UnpicklingError`` before it is built."""
    import torch

    with torch.serialization.safe_globals(_safe_classes()):
        return torch.load(path, map_location=map_location, weights_only=True)


def _safe_classes() -> list[type]:
    """The classes of :data:`SAFE_GLOBALS`, where DeepSpeed is loaded (only its states hold them)."""
    if "deepspeed" not in sys.modules:
        return []
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _truncated_zip(path: Path) -> bool:
    """A torch file cut short (its zip directory lost): its weights-only load fails, naming it; it runs nothing."""
    with path.open("rb") as f:
        return f.read(2) == b"PK"


def _npy_objects(path: Path) -> str:
    import numpy as np

    try:  # with allow_pickle=False numpy refuses an object array from its header, before unpickling it
        np.load(path, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError) as err:
        return f"not a plain .npy array ({str(err).splitlines()[0][:120]})"
    return ""


def write_failure(err: BaseException, path: Path) -> OSError:
    """``err``, raised while writing under ``path``, as an OSError naming it: torch's writer reports a full disk
    as a RuntimeError of its stream, which is told apart here by the space left."""
    if isinstance(err, OSError):
        return err
    try:
        full = shutil.disk_usage(path if path.exists() else path.parent).free < 1 << 20
    except OSError:
        full = False
    if full:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return OSError(errno.EIO, f"{type(err).__name__}: {str(err).strip()[:200]}", str(path))
