# The two commands a fresh machine needs: `make demo` and `make test`.
# Each builds the virtualenv it needs (.venv, from pyproject.toml) first.
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed-dev
# Label Studio for the review round-trip test, in its own virtualenv (it pins Django and boto
# ranges that clash with ours). Its first-start database migrations (a minute or two) run in its
# build, once, into a template data folder that each test server copies. (Defined before the
# rules that name it: make expands a rule's prerequisites as it reads the rule.)
LS_VENV ?= .venv-label-studio
LS_STAMP := $(LS_VENV)/.installed
LS_VERSION := 1.23.2

.PHONY: demo test test-fast venv clean bench-venv browser label-studio

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/curation demo --out demo-output

# Two worker processes, whole files each (a file's module fixtures -- one job run shared by its
# tests -- stay in one process; groups in tests/conftest.py); each worker has its own local Ray
# and S3 server.
test: $(STAMP) browser $(LS_STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadgroup

# The quick loop: everything but the `integration` tests (real Ray, the S3 server, subprocesses,
# the browser); about a minute.
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not integration"

# The report test opens report.html in Debian's Chromium (never a downloaded browser build).
browser:
	@command -v chromium >/dev/null 2>&1 || { (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "could not install chromium: the report's browser test will be skipped (and fails under CI)"; }

$(LS_STAMP):
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install --quiet --disable-pip-version-check 'label-studio==$(LS_VERSION)'
	rm -rf $(LS_VENV)/template
	LATEST_VERSION_CHECK=false COLLECT_ANALYTICS=false $(LS_VENV)/bin/label-studio version \
		--data-dir $(LS_VENV)/template >/dev/null
	touch $(LS_STAMP)

label-studio: $(LS_STAMP)

# Extra packages for benchmarks/quality.py (cleanlab Datalab, CleanVision), into the same venv.
bench-venv: $(STAMP)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev,bench]'

clean:
	rm -rf $(VENV) $(LS_VENV) demo-output .pytest_cache
