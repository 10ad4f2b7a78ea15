#!/usr/bin/env bash
# The GPU check, on one CUDA machine in under 8 minutes: the tests marked `gpu`, then the GPU benchmark.
#
#   omnigrpo/bench/gpu_check.sh [OUT_DIR]        (from the repository root; OUT_DIR defaults to gpu-check/)
#
# It needs python3 with torch, transformers, numpy and pytest. Whatever else the tests import (pydantic,
# DeepSpeed, diffusers and their small dependencies) may sit as wheels in .whl/: they are installed into a
# private folder first, so the machine's own packages stay untouched. Ray and MLflow are not needed: the tests
# drive the plain worker classes. Results: gpu-tests.xml (junit, with the measured gaps as properties),
# gpu.json (the benchmark), and each step's log. GPU_BENCH_ARGS adds benchmark options (--tiny: a dry run on CPU),
# GPU_TEST_ARGS pytest options (-k NAME: some tests only).
set -uo pipefail
out=${1:-${OUT:-gpu-check}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import pydantic, deepspeed, diffusers, rapidfuzz" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/omnigrpo-site .whl/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/omnigrpo-site"
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c 'import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__)'
} 2>&1 | tee "$out/machine.txt"
status=0
start=$SECONDS
timeout 270 python3 -m pytest tests/gpu -m gpu ${GPU_TEST_ARGS:-} -p no:cacheprovider -o junit_family=xunit1 -rA \
  --junitxml="$out/gpu-tests.xml" 2>&1 | tee "$out/gpu-tests.log" | tail -40 || status=1
echo "gpu tests: $((SECONDS - start)) s"
start=$SECONDS
timeout 300 python3 -m omnigrpo.bench.gpu --repeats 1 ${GPU_BENCH_ARGS:-} --out "$out/gpu.json" 2>&1 | tee "$out/gpu-bench.log" \
  || status=1
echo "gpu benchmark: $((SECONDS - start)) s"
exit $status
