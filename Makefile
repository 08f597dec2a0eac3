# `make sweep` and `make test` do all the set-up on a fresh machine: a virtual environment from
# requirements.txt (+ requirements-export.txt: onnx, onnxruntime, so the export tests run).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/.installed: requirements.txt requirements-export.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt -r requirements-export.txt
	touch $@

.PHONY: venv sweep test test-fast lint train
venv: $(BIN)/.installed

sweep: venv            ## the smoke sweep on the embedded digits set, with its report
	$(BIN)/python sweep.py $(ARGS)

train: venv            ## one trial without Ray
	$(BIN)/python -m lsq.train $(ARGS)

lint: venv             ## ruff: lint and formatting
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint             ## everything, as CI runs it: lint, unit tests, end-to-end runs of a real local Ray
	$(BIN)/python -m pytest -q $(ARGS)

test-fast: venv        ## unit tests only (no Ray, no torch.compile)
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)
