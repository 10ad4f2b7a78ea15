"""Load a run configuration: YAML file plus ``key.sub=value`` overrides -> a validated :class:`Config`.

Why: every config error must be found here, before SFT runs or a cluster starts, and reported as
lines naming the key (and, for a typo, the closest valid one) or the file and line. Types and ranges
are pydantic's (``omnigrpo.config.schema``); rules that span fields are ``omnigrpo.config.validation``'s.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from omnigrpo.config.inputs import InputFileError, read_input
from omnigrpo.config.schema import Config
from omnigrpo.config.validation import cross_field_problems


class ConfigError(ValueError):
    """A configuration that cannot run; the message names every offending key."""


class DuplicateKey(yaml.constructor.ConstructorError):
    """A mapping that names a key twice."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last in silence)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *anchor`` merges, it does not repeat a key
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in seen:
                    raise DuplicateKey(None, None, f"key {key!r} is given twice (first on line {seen[key] + 1})",
                                       key_node.start_mark)
                seen[key] = key_node.start_mark.line
            except TypeError:  # an unhashable key: the base class says so
                continue
        return super().construct_mapping(node, deep)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                unique: bool = False) -> Config:
    """Build a :class:`Config` from a YAML file plus ``key.sub=value`` overrides, or raise ConfigError.

    ``unique`` (the command line's rule): refuse a key set twice to different values, as a file refuses a key
    given twice. Off, a later override replaces an earlier one: programs layer a base list and its changes."""
    raw: dict[str, Any] = {}
    lines: dict[tuple[str, ...], int] = {}
    if path is not None:
        raw, lines = read_yaml(Path(path))
    given: dict[tuple[str, ...], Any] = {}
    for item in overrides:
        parts, value = _apply_override(raw, item)
        if unique:
            _check_repeat(given, parts, value)
        given[parts] = value
        # the file no longer decides this key, its contents or (for errors about it) its section's line
        lines = {k: v for k, v in lines.items() if k[:len(parts)] != parts and parts[:len(k)] != k}
    return config_from_dict(raw, lines, str(path))


def _check_repeat(given: dict[tuple[str, ...], Any], parts: tuple[str, ...], value: Any) -> None:
    """As a file may not name a key twice, overrides may not set one twice to different values, nor replace a
    section after setting a key inside it (the earlier setting would be lost in silence). The same value twice
    is harmless: ``--resume`` with ``run.resume=true`` gives that."""
    key = ".".join(parts)
    if parts in given and given[parts] != value:
        raise ConfigError(f"override {key}: given twice ({given[parts]!r}, then {value!r}); give it once")
    inside = next((k for k in given if len(k) > len(parts) and k[:len(parts)] == parts), None)
    if inside is not None:
        raise ConfigError(f"override {key}: replaces the whole of {key} after override {'.'.join(inside)} set a key "
                          "in it; set the section first, then its keys")


def read_yaml(path: Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    """The mapping in a YAML file and the line of every key in it (path of keys -> 1-based line)."""
    try:
        text = read_input(path).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except InputFileError as err:
        raise ConfigError(f"cannot read the config file {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the config file ({type(err).__name__}: {err})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        check_expansion(node, str(path))
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = "" if isinstance(err, DuplicateKey) else "not valid YAML: "
        raise ConfigError(f"{where}: {what}{err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except RecursionError:
        raise ConfigError(f"{path}: its values are nested too deeply") from None
    except ValueError as err:  # an integer past Python's 4300 digits
        raise ConfigError(f"{path}: a value cannot be read ({err})") from None
    if raw is None:
        return {}, {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}:1: the top level must be a mapping of sections (run:, trainer:, ...), "
                          f"not a {type(raw).__name__}")
    return raw, _key_lines(node, ())


MAX_VALUES = 100_000
"""Most values a config may hold once its YAML aliases are expanded: far above any real config, far below what
an alias bomb (a few hundred bytes of nested ``&a [*b, *b, ...]``) expands to."""


def check_expansion(node: yaml.Node | None, source: str) -> None:
    """Refuse a document whose aliases expand past :data:`MAX_VALUES` values, counted without expanding them
    (each node's size once, as the sum of its children's): everything after parsing walks the expanded tree."""
    sizes: dict[int, int | None] = {}

    def size(n: yaml.Node) -> int:
        if id(n) in sizes and sizes[id(n)] is None:
            raise ConfigError(f"{source}:{n.start_mark.line + 1}: a YAML alias refers to a value that holds it")
        if id(n) not in sizes:
            sizes[id(n)] = None  # being counted
            children = [c for pair in n.value for c in pair] if isinstance(n, yaml.MappingNode) else \
                n.value if isinstance(n, yaml.SequenceNode) else []
            sizes[id(n)] = min(1 + sum(size(c) for c in children), MAX_VALUES + 1)
        return typing.cast(int, sizes[id(n)])

    if node is not None and size(node) > MAX_VALUES:
        raise ConfigError(f"{source}: its YAML aliases expand to over {MAX_VALUES} values; refusing it "
                          "(write the values out, or use fewer nested aliases)")


def _key_lines(node: yaml.Node | None, at: tuple[str, ...]) -> dict[tuple[str, ...], int]:
    """Path of keys (list items by index) -> the 1-based line where that key or item starts."""
    out: dict[tuple[str, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            here = (*at, str(key.value))
            out[here] = key.start_mark.line + 1
            out.update(_key_lines(value, here))
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            here = (*at, str(i))
            out[here] = value.start_mark.line + 1
            out.update(_key_lines(value, here))
    return out


def config_from_dict(raw: dict[str, Any], lines: dict[tuple[str, ...], int] | None = None,
                     source: str = "") -> Config:
    """Validate a plain nested dict into a :class:`Config`; ``lines`` (from :func:`read_yaml`) adds the file
    and line of each offending key of ``source``."""
    booleans = [_locate(f"  {'.'.join(loc)}: a number is needed, not a boolean (got {value!r})", loc, lines or {},
                        source) for loc, value in _booleans_for_numbers(raw, Config, ())]
    if booleans:  # pydantic would read true as 1: `trainer.steps: true` is a mistake, not one step
        raise ConfigError("invalid config:\n" + "\n".join(booleans))
    try:
        cfg = TypeAdapter(Config).validate_python(raw)
    except ValidationError as err:
        described = [_locate(_describe(e), e["loc"], lines or {}, source) for e in err.errors()]
        raise ConfigError("invalid config:\n" + "\n".join(described)) from None
    problems = cross_field_problems(cfg)
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(problems))
    return cfg


def _booleans_for_numbers(value: Any, hint: Any, loc: tuple[str, ...]) -> list[tuple[tuple[str, ...], bool]]:
    """``(path of keys, value)`` of every true/false in ``value`` where the schema type ``hint`` wants an int or
    a float (pydantic's lax mode would take them as 1 and 0)."""
    if isinstance(value, bool):
        wanted = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        return [(loc, value)] if any(h in (int, float) for h in wanted) else []
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        hints = typing.get_type_hints(hint)
        return [found for key, item in value.items() if key in hints
                for found in _booleans_for_numbers(item, hints[key], (*loc, str(key)))]
    if typing.get_origin(hint) is list and isinstance(value, list):
        return [found for i, item in enumerate(value)
                for found in _booleans_for_numbers(item, typing.get_args(hint)[0], (*loc, str(i)))]
    return []


def with_overrides(cfg: Config, overrides: Mapping[str, Any], source: str = "overrides") -> Config:
    """``cfg`` with each ``{"section.key": value}`` set, validated as a loaded config is (an unknown key is named,
    with the nearest valid one): the ``key.sub=value`` overrides of the command line, for values already typed."""
    raw = to_dict(cfg)
    for key, value in overrides.items():
        _set_path(raw, key.split("."), value, f"{source}: {key}")
    return config_from_dict(raw, source=source)


def to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain data (for YAML artifacts and MLflow params)."""
    return dataclasses.asdict(cfg)


def _locate(line: str, loc: tuple, lines: dict[tuple[str, ...], int], source: str) -> str:
    """Prefix a problem line with ``file:line`` of the deepest part of ``loc`` the YAML file set."""
    parts = tuple(str(p) for p in loc)
    for end in range(len(parts), 0, -1):
        if parts[:end] in lines:
            return f"  {source}:{lines[parts[:end]]}: {line.strip()}"
    return line


def _apply_override(raw: dict[str, Any], item: str) -> tuple[tuple[str, ...], Any]:
    """Set ``a.b.c=value`` inside ``raw``; the value is parsed as YAML (``3``, ``true``, ``[1, 2]``).
    Returns the key's path and the value."""
    key, sep, value = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not key.strip() or not all(parts):
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    try:
        check_expansion(yaml.compose(value, Loader=yaml.SafeLoader), f"override {key.strip()}")
        leaf = yaml.load(value, Loader=_UniqueKeyLoader) if value.strip() else ""  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem})") from None
    except RecursionError:
        raise ConfigError(f"override {key.strip()}: its value is nested too deeply") from None
    except ValueError as err:  # an integer past Python's 4300 digits
        raise ConfigError(f"override {key.strip()}: the value cannot be read ({err})") from None
    _set_path(raw, parts, leaf, f"override {item!r}")
    return tuple(parts), leaf


def _set_path(raw: dict[str, Any], parts: list[str], leaf: Any, label: str) -> None:
    """Set ``raw[parts[0]][parts[1]]... = leaf``, making missing sections; ``label`` names the setting in errors."""
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, parts[: i + 1])]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{label}: {'.'.join(parts[:i])} is a value, not a section")
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        node = nxt
    if isinstance(node, list):
        node[_list_index(node, parts[-1], parts)] = leaf
    elif isinstance(node, dict):
        node[parts[-1]] = leaf
    else:
        raise ConfigError(f"{label}: {'.'.join(parts[:-1])} is a value, not a section")


def _list_index(node: list, part: str, path: list[str]) -> int:
    if not (part.isascii() and part.isdigit()) or int(part) >= len(node):
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
        if part.isascii() and part.isdigit():
            continue
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return []
        cls = hints[part]
        if typing.get_origin(cls) is list:
            cls = typing.get_args(cls)[0]
    return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
