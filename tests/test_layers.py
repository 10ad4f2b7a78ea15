"""The package's layers hold: imports only go down, modules are loaded by name in two tables only, components
below the application take config sections, and loading a config stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "omnigrpo"
BY_NAME = {"omnigrpo/rewards/registry.py", "omnigrpo/rollout/loader.py"}  # built-in rewards, model families


def _loads_by_name(tree: ast.AST) -> list[int]:
    """Lines that import importlib (but for ``importlib.metadata``, which reads package versions) or call
    ``__import__``."""

    def loader(name: str) -> bool:
        return name.split(".")[0] == "importlib" and name != "importlib.metadata"

    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(loader(a.name) for a in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and loader(node.module or ""):
            lines.append(node.lineno)
        elif isinstance(node, ast.Name) and node.id == "__import__":
            lines.append(node.lineno)
    return lines


def test_modules_are_loaded_by_name_only_in_the_two_tables():
    found = {str(p.relative_to(ROOT)): _loads_by_name(ast.parse(p.read_text())) for p in PACKAGE.rglob("*.py")}
    found = {path: lines for path, lines in found.items() if lines}
    assert set(found) == BY_NAME, found


def test_the_scan_sees_every_form():
    code = "import importlib\nfrom importlib import import_module\nimport importlib.util\nx = __import__('os')\n"
    assert _loads_by_name(ast.parse(code)) == [1, 2, 3, 4]


SECTIONS_ONLY = ("trainers", "rollout", "rewards", "sync", "cluster", "data", "worlds")
"""Packages whose components take config sections or plain arguments, never the whole ``Config``."""
WHOLE_CONFIG = {"omnigrpo/cluster/actors.py", "omnigrpo/cluster/payload.py"}  # the actors' wiring; a job's payload


def _whole_config_imports(tree: ast.AST) -> list[int]:
    """Lines that import the whole ``Config`` class from the schema."""
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            and node.module == "omnigrpo.config.schema" and any(a.name == "Config" for a in node.names)]


def test_components_below_the_application_take_config_sections():
    found = {str(p.relative_to(ROOT)): _whole_config_imports(ast.parse(p.read_text()))
             for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] in SECTIONS_ONLY}
    assert {path for path, lines in found.items() if lines} == WHOLE_CONFIG, found


def test_the_config_scan_sees_the_whole_config_only():
    code = "from omnigrpo.config.schema import Config, RunConfig\nfrom omnigrpo.config.schema import TrainerConfig\n"
    assert _whole_config_imports(ast.parse(code)) == [1]


def test_lint_imports_keeps_every_contract():
    lint = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "2 kept, 0 broken" in proc.stdout


def test_an_upward_import_breaks_the_layers_contract(tmp_path):
    """The contract can fail: a copy of the package whose config imports the driver is refused."""
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(PACKAGE, copy / "omnigrpo", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy)
    schema = copy / "omnigrpo" / "config" / "schema.py"
    schema.write_text(schema.read_text() + "\nfrom omnigrpo.app import driver  # noqa\n")
    lint = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run([str(lint)], cwd=copy, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0 and "omnigrpo.config.schema -> omnigrpo.app.driver" in proc.stdout


@pytest.mark.parametrize("module", ["torch", "matplotlib", "ray", "mlflow", "omnigrpo.worlds"])
def test_load_config_stays_light(module):
    code = ("import sys; from omnigrpo.config.loader import load_config; load_config('configs/glyphs.yaml'); "
            f"print({module!r} in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "False", proc.stderr
