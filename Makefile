# The README's commands. Each target sets up .venv on first use (pinned by constraints.txt).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.faultkit-installed
# Two pytest workers: most tests wait on servers and timeouts, not on the CPU.
TEST_WORKERS ?= 2

.PHONY: setup demo test bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24"
	# torch first and exactly: a looser spec would pull a multi-GB CUDA build.
	$(PIP) install -q -c constraints.txt "torch==2.13.0"
	$(PIP) install -q -c constraints.txt -e ".[all,dev]"
	bash .ci/ensure-postgres.sh
	touch $@

demo: setup
	$(VENV)/bin/faultkit demo --out demo-out

test: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup

bench: setup
	$(PY) -m bench

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) demo-out .pytest_cache
