# make demo: create .venv, install edgeseq, export the shipped demo RWKV-7 (byte-level, trained on the KJV Bible)
#   to an int8 ONNX bundle and a Q8_0 GGUF, generate from each on the CPU (tokens/s and peak RSS on stderr)
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
	rm -rf demo-model && mkdir -p demo-model
	$(BIN)/edgeseq export edgeseq/demo/rwkv7 -o demo-model/rwkv7-int8 --quant int8
	$(BIN)/edgeseq export edgeseq/demo/rwkv7 -o demo-model/rwkv7-q8_0.gguf --format gguf --quant q8_0
	$(BIN)/edgeseq inspect demo-model/rwkv7-int8
	$(BIN)/edgeseq run demo-model/rwkv7-int8 --prompt "And God said" --max-tokens 200 --seed 0
	$(BIN)/edgeseq run demo-model/rwkv7-q8_0.gguf --prompt "And God said" --max-tokens 200 --seed 0

# optional engines and other-language tests; each stamp installs what its tests need (see README)
# llama.cpp: llama-cpp-python built without -march=native (~4 min on 2 cores; pip's cache makes a rebuild
# fast), and llama.cpp's converter (convert_hf_to_gguf.py, conversion/, gguf-py/, the GPT-NeoX vocabulary)
# unpacked from the same sdist into .venv/llama.cpp for the GGUF comparison tests
LLAMACPP_VERSION := 0.3.36
$(VENV)/.llamacpp: $(VENV)/.test
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/pip install -q llama-cpp-python==$(LLAMACPP_VERSION)
	rm -rf $(VENV)/sdist $(VENV)/llama.cpp
	$(BIN)/pip download -q llama-cpp-python==$(LLAMACPP_VERSION) --no-deps --no-binary :all: -d $(VENV)/sdist
	$(BIN)/python -c "import sys, tarfile; p = 'llama_cpp_python-$(LLAMACPP_VERSION)/vendor/llama.cpp/'; \
	t = tarfile.open(sys.argv[1]); keep = [p + 'convert_hf_to_gguf.py', p + 'conversion/', p + 'gguf-py/', \
	p + 'models/ggml-vocab-gpt-neox.gguf']; \
	ms = [m for m in t.getmembers() if m.name.startswith(tuple(keep))]; \
	[setattr(m, 'name', m.name[len(p):]) for m in ms]; t.extractall(sys.argv[2], members=ms, filter='data')" \
	  $(VENV)/sdist/llama_cpp_python-$(LLAMACPP_VERSION).tar.gz $(VENV)/llama.cpp
	touch $@

# Node and browser tests: the npm packages pinned in examples/package-lock.json into examples/node_modules
# (ONNXRUNTIME_NODE_INSTALL=skip: onnxruntime-node's install script would fetch CUDA libraries from NuGet),
# and Debian's chromium when missing and running as root; without npm or chromium those tests skip
$(VENV)/.web: $(VENV)/.test examples/package-lock.json
	@if command -v npm >/dev/null; then \
	  cd examples && ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund --loglevel=error; \
	else echo "npm not found: the Node and browser tests will skip"; fi
	@if ! command -v chromium >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null) \
	  || echo "chromium not installed: the browser test will skip"; fi
	touch $@

test: $(VENV)/.test $(VENV)/.llamacpp $(VENV)/.web
	$(BIN)/python -m pytest -q

.PHONY: demo test
