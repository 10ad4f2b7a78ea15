"""The README is a short front door whose links all lead somewhere, and every ``omnigrpo`` command it shows
exists with the options it uses."""

import re
from pathlib import Path

import pytest

from omnigrpo.cli import CONFIG_COMMANDS
from omnigrpo.cli.parser import build_parser as _parser

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


def documented_metrics() -> list[re.Pattern]:
    """The metric names docs/metrics.md gives in backticks, as patterns: ``<...>`` is any one path segment and
    ``a|b`` in the last segment either name (``x_a|b``: ``x_a`` or ``x_b``)."""
    text = (ROOT / "docs" / "metrics.md").read_text()
    patterns = []
    for token in re.findall(r"`([a-z_]+(?:/[a-z_<>|]+)*)`", text):
        head, _, last = token.rpartition("/")
        head = re.escape(head + "/" if head else "")
        first, *others = last.split("|")
        stem = first.rpartition("_")[0] + "_" if "_" in first and not any("_" in o for o in others) else ""
        for part in [first, *(stem + o for o in others)]:
            whole = (head + re.escape(part)).replace(re.escape("<"), "<").replace(re.escape(">"), ">")
            patterns.append(re.compile(re.sub(r"<[^>]+>", "[^/]+", whole) + "$"))
    return patterns


@pytest.mark.usefixtures("ray_cluster")
def test_every_metric_a_run_logs_is_documented(reference_run):
    """The reference run's MLflow store holds what a run logs; docs/metrics.md must name each (a new metric
    without its line fails here)."""
    from mlflow.tracking import MlflowClient

    from omnigrpo.app.tracking import store_uri

    cfg, summary = reference_run
    logged = MlflowClient(store_uri(cfg.tracking, cfg.run.dir)).get_run(summary["run_id"]).data.metrics
    patterns = documented_metrics()
    missing = sorted(k for k in logged if not any(p.match(k) for p in patterns))
    assert len(logged) > 30 and not missing, missing


MODULE_DOCSTRING_LINES = 10
"""The hard limit; module docstrings aim for 8 lines: what the module is and why, pointers to docs/ for detail."""
FIGURE = re.compile(r"\b\d+(?:\.\d+)?x\b|\b\d+(?:\.\d+)? ?ms\b")
"""A measured figure (``3.2x``, ``35.6 ms``): those live in BENCHMARKS.md. ``\\b`` after the ``x`` keeps sizes such
as ``4x4`` or ``24x72`` out of it."""


def module_docstrings() -> dict[str, str]:
    import ast

    return {str(p.relative_to(ROOT)): ast.get_docstring(ast.parse(p.read_text()), clean=False) or ""
            for p in sorted((ROOT / "omnigrpo").rglob("*.py"))}


def test_module_docstrings_are_short():
    long = {path: len(doc.splitlines()) for path, doc in module_docstrings().items()
            if len(doc.splitlines()) > MODULE_DOCSTRING_LINES}
    assert not long, long


def test_module_docstrings_carry_no_figures():
    found = {path: FIGURE.findall(doc) for path, doc in module_docstrings().items()}
    assert not {path: hits for path, hits in found.items() if hits}


@pytest.mark.parametrize("text, figure", [("3.2x faster per step", "3.2x"), ("13.6x the previous", "13.6x"),
                                          ("35.6 ms per step", "35.6 ms"), ("a 2ms floor", "2ms"),
                                          ("FLUX's 8x VAE", "8x"), ("a 4x4 patch", None), ("24x72 pixels", None),
                                          ("``max_wait_ms``", None), ("16 x 16 thumbnails", None)])
def test_the_figure_pattern_tells_figures_from_sizes(text, figure):
    match = FIGURE.search(text)
    assert (match.group() if match else None) == figure


def test_pointers_in_the_package_lead_somewhere():
    """``docs/NAME.md`` and ``BENCHMARKS.md section N`` named in a docstring or comment exist."""
    sections = set(re.findall(r"^## (\d+)\.", (ROOT / "BENCHMARKS.md").read_text(), re.M))
    for path in sorted((ROOT / "omnigrpo").rglob("*.py")):
        text = path.read_text()
        for page in re.findall(r"\bdocs/([a-z_]+\.md)", text):
            assert (ROOT / "docs" / page).exists(), f"{path.name} points at a missing docs/{page}"
        for number in re.findall(r"BENCHMARKS\.md,?\s+section\s+(\d+)", text):
            assert number in sections, f"{path.name} points at a missing BENCHMARKS.md section {number}"
