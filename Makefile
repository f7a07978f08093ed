# prompt-snake: one command to set up and run the demo, one to set up and pass the tests.
#   make demo   - create .venv, install, build the embedded demo and run it (no servers)
#   make test   - create .venv, install, run the style checks and the test suite (tests start their own servers)
#   make lint   - ruff, mypy, snakefmt and snakemake --lint only
#   make lock   - regenerate requirements.lock / requirements-runtime.lock from pyproject.toml
#   make live-demo - broker, S3, stream shim and camera tester on this machine
#   make services - broker and S3 only, in the foreground (for scripts/upload.py)
#   make report - HTML report with pictures of the last run (after make demo)
#   make slurm  - a single-node SLURM cluster on this machine, for profiles/slurm (docs/slurm.md)

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# Test files run on this many pytest-xdist workers (one file stays on one worker, with its
# module fixtures); most of the suite's time is waiting for servers and sleeping stand-ins.
TEST_WORKERS ?= 3

.PHONY: setup lock test-packages lint test demo live-demo services report slurm clean-demo

setup: $(STAMP)

# Reinstall only when the pins change (pyproject.toml or the lock newer than the stamp).
# Every package comes at its locked version (requirements.lock: all extras, transitive
# ones included), then the project itself without resolving anything again.
$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "make setup: installing $$(grep -c '^[A-Za-z]' requirements.lock) locked packages into $(VENV) (2-3 minutes on a fresh machine)"
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --disable-pip-version-check --progress-bar off -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	$(PY) -m pip check
	touch $(STAMP)
	@echo "make setup: done; activate with: source $(VENV)/bin/activate"

# Regenerate the locks from pyproject.toml (after changing a pin): requirements.lock
# (all extras; make setup and CI) and requirements-runtime.lock (no extras; the base image).
# Versions already locked are kept; LOCK_ARGS=--upgrade moves the floating ones to the newest.
UV_PIN := $(shell sed -n 's/^ *"\(uv==[^"]*\)".*/\1/p' pyproject.toml)
LOCK_FLAGS := --python-version 3.11 --python-platform x86_64-unknown-linux-gnu --custom-compile-command 'make lock' --quiet
lock:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@test -x $(VENV)/bin/uv || $(PY) -m pip install --quiet --disable-pip-version-check '$(UV_PIN)'
	$(VENV)/bin/uv pip compile pyproject.toml --all-extras $(LOCK_FLAGS) $(LOCK_ARGS) -o requirements.lock
	$(VENV)/bin/uv pip compile pyproject.toml -c requirements.lock $(LOCK_FLAGS) -o requirements-runtime.lock

# Style, enforced: ruff (lint + format), mypy, snakefmt, snakemake --lint.  Any finding fails.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/snakefmt --check Snakefile rules/
	$(VENV)/bin/snakemake --lint --quiet all

# Debian packages the tests need (PostgreSQL server binaries, Chromium, graphviz), when missing.
test-packages:
	@bash scripts/install_test_packages.sh

# pytest's own exit code is kept in .test-exit-code for .ci/run; 5 = no tests ran.
test: setup test-packages lint
	@rm -f .test-exit-code
	@$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS); rc=$$?; echo $$rc > .test-exit-code; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests: failing"; fi; \
	  exit $$rc

demo: setup
	@echo "make demo: builds demo/central_repo, then replays 3 visits (27 targets, a few minutes);"
	@echo "  Snakemake's own logs: logs/replay/batch-*.log, each job's: logs/<stage>/..."
	$(PY) scripts/demo.py

# Observatory in a box: local broker + S3, the stream shim and the camera tester;
# shows alerts arriving on the alert topic.  Uses the demo central repo.
live-demo: setup
	@test -f demo/central_repo/butler.yaml || $(PY) scripts/demo.py
	$(PY) scripts/live_demo.py --repo demo/central_repo --scale 0.25

# Night report of the run in this directory: pictures + metrics into build/report,
# then one HTML page (report.html) through snakemake --report on the workflow itself
# (rule night_report marks the files; `all` brings the detector-visit chain's statistics).
# The rule runs scripts/make_report.py; --nolock: it writes only build/report and its
# log, so it may run beside a live run in this directory.
report: setup
	$(PY) -m snakemake --cores 1 --nolock --forcerun night_report --quiet rules -- night_report
	$(PY) -m snakemake --report report.html -- all night_report
	@echo "make report: open report.html (pictures and metrics also in build/report)"

# A Kafka broker and S3 on 127.0.0.1 for the camera testers (scripts/upload.py) and the
# shim, in the foreground until Ctrl-C; prints the commands that use them.
services: setup
	$(PY) scripts/services.py

# A real single-node SLURM cluster (munged, slurmctld, slurmd) in a temp dir; prints how
# to point sbatch/squeue and profiles/slurm at it, and stops it (nothing left) on Ctrl-C.
slurm: setup test-packages
	$(PY) -m stream_shim.testbed.slurm_cluster

clean-demo:
	rm -rf demo results work_area visits logs benchmarks .snakemake
