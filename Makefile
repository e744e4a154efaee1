# labkit: two commands do everything (README, "Quick start").
#
#   make lab     install into .venv (once) and open JupyterLab at notebooks/00_start.ipynb
#   make test    install into .venv (once) and run the whole test suite (what CI runs)
#
#   make lab HEADLESS=1 [PORT=N]   no browser: start on 127.0.0.1 and print the URL with its token
#                                  (the same as `make lab-headless`)
#   make test PYTEST_ARGS="-k balloon -x"   pass options to pytest
#   make test-fast                 everything but the live QEMU and real-browser tests
#   make test-live                 only the live QEMU tests (a real Linux guest under QEMU)
#   make regress [GRID="memory=2G seed=0,1"]   regression notebooks over a grid: out/regress/report.html
#   make binder-check              build binder/ as repo2docker would (no docker), run every notebook
#   make clean                     remove .venv and the caches
#
# The install step is skipped while pyproject.toml and binder/requirements.txt are unchanged (their
# hash is kept in .venv/.labkit-installed). Runtime versions are pinned by binder/requirements.txt,
# used here as pip constraints, so the venv, CI and Binder run the same versions.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.labkit-installed
LAB_SETTINGS := $(VENV)/share/jupyter/lab/settings
PYTEST_ARGS ?=
HEADLESS ?=
PORT ?=

.PHONY: help install lab lab-headless test test-fast test-live regress binder-check clean

help:
	@sed -n '3,12s/^# \{0,1\}//p' Makefile

install:
	@set -e; \
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  echo "labkit needs Python 3.11 or newer; '$(PYTHON)' is $$($(PYTHON) -V 2>&1 || echo missing)." \
	       "Run: make $(MAKECMDGOALS) PYTHON=python3.11" >&2; exit 1; }; \
	want=$$(cat pyproject.toml binder/requirements.txt | \
	        $(PYTHON) -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'); \
	if $(BIN)/python -c '' 2>/dev/null && [ "$$(cat $(STAMP) 2>/dev/null)" = "$$want" ]; then exit 0; fi; \
	echo "labkit: installing into $(VENV) (a few minutes the first time)"; \
	$(BIN)/python -c '' 2>/dev/null || $(PYTHON) -m venv $(VENV); \
	grep -v '^[[:space:]]*-e' binder/requirements.txt > $(VENV)/constraints.txt; \
	$(BIN)/python -m pip install --quiet --disable-pip-version-check \
	  --constraint $(VENV)/constraints.txt --editable '.[test]'; \
	mkdir -p $(LAB_SETTINGS); \
	cp binder/overrides.json $(LAB_SETTINGS)/overrides.json; \
	echo "$$want" > $(STAMP); \
	echo "labkit: installed ($$($(BIN)/labkit --version))"

# BOKEH_RESOURCES=inline is set by `labkit lab` unless you set it yourself (BokehJS offline).
lab: install
	$(BIN)/labkit lab $(if $(filter 1 yes true,$(HEADLESS)),--headless) $(if $(PORT),--port $(PORT))

lab-headless:
	@$(MAKE) --no-print-directory lab HEADLESS=1

# pytest's exit code 5 means it collected no test: say so and do not fail; anything else counts.
test: install
	@rc=0; BOKEH_RESOURCES=inline PATH="$(abspath $(BIN)):$$PATH" \
	  $(BIN)/python -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "labkit: pytest collected no tests (exit 5)"; exit 0; fi; \
	exit $$rc

test-fast:
	@$(MAKE) --no-print-directory test PYTEST_ARGS="-m 'not live and not browser' $(PYTEST_ARGS)"

# only the live QEMU tests (LABKIT_LIVE=1 also makes `make test` run notebook 07 on a real guest instead
# of replaying); they need qemu-system-x86 and busybox-static from apt (gcc makes the guest's helper; see binder/apt.txt)
test-live: install
	LABKIT_LIVE=1 BOKEH_RESOURCES=inline PATH="$(abspath $(BIN)):$$PATH" \
	  $(BIN)/python -m pytest -m live tests/live $(PYTEST_ARGS)

# the fact checks of data/baselines/facts over a parameter grid, on a dask LocalCluster (one worker per
# core); runs are kept in out/regress/runs/ and the report compares with the previous one
GRID ?= memory=1G,4G seed=0,1,2
regress: install
	BOKEH_RESOURCES=inline PATH="$(abspath $(BIN)):$$PATH" $(BIN)/labkit regress --grid $(GRID)

# repo2docker's steps for binder/ on this machine, as a non-root user, in a fresh Python 3.11
# environment, then every notebook in it (07 on a live guest); prints the time of each step
binder-check:
	$(PYTHON) binder/check.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis labkit.egg-info
