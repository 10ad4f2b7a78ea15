"""Model families by name: load a policy from a hub id or a directory, and check a checkpoint early.

Why: ``model.family`` picks the family's record (``omnigrpo.rollout.family.Family``, one per module under
``rollout/families``), imported by name so a run only imports the family it uses (Janus, Emu3 and X-Omni
pull in large parts of transformers). This is one of the two places that import omnigrpo modules by name
(``docs/design.md``).
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import get_args

import torch

from omnigrpo.config.schema import FamilyName
from omnigrpo.rollout.family import Family
from omnigrpo.rollout.hub import is_local, read_json
from omnigrpo.rollout.policy import ImagePolicy


class CheckpointError(ValueError):
    """A ``model.path`` that cannot be loaded: missing, not cached offline, or the wrong image vocabulary."""


FAMILY_NAMES: tuple[str, ...] = get_args(FamilyName)
"""Every ``model.family``, in the config's order."""


def family_record(family: str) -> Family:
    """The :class:`~omnigrpo.rollout.family.Family` record of ``family``: the ``FAMILY`` of module
    ``omnigrpo.rollout.families.<family>``, imported on first use."""
    if family not in FAMILY_NAMES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILY_NAMES)}")
    record = importlib.import_module(f"omnigrpo.rollout.families.{family}").FAMILY
    if not isinstance(record, Family) or record.name != family:
        raise TypeError(f"omnigrpo.rollout.families.{family}.FAMILY is no Family record of {family!r}")
    return record


def family_records() -> list[Family]:
    """Every family's record (imports every family module)."""
    return [family_record(name) for name in FAMILY_NAMES]


def family_class(family: str) -> type[ImagePolicy]:
    """The policy class of ``family`` (imported on first use)."""
    return family_record(family).policy


def load_policy(family: str, path: str | Path, grid: tuple[int, int] | None = None,
                dtype: str | torch.dtype = torch.float32) -> ImagePolicy:
    """The ``family`` policy at ``path`` (hub id or local directory) with weights in ``dtype``; ``grid``
    (rows, cols of codes) for the families whose image size is a choice (Emu3, X-Omni)."""
    cls = family_class(family)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return cls.from_pretrained(path, grid=tuple(grid), dtype=dtype) if grid else cls.from_pretrained(path, dtype=dtype)


def _check_hub_id(repo: str) -> None:
    """A hub id must be in the local hub cache, or (online) exist on the hub; offline and uncached fails."""
    import huggingface_hub

    if isinstance(huggingface_hub.try_to_load_from_cache(repo, "config.json"), str):
        return
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise CheckpointError(f"model.path: {repo!r} is no local directory, and HF_HUB_OFFLINE is set with no "
                              "cached copy of that hub model")
    try:
        found = huggingface_hub.repo_exists(repo)
    except Exception as err:  # noqa: BLE001 - no network here: the actors will try (and say why they fail)
        logging.getLogger(__name__).warning("could not check hub model %r (%s); actors will try to download it",
                                            repo, type(err).__name__)
        return
    if not found:
        raise CheckpointError(f"model.path: {repo!r} is no local directory and no hub model")


def _check_weights(directory: Path) -> None:
    """Each safetensors file's header is whole and covers the file (a truncated copy fails here, in milliseconds,
    not when an actor loads it)."""
    from safetensors import safe_open

    for weights in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(weights), "pt"):
                pass
        except Exception as err:  # noqa: BLE001 - SafetensorError, OSError: unreadable either way
            raise CheckpointError(f"model.path: {weights} cannot be read ({type(err).__name__}: {err})") from None


def _model_type(path: str) -> str | None:
    """``model_type`` of the checkpoint's ``config.json`` when it is on this machine (a directory, or a hub id in
    the cache); None when only the hub has it."""
    if not is_local(path):
        import huggingface_hub

        if not isinstance(huggingface_hub.try_to_load_from_cache(path, "config.json"), str):
            return None
    try:
        return str(read_json(path).get("model_type"))
    except (OSError, ValueError, AttributeError) as err:  # unreadable, not JSON, or not a JSON object
        raise CheckpointError(f"model.path: {path!r} has no readable config.json ({type(err).__name__}: {err})") \
            from None


def check_checkpoint(family: str, path: str, num_codes: int | None = None) -> None:
    """Fail fast, before any cluster starts: unknown family, a local path that does not exist or lacks a file of
    the family's layout, a hub id neither cached nor (online) on the hub, a checkpoint of another family (its
    ``config.json`` ``model_type``), or one whose image vocabulary
    differs from ``num_codes`` (when the config states one). Reads only the checkpoint's config files."""
    record = family_record(family)
    looks_local = is_local(path)
    if looks_local and not Path(path).expanduser().exists():
        raise CheckpointError(f"model.path: {path!r} does not exist (and is not a hub id 'org/name')")
    if looks_local and not (Path(path).expanduser() / "config.json").is_file():
        raise CheckpointError(f"model.path: {path!r} holds no checkpoint (no config.json; a save_pretrained "
                              "directory is expected)")
    if not looks_local:
        _check_hub_id(path)
    if looks_local:
        _check_weights(Path(path).expanduser())
    _check_model_type(record, path)
    if looks_local:
        missing = [name for name in record.layout if not (Path(path).expanduser() / name).is_file()]
        if missing:
            raise CheckpointError(f"model.path: {path!r} is no whole {family} checkpoint: it lacks "
                                  f"{', '.join(missing)} (a {family} checkpoint holds {', '.join(record.layout)})")
    checker = getattr(record.policy, "image_vocabulary", None)
    if num_codes is not None and checker is not None:
        try:
            found = checker(path)  # a hub id: through the cache (online: fetches only the file it reads)
        except (OSError, ValueError, KeyError) as err:  # no or a malformed config.json
            raise CheckpointError(f"model.path: cannot read the image vocabulary of {path!r} "
                                  f"({type(err).__name__}: {err})") from None
        if found != num_codes:
            raise CheckpointError(f"model.image_codes: is {num_codes}, but the checkpoint {path!r} has an image "
                                  f"vocabulary of {found} codes")


def _check_model_type(record: Family, path: str) -> None:
    """The checkpoint's ``config.json`` ``model_type`` (when readable here) is one of the family's."""
    family, expected = record.name, " or ".join(repr(t) for t in record.model_types)
    model_type = _model_type(path)
    if model_type == "None":
        raise CheckpointError(f"model.path: {path!r}: its config.json names no model_type (a {family} checkpoint "
                              f"has {expected})")
    if model_type is not None and model_type not in record.model_types:
        raise CheckpointError(f"model.family: is {family!r}, but the checkpoint {path!r} is a {model_type!r} model "
                              f"(config.json model_type; {family} expects {expected})")
