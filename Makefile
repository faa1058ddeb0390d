# Two entry points for a fresh machine: `make reproduce` and `make test`. Both create/reuse .venv themselves.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install reproduce test lint clean-cache

$(STAMP): pyproject.toml scripts/install_transfer.sh
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip>=23"
	$(BIN)/pip install -q -e ".[dev]"
	# mmcv (built once, then cached), mmseg, mmdet, detectron2 for the transfer stages: ~16 min the first time
	scripts/install_transfer.sh $(VENV)
	touch $(STAMP)

install: $(STAMP)

## Every paper table at tiny scale on the embedded data, the claim rows first (pretraining -> evaluations, shared
## stages trained once),
## then tables/, plots/ and RESULTS.md.
reproduce: $(STAMP)
	$(BIN)/repro run claims --scale tiny --jobs 2
	$(BIN)/repro run all --scale tiny --jobs 2

## Run the test-suite (unit + small end-to-end) and ruff.
test: $(STAMP)
	$(BIN)/ruff check repro tests benchmarks
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check repro tests benchmarks
