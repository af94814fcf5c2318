# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
MUTATE_JOBS ?= $(shell nproc)

.PHONY: demo test lint format bench clean browser docs mutate

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# Debian's chromium for the report's browser tests (root only; skipped, with a reason, without it).
browser:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "warning: could not install chromium; browser tests will skip"; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples
	$(VENV)/bin/ruff format --check src tests examples

format: $(STAMP)
	$(VENV)/bin/ruff format src tests examples
	$(VENV)/bin/ruff check --fix src tests examples

# The suite under coverage (subprocesses included), then the library layer's coverage, floor 90% ([tool.coverage]).
test: $(STAMP) browser lint
	@$(PY) -m coverage erase
	@$(PY) -m coverage run -m pytest -q; rc=$$?; \
	$(PY) -m coverage combine -q; \
	$(PY) -m coverage report; cov=$$?; \
	if [ $$rc -ne 0 ]; then exit $$rc; fi; exit $$cov

# Mutation testing of the kernels, functional, stats, roles and ring ([tool.mutmut]); slow, not part of
# `make test`. MUTANTS narrows it to globs of mutant names, e.g. MUTANTS='attnkit.kernels.merge*': once
# mutants/ exists, only those not decided yet, passed by name (mutmut reruns every mutant it is given;
# RERUN=1 passes the globs themselves, to decide them all again).
# mutmut keeps its first copy of non-Python sources in mutants/: refresh the C helper's, or the mutants
# would call a stale build. One torch thread per worker: two workers share the cores without spinning,
# and a worker's CPU time (what mutmut's timeout counts) stays its own.
mutate: $(STAMP)
	if [ -d mutants/src ]; then cd src && find . -name '*.c' -exec cp --parents {} ../mutants/src/ \; ; fi
	@set -f; names="$(MUTANTS)"; \
	if [ -n "$$names" ] && [ -d mutants/src ] && [ -z "$(RERUN)" ]; then \
		names=$$($(PY) tools/mutant_names.py $(MUTANTS)); \
		if [ -z "$$names" ]; then echo "every mutant matching $(MUTANTS) is decided (RERUN=1 runs them again)"; exit 0; fi; \
	fi; \
	echo "mutmut run: $$(echo $$names | wc -w) mutant names or globs"; \
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children $(MUTATE_JOBS) $$names
	$(VENV)/bin/mutmut results

demo: $(STAMP)
	$(VENV)/bin/attnkit show --out out/report.html --png out/png

bench: $(STAMP)
	$(VENV)/bin/attnkit bench kernels --out docs/results

# The documentation site, into site/ (make test builds it with --strict: tests/test_docs_site.py).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --site-dir site

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis build dist site mutants .coverage .coverage.*
