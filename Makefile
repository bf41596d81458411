# Quick start (README):  make demo   |   make test
# Both create/reuse the virtual environment (DETQ_VENV, default ~/.cache/detq-hooks/venv) and install
# what they need: torch==2.14.1/torchvision==0.29.1, detq-hooks with its extras, and for the tests
# MMDetection with a compiled mmcv (built once into ~/.cache/detq-hooks/wheels, then reused).
SHELL := /bin/bash
VENV ?= $(or $(DETQ_VENV),$(HOME)/.cache/detq-hooks/venv)
export DETQ_VENV := $(VENV)
export YOLO_OFFLINE := 1
export YOLO_AUTOINSTALL := false
export PYTHONUNBUFFERED := 1
PYTEST_ARGS ?= --timeout=1200 --durations=15

.PHONY: demo test env env-mmdet bench bench-quick

env:
	bash scripts/setup_env.sh >/dev/null

env-mmdet:
	bash scripts/setup_env.sh --mmdet >/dev/null

demo: env
	$(VENV)/bin/detq demo $(DEMO_ARGS)

test: env-mmdet
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) tests

bench: env
	$(VENV)/bin/python benchmarks/bench_fakequant_overhead.py

# every question of benchmarks/run.py at --quick sizes (a smoke run, a few minutes), then `report` into a copy of
# the README beside those results (the real README is only rewritten by `run.py report` on measured results)
QUICK_RESULTS := benchmarks/results/suite-quick
bench-quick: env
	for q in accuracy cost deploy peers; do $(VENV)/bin/python benchmarks/run.py $$q --quick || exit 1; done
	cp README.md $(QUICK_RESULTS)/README.md
	$(VENV)/bin/python benchmarks/run.py report --quick --readme $(QUICK_RESULTS)/README.md
