"""How `make test` spreads the suite over its two workers: each file whole on one worker (its
module fixtures -- a job run its tests share -- run once), the longest files handed out first."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import LONGEST_FIRST

pytestmark = pytest.mark.integration  # runs pytest in a subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_test_options() -> list[str]:
    """The options `make test` passes to pytest (read from the Makefile, so this checks what runs)."""
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    rule = re.search(r"^test: .*\n\t(.+)$", makefile, re.M).group(1)
    options = rule.split("-m pytest", 1)[1].split()
    return [o for o in options if o != "-q"]


def test_each_file_runs_whole_on_one_worker_with_its_module_fixture_once(tmp_path):
    conftest = open(os.path.join(ROOT, "tests", "conftest.py")).read()
    (tmp_path / "conftest.py").write_text(conftest)
    log = tmp_path / "log"
    for name in ("test_multinode", "test_alpha", "test_beta", "test_gamma"):
        (tmp_path / f"{name}.py").write_text(
            "import os, time, pytest\n"
            "@pytest.fixture(scope='module')\n"
            "def shared():\n"
            f"    with open({str(log)!r}, 'a') as fh: fh.write('setup {name} ' + os.environ['PYTEST_XDIST_WORKER'] + '\\n')\n"
            "    yield\n"
            + "".join(f"def test_{i}(shared):\n"
                      f"    with open({str(log)!r}, 'a') as fh: fh.write('ran {name} ' + os.environ['PYTEST_XDIST_WORKER'] + '\\n')\n"
                      "    time.sleep(0.05)\n" for i in range(2 if name == "test_multinode" else 6)))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *make_test_options(),
                           "-o", "addopts=", str(tmp_path)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = [line.split() for line in log.read_text().splitlines()]
    setups = [(name, worker) for kind, name, worker in lines if kind == "setup"]
    assert sorted(name for name, _ in setups) == ["test_alpha", "test_beta", "test_gamma", "test_multinode"]
    for name, worker in setups:
        assert {w for kind, n, w in lines if kind == "ran" and n == name} == {worker}, name
    # the file the conftest ranks longest is among the first two handed out (one per worker),
    # though it comes third in collection order and has the fewest tests
    assert "test_multinode" in LONGEST_FIRST and "test_multinode" in [name for name, _ in setups[:2]]
