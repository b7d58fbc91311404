# The two commands a fresh machine needs: `make demo` and `make test`.
# Each builds the virtualenv it needs first, from its lock in locks/ (every package at one exact
# version with its hashes; `make lock` rewrites them, `make lock-check` says whether they are current).
# A changed lock rebuilds its virtualenv from scratch, so nothing the old lock installed is left over.
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed-dev
# Hash-checked installs of a lock: nothing outside it, no resolver. The project itself goes in
# after, without dependencies and without build isolation (its build requirements are in the lock).
PIP_LOCKED = bin/pip install --quiet --disable-pip-version-check --require-hashes --no-deps --only-binary :all: -r
# Label Studio pins one package that has no wheel (attr 0.3.1): it is built with the locked build
# tools installed first (locks/build.txt), without build isolation, so nothing unlocked is fetched.
PIP_LOCKED_SDIST = bin/pip install --quiet --disable-pip-version-check --require-hashes --no-deps --no-build-isolation -r
# Label Studio for the review round-trip test, in its own virtualenv (it pins Django and boto
# ranges that clash with ours). Its first-start database migrations (a minute or two) run in its
# build, once, into a template data folder that each test server copies. (Defined before the
# rules that name it: make expands a rule's prerequisites as it reads the rule.)
LS_VENV ?= .venv-label-studio
LS_STAMP := $(LS_VENV)/.installed

.PHONY: demo test test-fast venv clean bench-venv browser label-studio lock lock-check

$(STAMP): pyproject.toml locks/dev.txt
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/$(PIP_LOCKED) locks/dev.txt
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
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

$(LS_STAMP): locks/label-studio.txt locks/build.txt
	rm -rf $(LS_VENV)
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/$(PIP_LOCKED) locks/build.txt
	$(LS_VENV)/$(PIP_LOCKED_SDIST) locks/label-studio.txt
	rm -rf $(LS_VENV)/template
	LATEST_VERSION_CHECK=false COLLECT_ANALYTICS=false $(LS_VENV)/bin/label-studio version \
		--data-dir $(LS_VENV)/template >/dev/null
	touch $(LS_STAMP)

label-studio: $(LS_STAMP)

# Extra packages for benchmarks/quality.py (cleanlab Datalab, CleanVision), into the same venv:
# locks/bench.txt is dev's lock plus those (resolved with dev's versions as constraints).
bench-venv: $(VENV)/.installed-bench

$(VENV)/.installed-bench: $(STAMP) locks/bench.txt
	$(VENV)/$(PIP_LOCKED) locks/bench.txt
	touch $@

# The lock tool (uv, itself locked) in its own virtualenv; `make lock` needs the package index.
LOCK_VENV ?= .venv-lock
$(LOCK_VENV)/.installed: locks/tools.txt
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/$(PIP_LOCKED) locks/tools.txt
	touch $@

lock: $(LOCK_VENV)/.installed
	PATH=$(CURDIR)/$(LOCK_VENV)/bin:$$PATH $(LOCK_VENV)/bin/python locks/update.py

lock-check: $(LOCK_VENV)/.installed
	PATH=$(CURDIR)/$(LOCK_VENV)/bin:$$PATH $(LOCK_VENV)/bin/python locks/update.py --check

clean:
	rm -rf $(VENV) $(LS_VENV) $(LOCK_VENV) demo-output .pytest_cache
