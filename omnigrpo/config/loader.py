"""Load a run configuration: YAML file plus ``key.sub=value`` overrides -> a validated :class:`Config`.

Why: every config error must be found here, before SFT runs or a cluster starts, and reported as
lines naming the key (and, for a typo, the closest valid one) or the file and line. Types and ranges
are pydantic's (``omnigrpo.config.schema``); rules that span fields are ``omnigrpo.config.validation``'s.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from omnigrpo.config.schema import Config
from omnigrpo.config.validation import cross_field_problems


class ConfigError(ValueError):
    """A configuration that cannot run; the message names every offending key."""


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a :class:`Config` from a YAML file plus ``key.sub=value`` overrides, or raise ConfigError."""
    raw: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        raw = yaml.safe_load(text) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        _apply_override(raw, item)
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Validate a plain nested dict into a :class:`Config`."""
    try:
        cfg = TypeAdapter(Config).validate_python(raw)
    except ValidationError as err:
        raise ConfigError("invalid config:\n" + "\n".join(_describe(e) for e in err.errors())) from None
    problems = cross_field_problems(cfg)
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(problems))
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain data (for YAML artifacts and MLflow params)."""
    return dataclasses.asdict(cfg)


def _apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` inside ``raw``; the value is parsed as YAML (``3``, ``true``, ``[1, 2]``)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, parts[: i + 1])]
            continue
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        node = nxt
    leaf = yaml.safe_load(value) if value.strip() else ""
    if isinstance(node, list):
        node[_list_index(node, parts[-1], parts)] = leaf
    elif isinstance(node, dict):
        node[parts[-1]] = leaf
    else:
        raise ConfigError(f"override {item!r}: {'.'.join(parts[:-1])} is not a section")


def _list_index(node: list, part: str, path: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override path {'.'.join(path)}: list index {part!r} out of range ({len(node)})")
    return int(part)


def _describe(error: dict[str, Any]) -> str:
    loc = [str(p) for p in error["loc"]]
    where = ".".join(loc) or "<root>"
    if error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        valid = _field_names(loc[:-1])
        near = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        prefix = ".".join(loc[:-1] + [near[0]]) if near else ""
        hint = f" (did you mean {prefix}?)" if near else f" (valid keys: {', '.join(sorted(valid))})"
        return f"  {where}: unknown key{hint}"
    got = error.get("input")
    shown = f" (got {got!r})" if not isinstance(got, dict | list) else ""
    return f"  {where}: {error['msg']}{shown}"


def _field_names(loc: list[str]) -> list[str]:
    """Names of the fields of the dataclass found at ``loc`` under :class:`Config`."""
    cls: Any = Config
    for part in loc:
        if part.isdigit():
            continue
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return []
        cls = hints[part]
        if typing.get_origin(cls) is list:
            cls = typing.get_args(cls)[0]
    return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
