"""``python -m omnigrpo.bench.gpu --tiny`` runs end to end on CPU and reports every measure, finite and positive,
in a process where pydantic, Ray, MLflow and DeepSpeed cannot be imported (a GPU machine may have none of them)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
ABSENT = ("pydantic", "ray", "mlflow", "deepspeed")


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def _without(packages: tuple[str, ...], where: Path) -> str:
    """A directory that, first on ``PYTHONPATH``, makes importing each of ``packages`` fail."""
    for name in packages:
        (where / name).mkdir(parents=True)
        (where / name / "__init__.py").write_text(f"raise ImportError('{name} is absent on this machine')\n")
    return str(where)


def test_tiny_benchmark_runs_without_the_platform_packages(tmp_path: Path) -> None:
    blocked = _without(ABSENT, tmp_path / "absent")
    probe = subprocess.run([sys.executable, "-c", "import pydantic"], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": blocked})
    assert probe.returncode != 0 and "absent on this machine" in probe.stderr  # the block itself works

    out = tmp_path / "x.json"
    proc = subprocess.run([sys.executable, "-m", "omnigrpo.bench.gpu", "--tiny", "--repeats", "3", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": f"{blocked}{os.pathsep}{ROOT}"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())

    rollout, decode, learner = result["rollout"], result["decode"], result["learner"]
    for side in ("ours", "hf_unbatched_cfg", "hf_batched_cfg"):
        assert _positive(rollout[side]["tokens_per_s"]), side
        assert _positive(rollout[side]["images_per_s"]), side
    ratio = rollout["ours"]["tokens_per_s"] / rollout["hf_unbatched_cfg"]["tokens_per_s"]
    assert _positive(rollout["ratio_ours_over_hf"]) and math.isclose(rollout["ratio_ours_over_hf"], ratio)
    assert _positive(rollout["ratio_ours_over_hf_batched"])
    for key in ("step_ms", "floor_ms", "efficiency", "copy_bandwidth_gb_s", "weight_bytes", "kv_bytes_mean"):
        assert _positive(decode[key]), key
    for key in ("tokens_per_s", "mfu", "achieved_tflops", "matmul_tflops", "flops_per_step"):
        assert _positive(learner[key]), key
    assert result["config"]["tiny"] and result["config"]["tokens_per_image"] == 64
    assert result["machine"]["device"] == "cpu" and result["machine"]["torch"]
