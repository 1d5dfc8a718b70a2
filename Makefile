# The two commands of the README: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
MEDZONE := $(VENV)/bin/medzone
export MEDZONE_HOME ?= $(CURDIR)/.medzone
DEMO_DIR ?= $(CURDIR)/demo-data
DEMO_PATIENTS ?= 20
PYTEST_ARGS ?=

.PHONY: install demo test bench notebooks clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml .ci/install
	bash .ci/install
	@touch $@

# Sets the zone up, then runs the hub in the foreground (Ctrl-C stops it; servers keep running).
demo: install
	bash .ci/demo
	$(MEDZONE) hub

# The store tests also run against a real PostgreSQL: .ci/postgres starts the local
# cluster and prints the URL the tests use. The slurm executor's tests run against a real
# one-node Slurm cluster: .ci/slurm starts it (SLURM_CONF) and stops it afterwards. The PACS
# import's tests run against a real Orthanc: .ci/orthanc starts it (MEDZONE_TEST_ORTHANC_*).
test: install
	@set -euo pipefail; pg_url=$$(bash .ci/postgres); export "$$pg_url"; \
	slurm_conf=$$(bash .ci/slurm); export "$$slurm_conf"; \
	trap 'bash .ci/slurm stop; bash .ci/orthanc stop' EXIT; \
	orthanc_env=$$(bash .ci/orthanc); export $$orthanc_env; \
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

bench: install
	$(PY) -m benchmarks

# Writes each template's, tutorial's and test probe's .ipynb from the percent-format .py it is
# paired with (the pairing is in each folder's jupytext.toml).
notebooks: install
	$(VENV)/bin/jupytext --sync $(filter-out %/__init__.py,$(wildcard templates/*.py notebooks/*.py)) \
		tests/runner_probe.py

clean-demo:
	rm -rf "$(DEMO_DIR)"
	chmod -R u+w "$(MEDZONE_HOME)" 2>/dev/null || true
	rm -rf "$(MEDZONE_HOME)"
