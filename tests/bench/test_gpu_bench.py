"""The GPU check rehearsed on the CPU: ``gpu_check.sh --tiny`` runs every step in its order, each within its limit,
with Ray and MLflow unimportable (a GPU machine has neither), and reports finite figures; without the packages it
needs and without ``.whl/`` it refuses before running anything."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "omnigrpo" / "bench" / "gpu_check.sh"
STEPS = ["decode", "graphs", "rollout", "tests", "learner"]


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def _without(packages: tuple[str, ...], where: Path) -> str:
    """A directory that, first on ``PYTHONPATH``, makes importing each of ``packages`` fail."""
    for name in packages:
        (where / name).mkdir(parents=True)
        (where / name / "__init__.py").write_text(f"raise ImportError('{name} is absent on this machine')\n")
    return str(where)


def test_the_tiny_rehearsal_runs_every_step_in_order(tmp_path: Path) -> None:
    blocked = _without(("ray", "mlflow"), tmp_path / "absent")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": blocked, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT), "--tiny", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=420, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    steps = [line for line in (out / "summary.txt").read_text().splitlines() if line.startswith("== ")]
    assert [line.split(":")[0].removeprefix("== ") for line in steps] == STEPS
    assert all(": rc 0 in " in line for line in steps), steps
    assert len(list(out.iterdir())) <= 8  # what a device call brings back
    assert [line for line in (out / "logs.txt").read_text().splitlines() if line.startswith("===== ")] == \
        [f"===== {name}" for name in STEPS]

    decode = json.loads((out / "decode.json").read_text())["decode"]
    ours, hf = decode["sides"]["ours_static"], decode["sides"]["hf_batched_cfg"]
    assert ours["total"] < hf["total"] and ours["per_layer"] < hf["per_layer"]
    assert all(_positive(s["ms_per_step"]) for s in decode["sides"].values())
    assert _positive(decode["floor_context_ms"]) and decode["floor_span_ms"] >= decode["floor_context_ms"]
    assert decode["sdpa_backend"] in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH", "CUDNN_ATTENTION")
    rollout = json.loads((out / "rollout.json").read_text())["rollout"]
    assert _positive(rollout["ours"]["tokens_per_s"]) and _positive(rollout["hf_batched_cfg"]["tokens_per_s"])
    assert rollout["logprob_gap"]["mean"] < 1e-4  # fp32 on the CPU: the sampler is the learner's distribution
    assert _positive(json.loads((out / "learner.json").read_text())["learner"]["mfu"])
    for junit in ("graphs.xml", "tests.xml"):
        text = (out / junit).read_text()
        assert 'failures="0"' in text and 'errors="0"' in text and "<testcase" in text


def test_the_check_refuses_without_its_packages_or_wheels(tmp_path: Path) -> None:
    """A Python without site-packages lacks pydantic and DeepSpeed; with no .whl/ beside it the check stops with
    one line naming the fix, before any step runs."""
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), "--tiny", str(out)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHON": f"{sys.executable} -S", "PYTHONPATH": ""})
    assert proc.returncode == 2
    assert proc.stderr.startswith("omnigrpo: ") and "make gpu-wheels" in proc.stderr and "pydantic" in proc.stderr
    assert not (out / "summary.txt").exists()


def test_a_test_selection_reaches_pytest_whole_and_a_step_that_ignores_sigterm_is_killed(tmp_path: Path) -> None:
    """``GPU_TEST_ARGS="-k 'a or b'"`` is one ``-k`` expression (not the file names ``or`` and ``b'``), and a step
    past its limit that ignores SIGTERM is killed rather than hanging the check."""
    script = SCRIPT.read_text()
    start = script.index("status=0")
    end = script.index("pytest=(")
    step = script[start:end]
    assert "timeout -k 10 " in step  # the check's grace after SIGTERM; 1 s here, so the test waits 2 s, not 11
    harness = tmp_path / "harness.sh"
    harness.write_text("set -uo pipefail\nout=$1\npy=" + sys.executable + "\ntests=()\n"
                       'if [ -n "${GPU_TEST_ARGS:-}" ]; then\n'
                       + script[script.index("  mapfile"):script.index("fi\nstatus=0")] + "fi\n"
                       + step.replace("timeout -k 10 ", "timeout -k 1 ") + 'printf "%s\\n" "${tests[@]}" >"$out/args"\n'
                       "step slow 1 " + sys.executable + " -c 'import signal, time; "
                       "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'\n")
    proc = subprocess.run(["bash", str(harness), str(tmp_path)], capture_output=True, text=True, timeout=40,
                          env={**os.environ, "GPU_TEST_ARGS": "-k 'graph and not hybrid' -x",
                               "GPU_CHECK_STEPS": "slow"})
    assert (tmp_path / "args").read_text().splitlines() == ["-k", "graph and not hybrid", "-x"]
    assert "== slow: rc 137 in" in proc.stdout, proc.stdout + proc.stderr  # SIGKILL after -k's grace
