"""Bad command-line options on every command: a count, a port, a number or a timeout out of range, and a path that
would be written over. Each ends in one ``omnigrpo:`` line naming the flag, exit status 2, nothing written."""

from __future__ import annotations

import argparse
import functools
import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import refused

from omnigrpo.cli import main

SHAPES = str(Path(__file__).parents[2] / "configs" / "shapes.yaml")
_refused = functools.partial(refused, main)

CASES = [
    (["eval", SHAPES, "--checkpoint", "x", "--samples", "-1"], "--samples: must be at least 0, got -1"),
    (["bench", SHAPES, "--steps", "0"], "--steps: must be at least 1"),
    (["bench", SHAPES, "--rounds", "two"], "--rounds: 'two' is not a whole number"),
    (["bench", SHAPES, "--repeats", "0"], "--repeats: must be at least 1"),
    (["plan", SHAPES, "--prompt-tokens", "0"], "--prompt-tokens: must be at least 1"),
    (["tiny", "janus", "DIR", "--seed", "-1"], "--seed: must be at least 0"),
    (["serve-reward", "shapes", "--port", "70000"], "--port: a port is 0 to 65535, got 70000"),
    (["serve-reward", "shapes", "--port", "-1"], "--port: must be at least 0"),
    (["serve-reward", "shapes", "--max-wait-ms", "nan"], "--max-wait-ms: must be a finite number"),
    (["serve-reward", "shapes", "--max-wait-ms", "-1"], "--max-wait-ms: must be at least 0"),
    (["serve-reward", "shapes", "--replicas", "0"], "--replicas: must be at least 1"),
    (["serve-reward", "shapes", "--max-batch", "0"], "--max-batch: must be at least 1"),
    (["serve-reward", "shapes", "--max-body-mb", "0"], "--max-body-mb: must be at least 1"),
    (["serve-reward", "shapes", "--max-pixels", "0"], "--max-pixels: must be at least 1"),
    (["serve-reward", "shapes", "--memory-mb", "-5"], "--memory-mb: must be at least 1"),
    (["serve-reward", "shapes", "--max-pending", "0"], "--max-pending: must be at least 1"),
    (["serve-reward", "shapes", "--request-timeout-s", "0"], "--request-timeout-s: must be more than 0"),
    (["serve-reward", "shapes", "--request-timeout-s", "inf"], "--request-timeout-s: must be a finite number"),
    (["serve-reward", "shapes", "--max-images", "0"], "--max-images: must be at least 1"),
    (["serve-reward", "shapes", "--header-timeout-s", "0"], "--header-timeout-s: must be more than 0"),
    (["serve-reward", "shapes", "--body-timeout-s", "nan"], "--body-timeout-s: must be a finite number"),
    (["serve-reward", "shapes", "--max-connections", "0"], "--max-connections: must be at least 1"),
    (["serve-reward", "shapes", "--max-connections-per-client", "-2"],
     "--max-connections-per-client: must be at least 1"),
    (["serve-reward", "shapes", "--allowed-host", "http://x/"], "--allowed-host: 'http://x/' is not a Host header"),
    (["submit", SHAPES, "--timeout", "0"], "--timeout: must be more than 0"),
    *[([command, "job", "--timeout", "nan"], "--timeout: must be a finite number") for command in
      ("status", "logs", "stop")],
    (["eval", SHAPES, "--checkpoint", "/nonexistent"], "--checkpoint: '/nonexistent' is not a directory"),
    (["eval", SHAPES, "--checkpoint", ".", "--benchmark", "bogus"], "--benchmark: invalid choice: 'bogus'"),
    (["eval", SHAPES, "--checkpoint", ".", "--limit", "-1"], "--limit: must be at least 0, got -1"),
    (["eval", SHAPES, "--checkpoint", ".", "--held-out"], "--held-out: only with --benchmark"),
    (["eval", SHAPES, "--benchmark", "geneval"], "--checkpoint: required when model.path is empty"),
    (["eval", SHAPES, "--checkpoint", ".", "--prompts", "/nonexistent.txt"], "--prompts: '/nonexistent.txt'"),
    (["bench", SHAPES, "--parts", "bogus"], "--parts: unknown part(s) bogus; choose from"),
    (["bench", SHAPES, "--modes", "bogus"], "--modes: unknown mode(s) bogus; choose from"),
    (["bench", SHAPES, "--parts", "rollout", "--out", "."], "--out .: is a directory"),
    (["curves", SHAPES, "--out", "c.png", "--keys", " , "], "--keys: ' , ' names no metric"),
    (["curves", SHAPES, "--out", "c.png", "--run-id", "zzz"], "no MLflow store"),
    (["curves", SHAPES, "--out", "."], "--out"),
    (["submit", SHAPES, "run.dir=/tmp/omnigrpo-never", "--address", "ftp://x", "--job-id", "j", "--timeout", "2"],
     "at ftp://x"),
    # a dry run checks what a submission checks: a bad config is refused the same way, and nothing is sent
    (["submit", SHAPES, "run.dir=/tmp/omnigrpo-never", "--dry-run", "data.prompts=missing.txt"],
     "data.prompts: 'missing.txt' is neither a built-in world"),
    (["status", "job", "--address", "ftp://x"], "job 'job' at ftp://x"),
    (["logs", "job", "--address", "ftp://x", "--follow"], "job 'job' at ftp://x"),
    (["stop", "job", "--address", "ftp://x"], "job 'job' at ftp://x"),
    (["tiny", "bogus", "DIR"], "no tiny builder for family 'bogus'"),
    (["serve-reward", "bogus"], "serve-reward.name: unknown reward 'bogus'"),
    (["serve-reward", "shapes", "noequals"], "reward argument 'noequals' is not key=value"),
    (["serve-reward", "shapes", "--host", "192.0.2.1"], "--host: refusing to serve on 192.0.2.1"),
    (["train", SHAPES, "--check", "--resume", "trainer.lr=-1"], "trainer.lr"),
    (["sft", SHAPES, "--force", "model.hidden_size=0"], "model.hidden_size"),
    (["plan", SHAPES, "--json", "rollout.group_size=0"], "rollout.group_size"),
]

# options that are switches (nothing to get wrong) or positionals covered by test_bad_input.py's config cases
SWITCHES = {"--help", "--check", "--force", "--resume", "--json", "--follow", "--version"}
# bad values that need a real checkpoint first, tried where one is built
ELSEWHERE = {("eval", "--out"): "tests/app/test_evaluator.py (an existing report, --force)"}


@pytest.mark.parametrize("argv, needle", CASES, ids=[f"{a[0]} {' '.join(a[-2:])}" for a, _ in CASES])
def test_a_bad_option_names_its_flag(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _refused([a.replace("DIR", str(tmp_path / "t")) for a in argv], capsys, needle)
    assert not any(tmp_path.iterdir())  # nothing written


def test_every_option_of_every_command_has_a_bad_value_case():
    # a new option fails here until a case above shows what a bad value of it gets
    from omnigrpo.cli.parser import build_parser as _parser

    subparsers = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    tried = {(argv[0], word) for argv, _ in CASES for word in argv if word.startswith("--")}
    flags = {(name, max(action.option_strings, key=len)) for name, parser in subparsers.choices.items()
             for action in parser._actions if action.option_strings}
    missing = sorted(f"{name} {flag}" for name, flag in flags - tried - ELSEWHERE.keys() if flag not in SWITCHES)
    assert not missing


def test_tiny_refuses_a_directory_that_is_not_empty_unless_forced(tmp_path, capsys):
    target = tmp_path / "janus"
    target.mkdir()
    (target / "config.json").write_text('{"model_type": "emu3"}')
    _refused(["tiny", "janus", str(target)], capsys, f"{target}: not empty", "--force")
    assert (target / "config.json").read_text() == '{"model_type": "emu3"}'
    (tmp_path / "file").write_text("x")
    _refused(["tiny", "janus", str(tmp_path / "file")], capsys, "exists and is not a directory")
    assert main(["tiny", "janus", str(target), "--force"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {target}: ") and "config.json" in out and "model.safetensors" in out
    assert '"janus"' in (target / "config.json").read_text()


def test_curves_refuses_to_write_over_a_file_unless_forced(tmp_path, capsys):
    (tmp_path / "c.png").write_text("a figure")
    _refused(["curves", SHAPES, f"run.dir={tmp_path}", "--out", str(tmp_path / "c.png")], capsys,
             "--out", "c.png: exists; refusing to write over it (add --force)")
    _refused(["curves", SHAPES, f"run.dir={tmp_path}", "--out", str(tmp_path)], capsys, "is a directory")
    # forced, it goes on to the store (empty here), which is what refuses now
    _refused(["curves", SHAPES, f"run.dir={tmp_path}", "--out", str(tmp_path / "c.png"), "--force"], capsys,
             "no MLflow store")
    assert (tmp_path / "c.png").read_text() == "a figure"


@pytest.mark.parametrize("argv", [["status", "job"], ["logs", "job"], ["stop", "job"],
                                  ["submit", SHAPES, "run.dir=/tmp/omnigrpo-never"]])
def test_a_jobs_api_that_never_answers_is_named_within_the_timeout(argv, capsys):
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # accepts connections, never answers
        address = f"http://127.0.0.1:{silent.getsockname()[1]}"
        stop = threading.Event()
        threading.Thread(target=lambda: stop.wait(30), daemon=True).start()
        start = time.monotonic()
        _refused([*argv, "--address", address, "--timeout", "1"], capsys, address, "did not answer within 1 s")
        stop.set()
    assert time.monotonic() - start < 20
