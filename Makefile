# Set-up and entry points. Everything installs into .venv from the package registries; torch is
# pinned through constraints.txt so no other (multi-GB) build is ever pulled in. uv installs (about 8x faster
# than pip here); it reads no pip configuration, so the local package indexes pip is configured with (a mirror of
# the large wheels on some machines) are handed to it, those that exist. Bytecode is compiled at install: uv does
# not do it by default, and where PYTHONDONTWRITEBYTECODE is set (CI here) every process, every Ray worker
# included, would otherwise compile torch, transformers and Ray from source at each start (the suite ran 2.4x slower).
PY      := .venv/bin/python
INDEXES := $(shell python3 -c "import os, subprocess; urls = subprocess.run(['python3', '-m', 'pip', 'config', \
             'get', 'global.extra-index-url'], capture_output=True, text=True).stdout.split(); print(' '.join( \
             '--extra-index-url ' + u for u in urls if not u.startswith('file://') or os.path.isdir(u[7:])))")
UV      := DS_BUILD_OPS=0 .venv/bin/uv pip install --quiet --compile-bytecode --python $(PY) -c constraints.txt \
             --index-strategy unsafe-best-match $(INDEXES)
STAMP   := .venv/.installed
# the suite on one pytest worker per core (at most 4), each with its own session Ray cluster (tests/conftest.py)
WORKERS := -n auto --maxprocesses 4 --dist loadgroup

.PHONY: demo glyphs bench test gpu-check gpu-wheels lint install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv .venv
	.venv/bin/pip install --quiet --disable-pip-version-check uv==0.13.9
	$(UV) torch==2.14.1 torchvision==0.29.1 -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	.venv/bin/omnigrpo train configs/shapes.yaml

glyphs: $(STAMP)
	.venv/bin/omnigrpo train configs/glyphs.yaml

bench: $(STAMP)
	.venv/bin/omnigrpo bench configs/shapes.yaml --steps 50 --out runs/bench/shapes.json

test: $(STAMP)
	.venv/bin/ruff check omnigrpo tests
	.venv/bin/lint-imports
	$(PY) -m pytest -q $(WORKERS) --durations=25

gpu-check: $(STAMP)  # on a CUDA machine: benchmark and tests marked gpu, in order (omnigrpo/bench/gpu_check.sh)
	PATH=$(CURDIR)/.venv/bin:$$PATH omnigrpo/bench/gpu_check.sh runs/gpu-check

gpu-wheels: $(STAMP)  # .whl/: what a GPU machine's image lacks for the check (omnigrpo/bench/gpu_wheels.sh)
	omnigrpo/bench/gpu_wheels.sh .venv/bin/pip

lint: $(STAMP)
	.venv/bin/ruff check omnigrpo tests
	.venv/bin/lint-imports

clean:
	rm -rf .venv runs .pytest_cache .ruff_cache
