"""The configuration reference (``docs/config.md``), generated from :mod:`omnigrpo.config.schema`.

Why: a hand-kept table of keys drifts from the schema; this one is written from the same docstrings, types,
ranges and defaults that the loader enforces, and a test fails when the committed file differs from it.
Regenerate with ``python -m omnigrpo.config.reference > docs/config.md``.
"""

from __future__ import annotations

import re
import typing

from omnigrpo.config.schema import Config, RewardSpec

HEADER = """# Configuration reference

Generated from `omnigrpo/config/schema.py` by `python -m omnigrpo.config.reference > docs/config.md`
(a test fails when this file and the schema differ). `omnigrpo train CONFIG.yaml key.sub=value ...`: every
key below can be set in the YAML file or as an override (parsed as YAML: `trainer.lr=1e-5`,
`rewards=[{name: shapes, weight: 2}]`, `rewards.0.required=false`). Unknown keys, wrong types, values out
of range and NaN or infinity in any float key are refused before anything starts, naming the key (and its line
in the file).
"""


def type_name(annotation: object) -> str:
    """``Annotated[int, Field(ge=1)]`` -> ``int``; ``Literal['a', 'b']`` -> ``'a' | 'b'``."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return type_name(typing.get_args(annotation)[0])
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in typing.get_args(annotation))
    text = getattr(annotation, "__name__", None) if origin is None else None
    return text or re.sub(r"\btyping\.", "", str(annotation)).replace("|", "\\|")


def bounds(metadata: list) -> str:
    """The range the field's ``Field(ge=..., le=...)`` metadata allows, e.g. ``>= 1``."""
    rules = []
    for item in metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "length >=")):
            if getattr(item, attr, None) is not None:
                rules.append(f"{sign} {getattr(item, attr)}")
    return ", ".join(rules)


def default_of(field) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()
        return "[shapes]" if isinstance(value, list) else "{…}"
    return repr(field.default)


def rows(cls: type, prefix: str) -> list[str]:
    out = []
    for name, field in cls.__pydantic_fields__.items():
        kind = type_name(field.annotation)
        limit = bounds(field.metadata)
        text = " ".join((field.description or "").split()).replace("|", "\\|")
        out.append(f"| `{prefix}{name}` | {kind}{f' ({limit})' if limit else ''} | `{default_of(field)}` | {text} |")
    return out


def markdown() -> str:
    """The whole reference: one table per section of :class:`Config`, then the fields of a reward entry."""
    parts = [HEADER]
    for section, field in Config.__pydantic_fields__.items():
        if section == "rewards":
            continue
        cls = typing.get_args(field.annotation)[0] if typing.get_origin(field.annotation) else field.annotation
        doc = " ".join((cls.__doc__ or "").split()) if cls.__doc__ and not cls.__doc__.startswith(cls.__name__) else ""
        parts += [f"## `{section}`", "", *([doc, ""] if doc else []), "| key | type | default | meaning |",
                  "|---|---|---|---|", *rows(cls, f"{section}."), ""]
    rewards = Config.__pydantic_fields__["rewards"]
    parts += ["## `rewards`", "", " ".join((rewards.description or "").split()), "Each entry:", "",
              "| key | type | default | meaning |", "|---|---|---|---|", *rows(RewardSpec, "rewards.N."), ""]
    return "\n".join(parts)


if __name__ == "__main__":
    print(markdown(), end="")
