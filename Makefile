# The two commands a fresh machine needs: `make demo` and `make test`.
# Each builds the virtualenv it needs first, from its lock in locks/ (every package at one exact
# version with its hashes; `make lock` rewrites them, `make lock-check` says whether they are
# current). A changed lock rebuilds its virtualenv from scratch, so nothing an older lock
# installed is left over.
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed-dev
# uv installs the locks (itself installed by pip from its own hash-checked lock, locks/tools.txt):
# from a cold cache it builds .venv in about a quarter of pip's time (README, *Locks*).
TOOLS_VENV ?= .venv-lock
TOOLS_STAMP := $(TOOLS_VENV)/.installed
UV := $(TOOLS_VENV)/bin/uv
# Hash-checked installs of a lock into a virtualenv made by the interpreter's own `venv`:
# nothing outside the lock, no resolver. The project itself goes in after, without dependencies
# and without build isolation (its build requirements, setuptools and wheel, are in the lock).
# Bytecode is compiled at install: where PYTHONDONTWRITEBYTECODE is set (as on our CI machines)
# Python never caches it, so every process -- each Ray worker among them -- would compile
# torch's sources again on import (torch + torchvision: 11.5 s a process instead of 5 s here).
UV_LOCKED = $(UV) pip install --quiet --require-hashes --no-deps --compile-bytecode --python
# Label Studio for the review round-trip test, in its own virtualenv (it pins Django and boto
# ranges that clash with ours). Its first-start database migrations (a minute or two) run in its
# build, once, into a template data folder that each test server copies. (Defined before the
# rules that name it: make expands a rule's prerequisites as it reads the rule.)
LS_VENV ?= .venv-label-studio
LS_STAMP := $(LS_VENV)/.installed

.PHONY: demo test test-fast venv clean bench-venv browser label-studio lock lock-check

$(TOOLS_STAMP): locks/tools.txt
	rm -rf $(TOOLS_VENV)
	$(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r locks/tools.txt
	touch $@

$(STAMP): pyproject.toml locks/dev.txt $(TOOLS_STAMP)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(UV_LOCKED) $(VENV)/bin/python --only-binary :all: -r locks/dev.txt
	$(UV) pip install --quiet --no-deps --no-build-isolation --python $(VENV)/bin/python -e .
	@# the report map's numba functions compiled once into numba's cache, not in every first run
	$(VENV)/bin/python -c "from curation.report.map import warm_numba_cache as w; print(f'numba cache warmed in {w():.0f} s')" \
		|| echo "could not warm numba's cache: the first run's map compiles instead"
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/curation demo --out demo-output

# Two worker processes, whole files each (a file's module fixtures -- one job run shared by its
# tests -- stay in one process), the longest files first (tests/conftest.py orders them; xdist
# keeps that order with --no-loadscope-reorder); each worker has its own local Ray and S3 server.
test: $(STAMP) browser $(LS_STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

# The quick loop: everything but the `integration` tests (real Ray, the S3 server, subprocesses,
# the browser); about a minute.
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile -m "not integration"

# The report test opens report.html in Debian's Chromium (never a downloaded browser build).
# Not locked: apt installs the distribution's current release.
browser:
	@command -v chromium >/dev/null 2>&1 || { (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "could not install chromium: the report's browser test will be skipped (and fails under CI)"; }

# Label Studio pins one package that has no wheel (attr 0.3.1): it is built from source with the
# locked build tools installed first (locks/build.txt) and no build isolation, so nothing
# unlocked is fetched to build it.
$(LS_STAMP): locks/label-studio.txt locks/build.txt $(TOOLS_STAMP)
	rm -rf $(LS_VENV)
	$(PYTHON) -m venv $(LS_VENV)
	$(UV_LOCKED) $(LS_VENV)/bin/python --only-binary :all: -r locks/build.txt
	$(UV_LOCKED) $(LS_VENV)/bin/python --no-build-isolation -r locks/label-studio.txt
	rm -rf $(LS_VENV)/template
	LATEST_VERSION_CHECK=false COLLECT_ANALYTICS=false $(LS_VENV)/bin/label-studio version \
		--data-dir $(LS_VENV)/template >/dev/null
	touch $@

label-studio: $(LS_STAMP)

# Extra packages for benchmarks/quality.py (cleanlab Datalab, CleanVision), into the same venv:
# locks/bench.txt is dev's lock plus those (resolved with dev's versions as constraints).
bench-venv: $(VENV)/.installed-bench

$(VENV)/.installed-bench: $(STAMP) locks/bench.txt
	$(UV_LOCKED) $(VENV)/bin/python --only-binary :all: -r locks/bench.txt
	touch $@

# Rewrite every lock (needs the package index), or say whether they are current.
lock: $(TOOLS_STAMP)
	PATH=$(CURDIR)/$(TOOLS_VENV)/bin:$$PATH $(TOOLS_VENV)/bin/python locks/update.py

lock-check: $(TOOLS_STAMP)
	PATH=$(CURDIR)/$(TOOLS_VENV)/bin:$$PATH $(TOOLS_VENV)/bin/python locks/update.py --check

clean:
	rm -rf $(VENV) $(LS_VENV) $(TOOLS_VENV) demo-output .pytest_cache
