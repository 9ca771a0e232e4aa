# make demo: create .venv, install edgeseq, export the shipped demo RWKV-7 (byte-level, trained on the KJV Bible)
#   to an int8 ONNX bundle and a Q8_0 GGUF, generate from each on the CPU (tokens/s and peak RSS on stderr)
# make test: create .venv, install the test extras (torch 2.13.0 CPU, transformers, pytest, ...), run pytest
# make lock: resolve every dependency anew and rewrite constraints.txt (then run make test)
# make pi-check: the same on emulated aarch64 Linux (see below)
# Every install takes the exact versions in constraints.txt, made for Python 3.11 (the local CPU build of
# torch 2.13.0 exists for it alone: another Python would download gigabytes).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := constraints.txt

PY_VERSION := $(shell $(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
ifneq ($(PY_VERSION),3.11)
$(error $(PY) is Python '$(PY_VERSION)', but edgeseq's pinned installs ($(LOCK)) are made for Python 3.11: \
  run `make PY=python3.11 ...`)
endif

# pip reads PIP_CONSTRAINT for every install below, build environments included
export PIP_CONSTRAINT := $(CURDIR)/$(LOCK)
PIP := $(BIN)/python -m pip install -q

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) pip setuptools

# edgeseq and llama-cpp-python build with the pinned build backends in .venv (no isolated build environment)
$(VENV)/.base: $(BIN)/python pyproject.toml $(LOCK)
	$(PIP) --no-build-isolation -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) torch==2.13.0
	$(PIP) --no-build-isolation -e '.[test,serve]'
	touch $@

lock:
	$(PY) .ci/lock.py write

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
	$(PIP) scikit-build-core
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PIP) --no-build-isolation llama-cpp-python==$(LLAMACPP_VERSION)
	rm -rf $(VENV)/sdist $(VENV)/llama.cpp
	$(BIN)/python -m pip download -q llama-cpp-python==$(LLAMACPP_VERSION) --no-deps --no-binary :all: -d $(VENV)/sdist
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

# -P: the repository root stays off sys.path, so its top-level kernels/, runtime/, ... folders never
# shadow an installed package (transformers imports one called `kernels`); tests import edgeseq.* only
# pytest-xdist: TEST_WORKERS processes (one per core of CI's 2), each test file whole in one of them
# (--dist loadfile: a file's module fixtures are built once); TEST_WORKERS=0 runs the suite in one process
TEST_WORKERS ?= 2
test: $(VENV)/.test $(VENV)/.llamacpp $(VENV)/.web
	$(BIN)/python .ci/lock.py check
	$(BIN)/python -P -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# edgeseq on 64-bit Arm Linux (Debian arm64, Python 3.11) emulated with qemu-user: the demo, the runtime's
# tests, logits against x86, memory (docs/devices.md section 4; root, ~30+ minutes; not part of CI)
pi-check: $(VENV)/.test
	bash tests/pi/pi-check.sh

.PHONY: demo test lock pi-check
