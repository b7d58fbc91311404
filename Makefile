# The two commands a fresh machine needs: `make demo` and `make test`.
# Each builds the virtualenv it needs (.venv, from pyproject.toml) first.
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed-dev

.PHONY: demo test venv clean bench-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/curation demo --out demo-output

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

# Extra packages for benchmarks/quality.py (cleanlab Datalab, CleanVision), into the same venv.
bench-venv: $(STAMP)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev,bench]'

clean:
	rm -rf $(VENV) demo-output .pytest_cache
