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
    logged = MlflowClient(store_uri(cfg)).get_run(summary["run_id"]).data.metrics
    patterns = documented_metrics()
    missing = sorted(k for k in logged if not any(p.match(k) for p in patterns))
    assert len(logged) > 30 and not missing, missing
