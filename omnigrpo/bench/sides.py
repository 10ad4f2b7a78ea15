"""Each side of the omnigrpo-vs-TRL comparison in a fresh process, under the environment a user would give it.

Why: a side run inside the benchmark's own process would inherit what the ``omnigrpo`` command set for itself
before torch loaded (``OMP_WAIT_POLICY=PASSIVE``, read once by libgomp) and whatever earlier Ray sessions left
behind. So omnigrpo's side is the user's own command, ``python -m omnigrpo.cli train CONFIG``, and TRL's runs
:func:`omnigrpo.bench.protocol.trl_record` under :data:`~omnigrpo.config.runtime.USER_ENV` (plus the current
``PYTHONPATH``, where plugins are found). Before each run the machine must settle: no process of the previous run
left, the CPU idle; both are recorded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from omnigrpo.config.runtime import USER_ENV

SHOWN = ("OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_", "RAY_", "MLFLOW_", "DS_", "TORCH_", "OMNIGRPO_")
"""Variables the report shows for each side: those that tune threads or that omnigrpo sets for itself."""
IDLE_PERCENT = 20.0
"""The CPU counts as idle below this share busy (all cores, over one second)."""


def user_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a user's shell gives a program: :data:`USER_ENV`, the current ``PYTHONPATH``, ``extra``."""
    env = dict(USER_ENV)
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return {**env, **(extra or {})}


def shown(env: dict[str, str]) -> dict[str, str]:
    """The thread-tuning and omnigrpo-set variables of ``env`` (a token's value never)."""
    return {k: "<set>" if "TOKEN" in k else v for k, v in sorted(env.items()) if k.startswith(SHOWN)}


def settle(tag: str, timeout_s: float) -> dict:
    """Wait up to ``timeout_s`` until no process whose command line holds ``tag`` runs and the CPU is idle;
    returns what was found when the wait ended (a run then starts either way, and the report says so)."""
    start = time.monotonic()
    while True:
        left = [p.pid for p in psutil.process_iter(["cmdline"]) if tag in " ".join(p.info["cmdline"] or [])]
        busy = psutil.cpu_percent(interval=1.0)
        waited = time.monotonic() - start
        if (not left and busy < IDLE_PERCENT) or waited >= timeout_s:
            return {"leftover_processes": len(left), "cpu_busy_percent": busy, "waited_s": round(waited, 1),
                    "settled": not left and busy < IDLE_PERCENT}


def run_process(argv: list[str], env: dict[str, str], log: Path, timeout_s: float = 3600.0) -> str:
    """Run ``argv`` in a session of its own; its output goes to ``log`` and is returned. Raises naming the log
    when it fails; a process of its session still running afterwards is ended."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
        finally:
            try:
                os.killpg(proc.pid, 9)  # whatever the run left in its session (its own children are gone)
            except ProcessLookupError:
                pass
    text = log.read_text(errors="replace")
    if code:
        raise RuntimeError(f"{' '.join(argv[:4])} ... exited {code}; its output: {log}\n{text[-2000:]}")
    return text


def omnigrpo_side(config: Path, log: Path, settle_s: float) -> dict:
    """One ``omnigrpo train CONFIG`` in a fresh process with the user's environment (the command sets its own
    on top, as it does for a user); returns its MLflow run id, environment and the settling before it."""
    tmp = tempfile.mkdtemp(prefix="ogb-")  # Ray's folder for this run: its processes are found by this path
    env = user_env({"TMPDIR": tmp})
    before = settle("ogb-", settle_s)
    try:
        text = run_process([sys.executable, "-m", "omnigrpo.cli", "train", str(config)], env, log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    found = re.search(r"MLflow run (\w+)", text)
    if not found:
        raise RuntimeError(f"the omnigrpo run printed no MLflow run id; its output: {log}")
    return {"run_id": found.group(1), "env": shown(env), "before": before}


def trl_side(config: Path, model_path: str, steps: int, out_dir: Path, settle_s: float,
             wait_policy: str = "") -> dict:
    """One TRL run in a fresh process under the user's environment (``wait_policy``: an ``OMP_WAIT_POLICY`` to
    set, to show what the setting alone does); returns its record with its environment and settling."""
    env = user_env({"OMP_WAIT_POLICY": wait_policy} if wait_policy else None)
    before = settle("ogb-", settle_s)
    argv = [sys.executable, "-m", "omnigrpo.bench.protocol", str(config), model_path, str(steps), str(out_dir)]
    run_process(argv, env, out_dir / "output.log")
    record = json.loads((out_dir / "record.json").read_text())
    return {**record, "env": shown(env), "before": before}
