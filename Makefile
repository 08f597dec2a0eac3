# `make sweep` and `make test` do all the set-up on a fresh machine: a virtual environment
# from requirements.txt (+ requirements-export.txt: onnx, onnxruntime, so the export tests run)
# is created the first time.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/.installed: requirements.txt requirements-export.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt -r requirements-export.txt
	touch $@

.PHONY: venv sweep test train
venv: $(BIN)/.installed

sweep: venv            ## the smoke sweep on the embedded digits set, with its report
	$(BIN)/python sweep.py $(ARGS)

train: venv            ## one trial without Ray
	$(BIN)/python -m lsq.train $(ARGS)

test: venv             ## the whole suite, slow end-to-end tests included
	$(BIN)/python -m pytest -q $(ARGS)
