"""Where a checkpoint's files are: a local directory, or a Hugging Face hub id resolved through the hub cache.

Why: ``model.path`` is normally a hub id (``deepseek-community/Janus-Pro-1B``) whose files sit in the local
Hugging Face cache of a machine that downloaded it once. Everything that reads a checkpoint's files
itself (image size, image vocabulary, the saved code grid, codebooks, a decoder's parts) goes through
:func:`checkpoint_file`, the same resolution ``from_pretrained`` uses: the cache first, the hub when online
(only the file asked for is fetched), and nothing but the cache under ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import json
from pathlib import Path


def is_local(path: str | Path) -> bool:
    """A path that names a local directory (or clearly means one), not a hub id ``org/name``.

    >>> is_local("/models/janus"), is_local("./x"), is_local("deepseek-community/Janus-Pro-1B")
    (True, True, False)
    """
    text = str(path)
    return text.startswith((".", "/", "~")) or Path(text).expanduser().exists() or text.count("/") != 1


def absolute(path: str) -> str:
    """A local path made absolute (``~`` expanded), so every actor on every node reads the same directory and
    none mistakes ``runs/step-000010`` for a hub id; a hub id unchanged.

    >>> absolute("deepseek-community/Janus-Pro-1B")
    'deepseek-community/Janus-Pro-1B'
    """
    return str(Path(path).expanduser().resolve()) if path and is_local(path) else path


def checkpoint_file(path: str | Path, name: str, required: bool = True) -> Path | None:
    """The file ``name`` (may contain ``/``) of the checkpoint at ``path``; None when it is absent and not
    ``required`` (a hub id offline without that file in the cache counts as absent)."""
    if is_local(path):
        local = Path(path).expanduser() / name
        if local.is_file() or required:
            return local
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(str(path), name))
    except (EntryNotFoundError, LocalEntryNotFoundError):
        if required:
            raise
        return None


def read_json(path: str | Path, name: str = "config.json") -> dict:
    """A JSON file of the checkpoint at ``path`` (local directory or hub id)."""
    return json.loads(checkpoint_file(path, name).read_text())
