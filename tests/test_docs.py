"""The README is a short front door whose links all lead somewhere, and every ``omnigrpo`` command it shows
exists with the options it uses."""

import re
from pathlib import Path

import pytest

from omnigrpo.cli import CONFIG_COMMANDS, _parser

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert text.index("make demo") < text.index("## Train") < text.index("## Submit a Ray job") < text.index(
        "## Plug in a reward") < text.index("## Watch it in MLflow")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if not target.startswith(("http://", "https://")):
            assert (page.parent / target).exists(), f"{page.name} links to a missing {target}"


def test_every_command_in_the_readme_parses():
    parser = _parser()
    lines = re.findall(r"^(?:PYTHONPATH=\S+ )?\.venv/bin/omnigrpo ([^#\n]+)", (ROOT / "README.md").read_text(), re.M)
    assert len(lines) >= 8
    for line in lines:
        args, extra = parser.parse_known_args(line.split())  # as main() parses: overrides may follow options
        assert not [e for e in extra if e.startswith("-") or args.command not in CONFIG_COMMANDS], line
