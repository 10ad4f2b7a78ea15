"""What ``omnigrpo submit`` uploads: only the files a run needs, listed first; bad input refused before anything
is sent (no cluster here: every test would fail if it contacted one)."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import pytest
from conftest import refused

from omnigrpo.cli import main
from omnigrpo.cluster import jobs
from omnigrpo.cluster.payload import gather
from omnigrpo.config.loader import ConfigError, load_config

SHAPES = str(Path(__file__).parents[2] / "configs" / "shapes.yaml")
NOBODY = "http://127.0.0.1:9"  # nothing listens here: an error that names it came from trying to connect
_refused = functools.partial(refused, main)
JUDGE = "def score(images, prompts, metadata):\n    return [1.0] * len(images)\n"


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to reach a cluster fails the test."""

    def contacted(*args, **kwargs):
        raise AssertionError("a cluster was contacted")

    monkeypatch.setattr(jobs, "_client", contacted)
    monkeypatch.setattr(jobs, "submit", contacted)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def _package(root: Path, name: str) -> Path:
    """A reward package with what must never travel beside its sources."""
    package = root / name
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text(JUDGE)
    (package / "sub" / "__init__.py").write_text("")
    (package / "py.typed").write_text("")
    (package / ".env").write_text("API_KEY=secret\n")
    (package / ".secret").mkdir()
    (package / ".secret" / "keys.py").write_text("KEY = 'secret'\n")
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "stale.py").write_text("")
    (package / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"\0")
    (package / "weights.bin").write_bytes(b"\0" * 64)
    (package / "alias.py").symlink_to(package / "__init__.py")  # a link inside the package: shipped as its file
    return package


def _config(tmp_path: Path, *overrides: str):
    return load_config(SHAPES, [f"run.dir={tmp_path / 'run'}", *overrides])


def test_only_a_reward_packages_python_sources_ship(tmp_path, monkeypatch):
    _package(tmp_path / "mine", "judgepkg")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "id_rsa").write_text("PRIVATE KEY")
    (tmp_path / "mine" / "judgepkg" / "key.pem").symlink_to(tmp_path / "outside" / "id_rsa")  # never a source
    monkeypatch.syspath_prepend(str(tmp_path / "mine"))
    payload = gather(_config(tmp_path, "rewards=[{name: shapes}, {name: 'judgepkg:score'}]"))
    assert sorted(payload.files) == ["judgepkg/__init__.py", "judgepkg/alias.py", "judgepkg/py.typed",
                                     "judgepkg/sub/__init__.py"]
    work, _ = payload.write(tmp_path / "staged")
    written = sorted(p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file())
    assert written == ["config.yaml", *sorted(payload.files)]
    assert not any(p.is_symlink() for p in work.rglob("*"))
    assert (work / "judgepkg" / "alias.py").read_text() == JUDGE


@pytest.mark.parametrize("link", ["leak.py", "linked"])
def test_a_link_out_of_a_reward_package_is_refused_by_name(link, tmp_path, monkeypatch):
    package = _package(tmp_path / "mine", f"leaky_{link.replace('.', '_')}")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "id_rsa").write_text("PRIVATE KEY")
    (package / link).symlink_to(tmp_path / "outside" / ("id_rsa" if link.endswith(".py") else ""))
    monkeypatch.syspath_prepend(str(tmp_path / "mine"))
    cfg = _config(tmp_path, f"rewards=[{{name: shapes}}, {{name: '{package.name}:score'}}]")
    named = re.escape(f"rewards.1.name: {package / link} is a link to {tmp_path}/outside")
    with pytest.raises(ConfigError, match=named):
        gather(cfg)


def test_omnigrpos_own_source_ships_as_python_files_only(tmp_path):
    payload = gather(_config(tmp_path))
    assert "omnigrpo/cli/__main__.py" in payload.package and "omnigrpo/cluster/payload.py" in payload.package
    assert all(name.endswith(".py") and "__pycache__" not in name for name in payload.package)
    assert "omnigrpo/bench/trl_settings.yaml" not in payload.package  # in the package directory, not a source
    _, package = payload.write(tmp_path / "staged")
    assert package.name == "omnigrpo" and {p.suffix for p in package.rglob("*") if p.is_file()} == {".py"}


def test_a_prompt_directory_is_refused_by_name(tmp_path, capsys, monkeypatch, offline):
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "id_rsa").write_text("PRIVATE KEY")
    monkeypatch.chdir(tmp_path)
    err = _refused(["submit", SHAPES, "--address", NOBODY, f"run.dir={tmp_path / 'run'}", "data.prompts=."], capsys,
                   "data.prompts")
    assert NOBODY not in err
    with pytest.raises(ConfigError, match=f"data.prompts: {re.escape(str(tmp_path))}: is a directory.*datasets"):
        gather(_config(tmp_path, "data.prompts=."))  # even one that datasets could read is not shipped


def test_an_unknown_reward_is_refused_before_any_connection(tmp_path, capsys, offline):
    err = _refused(["submit", SHAPES, "--address", NOBODY, f"run.dir={tmp_path / 'run'}", "rewards=[{name: shapez}]"],
                   capsys, "rewards.0.name: unknown reward 'shapez'")
    assert NOBODY not in err


def test_a_missing_prompt_file_is_named_not_the_address(tmp_path, capsys, monkeypatch, offline):
    monkeypatch.chdir(tmp_path)
    err = _refused(["submit", SHAPES, "--address", NOBODY, f"run.dir={tmp_path / 'run'}",
                    "data.prompts=missing.txt"], capsys, "data.prompts: 'missing.txt' is neither a built-in world")
    assert NOBODY not in err


def test_dry_run_lists_every_file_and_contacts_nothing(tmp_path, capsys, monkeypatch, offline):
    _package(tmp_path / "mine", "dryjudge")
    monkeypatch.syspath_prepend(str(tmp_path / "mine"))
    monkeypatch.chdir(tmp_path)
    Path("prompts.txt").write_text("a red circle at the top left\n")
    code = main(["submit", SHAPES, "--dry-run", f"run.dir={tmp_path / 'run'}", "data.prompts=prompts.txt",
                 "rewards=[{name: shapes}, {name: 'dryjudge:score'}]"])
    out = capsys.readouterr().out
    assert code == 0, out
    listed = [line.split()[-1] for line in out.splitlines()[1:-2]]
    assert listed[:-1] == ["config.yaml", "dryjudge/__init__.py", "dryjudge/alias.py", "dryjudge/py.typed",
                           "dryjudge/sub/__init__.py", "inputs/prompts.txt"], out
    assert " 29 B  inputs/prompts.txt" in out and "omnigrpo/ (py_modules: " in out
    assert "in all, " in out.splitlines()[-2] and out.splitlines()[-1] == "dry run: nothing sent"
    assert sorted(os.listdir(tmp_path)) == ["mine", "prompts.txt"]  # nothing written here either


def test_a_link_inside_a_package_to_a_dot_file_is_refused_by_name(tmp_path, monkeypatch):
    package = _package(tmp_path / "mine", "dotlink")
    (package / "settings.py").symlink_to(package / ".env")  # inside the package, but not a source
    monkeypatch.syspath_prepend(str(tmp_path / "mine"))
    cfg = _config(tmp_path, "rewards=[{name: shapes}, {name: 'dotlink:score'}]")
    with pytest.raises(ConfigError, match=re.escape(f"{package / 'settings.py'} is a link to {package / '.env'}, "
                                                    "which is not a Python source")):
        gather(cfg)


def test_a_credential_in_a_rewards_kwargs_is_never_uploaded(tmp_path, capsys):
    argv = ["submit", SHAPES, f"run.dir={tmp_path / 'run'}", "--dry-run",
            "rewards=[{name: shapes}, {name: vlm_judge, kwargs: {base_url: 'http://127.0.0.1:9', api_key: sk-1}}]"]
    err = refused(main, argv, capsys, "rewards.1.kwargs.api_key: a submitted job would upload this credential")
    assert "sk-1" not in err
