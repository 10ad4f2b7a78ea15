# Set-up and entry points. Everything installs into .venv from the package registries; torch is
# pinned through constraints.txt so no other (multi-GB) build is ever pulled in.
PY      := .venv/bin/python
PIP     := DS_BUILD_OPS=0 .venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt
STAMP   := .venv/.installed

.PHONY: demo glyphs bench test gpu-check gpu-wheels lint install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PIP) torch==2.14.1 torchvision==0.29.1
	$(PIP) -e '.[test]'
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
	$(PY) -m pytest -q --durations=10

gpu-check: $(STAMP)  # on a CUDA machine: benchmark and tests marked gpu, in order (omnigrpo/bench/gpu_check.sh)
	PATH=$(CURDIR)/.venv/bin:$$PATH omnigrpo/bench/gpu_check.sh runs/gpu-check

gpu-wheels: $(STAMP)  # .whl/: what a GPU machine's image lacks for the check (omnigrpo/bench/gpu_wheels.sh)
	omnigrpo/bench/gpu_wheels.sh .venv/bin/pip

lint: $(STAMP)
	.venv/bin/ruff check omnigrpo tests
	.venv/bin/lint-imports

clean:
	rm -rf .venv runs .pytest_cache .ruff_cache
