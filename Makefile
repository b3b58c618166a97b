# Two commands: `make demo` runs a cluster, `make test` checks everything.
# Both create .venv and install the project into it on first use.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
DEMO_STAMP = $(VENV)/.installed-demo

.PHONY: demo test test-openvino check unit integration fuzz bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The demo needs the package and the runtime of its digits model (.tflite): mqinfer[litert].
$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[litert]'
	touch $(DEMO_STAMP)

# Tests and checks: every runtime (mqinfer[all]) and the tools, through mqinfer[dev].
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/mqinfer demo

check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

integration: $(STAMP)
	$(BIN)/python -m pytest tests/integration

test: check
	$(BIN)/python -m pytest
	$(MAKE) test-openvino

# OpenVINO's outputs are close to LiteRT's and ONNX Runtime's but not equal bit for bit,
# while the suite compares served outputs bit for bit with theirs: its tests run in an
# environment of their own, with mqinfer[dev,openvino], where they must not be skipped.
OV_VENV  = .venv-openvino
OV_STAMP = $(OV_VENV)/.installed

$(OV_STAMP): pyproject.toml
	$(PYTHON) -m venv $(OV_VENV)
	$(OV_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(OV_VENV)/bin/python -m pip install --quiet -e '.[dev,openvino]'
	touch $(OV_STAMP)

test-openvino: $(OV_STAMP)
	MQINFER_REQUIRE_OPENVINO=1 $(OV_VENV)/bin/python -m pytest tests/integration/test_openvino.py tests/unit/test_runtimes.py

# 10,000 seeded hostile messages against a real cluster (the suite sends 2,000);
# MQINFER_FUZZ_SEED=N for another sequence.
fuzz: $(STAMP)
	MQINFER_FUZZ_COUNT=10000 $(BIN)/python -m pytest -s tests/integration/test_fuzz.py

# Benchmarks: each against its baseline in the same run; figures go to bench/RESULTS.md.
# bench/setup.sh (root) installs what pip cannot: HAProxy, Mosquitto, iproute2.
BENCH_STAMP = $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	sh bench/setup.sh
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) $(OV_VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
