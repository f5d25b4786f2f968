# aewatch developer entry points. The virtual environment lives in a cache folder shared by every
# checkout on this machine (torch is several GB); `.venv` in the checkout links to it.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON    ?= python3
CACHE_DIR ?= $(HOME)/.cache/aewatch
VENV      ?= $(CACHE_DIR)/venv
PY        := $(VENV)/bin/python
DEPS_HASH := $(shell cat pyproject.toml | sha256sum | cut -c1-16)
DEPS_STAMP := $(VENV)/.aewatch-deps-$(DEPS_HASH)
KAFKA_HOME := deploy/kafka
KAFKA_STAMP := $(KAFKA_HOME)/.resolved
PYTEST_ARGS ?=
DEMO_ARGS ?=
BENCH_GPU_ARGS ?=
SKAB_DIR  ?= ../shared/datasets/skab
NAB_DIR   ?= ../shared/datasets/nab
NAB_SEEDS ?= 0
# Prometheus and promtool for the tests of the alerting rules and of a real scrape, built from
# the Go module proxy into the cache folder once (10 to 35 minutes on a cold Go module cache).
PROMETHEUS_VERSION ?= v0.316.0
PROMETHEUS_DIR ?= $(CACHE_DIR)/prometheus-$(PROMETHEUS_VERSION)
PROMETHEUS_BINS := $(PROMETHEUS_DIR)/prometheus $(PROMETHEUS_DIR)/promtool

.PHONY: help setup demo test test-faults lint format bench bench-gpu figures broker prometheus clean

help:
	@echo "make setup   create or reuse the cached virtual environment, install aewatch, resolve Kafka jars"
	@echo "make demo    the whole pipeline end to end on this machine (a few minutes)"
	@echo "make test    lint and run the whole test suite against a real Kafka broker and MLflow"
	@echo "make bench   run the benchmarks; results in results/ as JSON and Markdown"
	@echo "make figures redraw the README pictures of encode, reconstruct and sample in docs/"
	@echo "make broker  run a local Kafka broker in the foreground (Ctrl-C stops it)"
	@echo "make prometheus  build Prometheus and promtool for the tests (once, into $(PROMETHEUS_DIR))"

setup: $(DEPS_STAMP) $(KAFKA_STAMP)
	@# Point the editable install at this checkout (several clones may share one environment).
	@if [ "$$(cd / && $(PY) -c 'import pipeline, pathlib; print(pathlib.Path(pipeline.__file__).resolve().parents[1])' 2>/dev/null)" != "$(CURDIR)" ]; then \
		$(PY) -m pip install -q --no-deps --no-build-isolation -e . ; fi
	@# setuptools leaves build metadata in the tree; on sys.path it would shadow the installed one.
	@rm -rf aewatch.egg-info
	@ln -sfn $(VENV) .venv

$(DEPS_STAMP): pyproject.toml
	@mkdir -p $(CACHE_DIR)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools
	$(PY) -m pip install -q -e '.[test,bench,fast]'
	@rm -rf aewatch.egg-info
	@rm -f $(VENV)/.aewatch-deps-* && touch $@

$(KAFKA_STAMP): $(KAFKA_HOME)/pom.xml
	@command -v java >/dev/null || { echo "java (17+) is needed for the local Kafka broker"; exit 1; }
	@command -v mvn >/dev/null || { echo "mvn is needed to resolve the Kafka broker jars"; exit 1; }
	rm -rf $(KAFKA_HOME)/libs
	mvn -B -q -f $(KAFKA_HOME)/pom.xml dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory=$(CURDIR)/$(KAFKA_HOME)/libs
	@sha256sum < $(KAFKA_HOME)/pom.xml | cut -d' ' -f1 > $@

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check pipeline training tests benchmarks

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format pipeline training tests benchmarks

# Simulate a fleet, train two autoencoders, promote the better one, stream live readings through
# the worker and print alarms; starts (and stops) its own broker unless KAFKA_BOOTSTRAP_SERVERS is set.
demo: setup
	MLFLOW_DISABLE_TELEMETRY=true $(VENV)/bin/aewatch demo $(DEMO_ARGS)

# The test session starts (and stops) a Kafka broker and an mlflow server itself, unless
# KAFKA_BOOTSTRAP_SERVERS names a running broker.
test: setup lint prometheus
	@mkdir -p results
	AEWATCH_PROMETHEUS_DIR=$(PROMETHEUS_DIR) MLFLOW_DISABLE_TELEMETRY=true $(PY) -m pytest -m "not faults" --junitxml=results/junit.xml $(PYTEST_ARGS)

# Fault tests (about 10 minutes): ten SIGKILLs in 100k readings, a broker restart, batches slower
# than max.poll.interval.ms, a 5-minute soak (AEWATCH_SOAK_S) whose figures go to results/soak.json.
test-faults: setup
	@mkdir -p results
	MLFLOW_DISABLE_TELEMETRY=true $(PY) -m pytest -m faults --junitxml=results/junit-faults.xml $(PYTEST_ARGS)

# Benchmarks write results/<name>.json and results/<name>.md; SKAB (GPL-3.0) and NAB (MIT) are
# read in place. NAB_SEEDS="0 1 2" for medians over three seeds (about three times as long).
# Every benchmark runs; the exit status is non-zero if any missed its target.
bench: setup
	@status=0; \
	$(PY) -m benchmarks.bench_training --skab $(SKAB_DIR) --out results || status=1; \
	$(PY) -m benchmarks.bench_skab --skab $(SKAB_DIR) --out results || status=1; \
	$(PY) -m benchmarks.bench_nab --nab $(NAB_DIR) --seeds $(NAB_SEEDS) --out results || status=1; \
	$(PY) -m benchmarks.bench_fleet --skab $(SKAB_DIR) --out results || status=1; \
	$(PY) -m benchmarks.bench_demo --out results || status=1; \
	$(PY) -m benchmarks.bench_worker --out results || status=1; \
	$(PY) -m benchmarks.bench_clients --out results || status=1; \
	$(PY) -m benchmarks.bench_scaleout --out results || status=1; \
	$(PY) -m benchmarks.bench_distributed --out results || status=1; \
	nice -n 5 $(PY) -m benchmarks.bench_drift --out results || status=1; \
	$(PY) -m benchmarks.bench_images --out results || status=1; \
	exit $$status

# On a CUDA machine: model-only and end-to-end scoring windows/s per batch size, training speed.
bench-gpu: setup
	$(PY) -m benchmarks.bench_gpu --out results $(BENCH_GPU_ARGS)

# The pictures of the README section "Other uses of a trained model", drawn from what
# `aewatch encode`, `reconstruct` and `sample` write (a minute or two on a CPU).
figures: setup
	MLFLOW_DISABLE_TELEMETRY=true $(PY) docs/make_use_figures.py --out docs

broker: setup
	$(VENV)/bin/aewatch broker

prometheus: $(PROMETHEUS_BINS)

$(PROMETHEUS_DIR)/%:
	@command -v go >/dev/null || { echo "go (1.24+) is needed to build $* $(PROMETHEUS_VERSION)"; exit 1; }
	@mkdir -p $(PROMETHEUS_DIR)
	GOBIN=$(PROMETHEUS_DIR) go install github.com/prometheus/prometheus/cmd/$*@$(PROMETHEUS_VERSION)

clean:
	rm -rf .pytest_cache .ruff_cache results build aewatch-demo *.egg-info $(KAFKA_HOME)/libs $(KAFKA_STAMP)
