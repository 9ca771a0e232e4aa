# make demo: create .venv, install edgeseq, export and run a small random-weight Mamba-2 (its text is noise)
# make test: create .venv, install the test extras (torch 2.13.0 CPU, transformers, pytest), run pytest
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.base: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.base
	$(BIN)/python examples/make_demo_model.py demo-model/checkpoint
	rm -rf demo-model/bundle
	$(BIN)/edgeseq export demo-model/checkpoint -o demo-model/bundle
	$(BIN)/edgeseq inspect demo-model/bundle
	$(BIN)/edgeseq run demo-model/bundle --prompt "The state of the art" --max-tokens 48 --seed 0

# optional engines and other-language tests; each stamp installs what its tests need (see README)
$(VENV)/.llamacpp: $(VENV)/.test
	touch $@

$(VENV)/.web: $(VENV)/.test
	touch $@

test: $(VENV)/.test $(VENV)/.llamacpp $(VENV)/.web
	$(BIN)/python -m pytest -q

.PHONY: demo test
