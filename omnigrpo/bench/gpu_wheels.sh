#!/usr/bin/env bash
# Wheels for the GPU check (`make gpu-wheels`): the packages the `gpu` tests import that a GPU machine's image
# lacks, at the versions this checkout's .venv holds, for that machine's Python (3.12) and for this one's (the
# check's --tiny rehearsal installs them here too). Pure-Python packages come once; DeepSpeed is built here
# from its source distribution with no compiled ops. Everything lands in .whl/ (git-ignored), under 64 MiB.
#
#   omnigrpo/bench/gpu_wheels.sh [PIP]        (PIP defaults to .venv/bin/pip)
set -euo pipefail
pip=${1:-.venv/bin/pip}
packages="pydantic pydantic-core annotated-types typing-inspection typing-extensions deepspeed hjson msgpack ninja
  py-cpuinfo einops psutil diffusers importlib-metadata zipp rapidfuzz"
rm -rf .whl && mkdir -p .whl
pins=$("$pip" freeze --all | tr 'A-Z_' 'a-z-')
here=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
for name in $packages; do
  pin=$(grep -E "^${name}==" <<<"$pins" || true)
  [ -n "$pin" ] || { echo "omnigrpo: $name is not installed in the venv (run make install first)" >&2; exit 2; }
  if [ "$name" = deepspeed ]; then
    DS_BUILD_OPS=0 "$pip" wheel -q --no-deps --no-build-isolation -w .whl "$pin"
    continue
  fi
  for py in 3.12 "$here"; do
    "$pip" download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
      --platform linux_x86_64 --abi "cp${py/./}" --abi abi3 --abi none -d .whl "$pin"
  done
done
du -sh .whl && ls .whl
