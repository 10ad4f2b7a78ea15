"""``bench/gpu.py --tiny`` runs end to end on CPU and reports every measure, finite and positive.

The script is not a package module, so it is loaded from its path (this file lives at
``tests/bench/``, two levels below the repository root).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "bench" / "gpu.py"


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_tiny_benchmark_reports_every_measure(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    out = tmp_path / "x.json"
    module.main(["--tiny", "--repeats", "3", "--out", str(out)])
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
