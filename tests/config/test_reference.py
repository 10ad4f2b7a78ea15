"""docs/config.md is the schema's own reference: regenerated, it is unchanged."""

from pathlib import Path

from omnigrpo.config.reference import markdown
from omnigrpo.config.schema import Config

DOC = Path(__file__).parents[2] / "docs" / "config.md"


def test_the_committed_reference_is_the_schema():
    assert DOC.read_text() == markdown(), "regenerate: python -m omnigrpo.config.reference > docs/config.md"


def test_every_key_is_in_the_reference_with_its_docstring():
    text = markdown()
    for section, field in Config.__pydantic_fields__.items():
        if section == "rewards":
            continue
        for name, sub in field.default_factory().__pydantic_fields__.items():
            assert f"| `{section}.{name}` |" in text, (section, name)
            assert sub.description, f"{section}.{name} has no docstring"
