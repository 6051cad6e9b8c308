# Each target sets itself up: `make demo` and `make test` work on a fresh machine with Python >= 3.11 and pip.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Test processes (pytest-xdist, whole files per process): JAX compiles on one
# thread, so two processes keep both cores busy.
TEST_WORKERS ?= 2

.PHONY: demo test test-all bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# The tested versions of every package, without resolution and without the
# TensorFlow that neural-tangents declares but never needs (requirements.lock).
$(STAMP): $(PY) pyproject.toml requirements.lock
	$(PY) -m pip install --quiet --no-deps -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# The Table I protocol on the embedded CIFAR-10 subset (configs/demo.toml):
# every method against Retrain, one seed (SEEDS="0 1 2" for more); prints the
# tables and where they are. Rerunning resumes/reprints.
SEEDS ?=
demo: $(STAMP)
	$(VENV)/bin/fastntk experiment configs/demo.toml --out results/demo $(if $(SEEDS),--seeds $(SEEDS))

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=20

test-all: $(STAMP)
	$(PY) -m pytest -q -m '' -n $(TEST_WORKERS) --dist loadfile

bench: $(STAMP)
	$(PY) benchmarks/ntk_cost.py --quick

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
