#!/usr/bin/env bash
# The GPU check: one CUDA machine, under 6 minutes, ordered so that a run cut off early keeps the numbers that
# matter most. Each step has its own time limit (then SIGTERM, and SIGKILL 10 s later) and writes its figures:
#
#   (a) decode.json      1B decode step: eager, static, CUDA graphs, HF batched CFG; kernels/step; both floors
#   (b) graphs.xml       the CUDA-graph equality tests (bitwise against the same loop run eagerly)
#   (c) rollout.json     a full 16-image rollout, graphed vs HF generate; capture time and memory; bf16 log-prob gap
#   (d) tests.xml        the remaining tests marked gpu (hybrid sampling memory, GRPO on the device, NCCL, ...)
#   (e) learner.json     learner forward+backward MFU
#
# plus summary.txt (the machine, each step's exit status and time) and logs.txt (every step's output, in order):
# seven files, within the eight a device call brings back.
#
#   omnigrpo/bench/gpu_check.sh [--tiny] [OUT_DIR]      (from the repository root; OUT_DIR defaults to $OUT or
#                                                        gpu-check/)
#
# It needs python3 with torch, transformers, numpy and pytest. The packages the tests import that a GPU image
# lacks (pydantic, DeepSpeed, diffusers, rapidfuzz and small dependencies) travel as wheels in .whl/, built by
# `make gpu-wheels`; missing ones are installed from there into a private folder (the machine's own packages stay
# untouched), and the check refuses to start when one is missing and .whl/ cannot supply it. Ray and MLflow are
# not needed: the tests drive the plain worker classes. --tiny rehearses every step on the CPU in about a minute
# (a toy benchmark model, the gpu tests run on the CPU, a few of them). GPU_CHECK_STEPS names the steps to run
# (default: all five), GPU_TEST_ARGS replaces the tests step's selection, split as a shell would (e.g.
# "-k 'hybrid or nccl'").
set -uo pipefail
tiny=0
if [ "${1:-}" = "--tiny" ]; then tiny=1; shift; fi
out=${1:-${OUT:-gpu-check}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}

missing=$($py - <<'EOF'
import importlib.util
needed = {"pydantic": "pydantic", "pydantic-core": "pydantic_core", "annotated-types": "annotated_types",
          "typing-inspection": "typing_inspection", "deepspeed": "deepspeed", "hjson": "hjson", "msgpack": "msgpack",
          "ninja": "ninja", "py-cpuinfo": "cpuinfo", "einops": "einops", "psutil": "psutil", "diffusers": "diffusers",
          "importlib-metadata": "importlib_metadata", "zipp": "zipp", "rapidfuzz": "rapidfuzz"}
print(" ".join(dist for dist, module in needed.items() if importlib.util.find_spec(module) is None))
EOF
)
if [ -n "$missing" ]; then
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "omnigrpo: the GPU check needs $missing; build their wheels first with 'make gpu-wheels' (.whl/)" >&2
    exit 2
  fi
  site=$(mktemp -d /tmp/omnigrpo-site.XXXX)
  # shellcheck disable=SC2086
  $py -m pip install -q --root-user-action=ignore --no-index --no-deps --no-compile --no-cache-dir --find-links .whl --target "$site" \
    $missing || { echo "omnigrpo: installing $missing from .whl/ failed (rebuild with 'make gpu-wheels')" >&2; exit 2; }
  export PYTHONPATH="$PYTHONPATH:$site"
fi

if [ $tiny = 1 ]; then
  bench=(--tiny --repeats 1)
  rollout=(--tiny --repeats 1)
  tests=(-k "log_probs or nccl")  # the CPU rehearsal: a few tests stand for the rest
  export OMNIGRPO_TEST_DEVICE=cpu
  limits=(90 120 60 90 60)
else
  bench=(--repeats 3)
  rollout=(--repeats 1)  # one timed 16-image rollout per side after its first (cold) one: HF takes ~65 s in all
  tests=(-k "not graph or hybrid")
  limits=(70 50 100 100 40)
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  $py -c 'import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__)'
} 2>&1 | tee "$out/summary.txt"

if [ -n "${GPU_TEST_ARGS:-}" ]; then  # quoted words stay whole: -k 'a or b' is one selection, not file names
  mapfile -t tests < <($py -c 'import shlex, sys; print("\n".join(shlex.split(sys.argv[1])))' "$GPU_TEST_ARGS")
fi
status=0
: >"$out/logs.txt"
step() {  # step NAME LIMIT COMMAND...: run under its own time limit, log into logs.txt, keep going on failure
  local name=$1 limit=$2 start=$SECONDS log
  shift 2
  [[ " ${GPU_CHECK_STEPS:-decode graphs rollout tests learner} " == *" $name "* ]] || return 0
  log=$(mktemp)
  timeout -k 10 "$limit" "$@" >"$log" 2>&1  # -k: a process that ignores SIGTERM cannot hang the check
  local rc=$?
  tail -25 "$log"
  { echo "===== $name"; cat "$log"; } >>"$out/logs.txt"
  rm -f "$log"
  echo "== $name: rc $rc in $((SECONDS - start)) s (limit $limit s)" | tee -a "$out/summary.txt"
  [ $rc = 0 ] || status=1
}
pytest=($py -m pytest tests/gpu -m gpu -p no:cacheprovider -o junit_family=xunit1 -rfEs -q)
step decode "${limits[0]}" $py -m omnigrpo.bench.gpu --parts decode "${bench[@]}" --out "$out/decode.json"
step graphs "${limits[1]}" "${pytest[@]}" -k "graph and not hybrid" --junitxml="$out/graphs.xml"
step rollout "${limits[2]}" $py -m omnigrpo.bench.gpu --parts rollout "${rollout[@]}" --out "$out/rollout.json"
step tests "${limits[3]}" "${pytest[@]}" "${tests[@]}" --junitxml="$out/tests.xml"
step learner "${limits[4]}" $py -m omnigrpo.bench.gpu --parts learner "${bench[@]}" --out "$out/learner.json"
exit $status
