# refinery — every target installs what it needs first (uv + the committed uv.lock).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON  ?= python3
UV_VERSION := 0.13.9
TOOLS   := .tools
UV      := $(TOOLS)/bin/uv
VENV    := .venv
RUN     := $(VENV)/bin/refinery
PY      := $(VENV)/bin/python

.PHONY: help install run-all materialize sources test schemas sample bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet uv==$(UV_VERSION)

$(VENV)/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --quiet
	@touch $@

install: $(VENV)/.synced ## create .venv from uv.lock (idempotent)

run-all: install ## run the pipeline on the bundled sample data in data/_kb/
	$(RUN) run-all

materialize: install ## raw source streams -> data/evidence/
	$(RUN) materialize

sources: install ## list the source streams in data/_kb/ and the transform that claims each
	$(RUN) sources

test: install ## the whole test suite (the acceptance gate included); pytest's "no tests" (exit 5) fails
	@$(PY) -m pytest -q; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

schemas: install ## regenerate schemas/*.json from the pydantic models
	$(RUN) schemas --write

sample: install ## regenerate the bundled sample sources in data/_kb/
	$(RUN) sample --rows 1500 --seed 7 --out data/_kb

bench: install ## materialize throughput and peak memory at 10^5 rows (BENCH_ROWS=1000000 for 10^6)
	$(PY) bench/bench_materialize.py --rows $${BENCH_ROWS:-100000}

clean: ## remove generated outputs (not the sample data)
	rm -rf data/evidence data/scored-runs exports reports distill_out bench/out
