# prompt-snake: one command to set up and run the demo, one to set up and pass the tests.
#   make demo   - create .venv, install, build the embedded demo and run it (no servers)
#   make test   - create .venv, install, run the style checks and the test suite (tests start their own servers)
#   make lint   - ruff, mypy, snakefmt and snakemake --lint only
#   make live-demo - broker, S3, stream shim and camera tester on this machine
#   make report - HTML report with pictures of the last run (after make demo)

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: setup test-packages lint test demo live-demo report clean-demo

setup: $(STAMP)

# Reinstall only when the pins change (pyproject.toml newer than the stamp).
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[services,test,report,lint]'
	touch $(STAMP)

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
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; echo $$rc > .test-exit-code; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests: failing"; fi; \
	  exit $$rc

demo: setup
	$(PY) scripts/demo.py

# Observatory in a box: local broker + S3, the stream shim and the camera tester;
# shows alerts arriving on the alert topic.  Uses the demo central repo.
live-demo: setup
	@test -f demo/central_repo/butler.yaml || $(PY) scripts/demo.py
	$(PY) scripts/live_demo.py --repo demo/central_repo --scale 0.25

# Night report of the run in this directory: pictures + metrics into build/report,
# then one HTML page (report.html) through snakemake --report.
report: setup
	$(PY) scripts/make_report.py --results results --out-dir build/report
	$(PY) -m snakemake --snakefile report/Snakefile --config report_dir=build/report --report report.html

clean-demo:
	rm -rf demo results work_area visits logs benchmarks .snakemake
