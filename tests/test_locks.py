"""Every environment installs from a committed lock, and the lock agrees with what asks for it.

Offline and fast: reads pyproject.toml, locks/*.txt and the virtualenvs `make` built.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("locks_update", os.path.join(ROOT, "locks", "update.py"))
locks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(locks)

# Installed by the interpreter's own `venv` (ensurepip), not by a lock.
BOOTSTRAP = {"pip"}


def _pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        return tomllib.load(fh)


def requirements_of(environment: str, pyproject: dict) -> list[Requirement]:
    """What asks for packages in an environment: pyproject (with its extras and build system) or the .in files."""
    extras, inputs, with_build = locks.ENVIRONMENTS[environment]
    lines = list(pyproject["build-system"]["requires"]) if with_build else []
    for name in inputs:
        with open(os.path.join(ROOT, "locks", name)) as fh:
            lines += [line.split("#")[0].strip() for line in fh]
    if extras is not None:
        lines += pyproject["project"]["dependencies"]
        for extra in extras:
            lines += pyproject["project"]["optional-dependencies"][extra]
    return [Requirement(line) for line in lines if line]


def unmet(requirements: list[Requirement], lock: dict[str, dict]) -> list[str]:
    problems = []
    for req in requirements:
        entry = lock.get(locks.normalise(req.name))
        if entry is None:
            problems.append(f"{req} is not in the lock")
        elif not req.specifier.contains(entry["version"], prereleases=True):
            problems.append(f"{req} but the lock has {entry['version']}")
    return problems


def orphans(requirements: list[Requirement], lock: dict[str, dict]) -> list[str]:
    """Lock entries that only the project asked for, and the project no longer does."""
    asked = {locks.normalise(r.name) for r in requirements}
    return [name for name, entry in lock.items()
            if entry["via"] and all("pyproject.toml" in v or v.startswith("-r ") for v in entry["via"])
            and name not in asked]


@pytest.mark.parametrize("environment", list(locks.ENVIRONMENTS))
def test_each_lock_pins_every_package_with_hashes_and_meets_its_inputs(environment):
    lock = locks.read_lock(locks.lock_path(environment))
    assert lock, f"locks/{environment}.txt is empty"
    assert not [n for n, e in lock.items() if not e["hashes"]], "every entry carries its sha256 hashes"
    requirements = requirements_of(environment, _pyproject())
    assert unmet(requirements, lock) == [], f"locks/{environment}.txt is stale: run `make lock`"
    assert orphans(requirements, lock) == [], f"locks/{environment}.txt names what nothing asks for: run `make lock`"


def test_a_dependency_added_to_pyproject_and_not_to_the_lock_is_caught():
    pyproject = _pyproject()
    lock = locks.read_lock(locks.lock_path("dev"))
    pyproject["project"]["dependencies"].append("rich>=13")
    assert unmet(requirements_of("dev", pyproject), lock) == ["rich>=13 is not in the lock"]
    # a range moved past the locked version
    pyproject = _pyproject()
    pyproject["project"]["dependencies"] = [d if not d.startswith("torch==") else "torch==2.15.0"
                                            for d in pyproject["project"]["dependencies"]]
    assert unmet(requirements_of("dev", pyproject), lock) == ["torch==2.15.0 but the lock has 2.14.1"]
    # a dependency removed from pyproject and left in the lock
    pyproject = _pyproject()
    pyproject["project"]["dependencies"] = [d for d in pyproject["project"]["dependencies"]
                                            if not d.startswith("bokeh")]
    assert orphans(requirements_of("dev", pyproject), lock) == ["bokeh"]


def test_bench_adds_to_dev_and_moves_nothing():
    dev, bench = locks.read_lock(locks.lock_path("dev")), locks.read_lock(locks.lock_path("bench"))
    assert {n: e["version"] for n, e in bench.items() if n in dev} == {n: e["version"] for n, e in dev.items()}


def test_the_makefile_and_the_dockerfile_install_only_from_the_locks():
    with open(os.path.join(ROOT, "Makefile")) as fh:
        makefile = fh.read()
    with open(os.path.join(ROOT, "cluster", "Dockerfile")) as fh:
        dockerfile = fh.read()
    # hash-checked, no resolver; bytecode compiled at install (uv's default is not to: see below)
    assert "UV_LOCKED = $(UV) pip install --quiet --require-hashes --no-deps --compile-bytecode" in makefile
    for target, lock in [("$(STAMP):", "locks/dev.txt"), ("$(LS_STAMP):", "locks/label-studio.txt"),
                         ("$(LS_STAMP):", "locks/build.txt"), ("$(VENV)/.installed-bench:", "locks/bench.txt"),
                         ("$(TOOLS_STAMP):", "locks/tools.txt")]:
        rule = makefile.split("\n" + target, 1)[1].split("\n\n", 1)[0]
        assert lock in rule.split("\n", 1)[0], f"{target} is rebuilt when {lock} changes"
        assert f"-r {lock}" in rule and ("$(UV_LOCKED)" in rule or "--require-hashes" in rule), rule
    # every other install is the project itself, without its dependencies
    for text in (makefile, dockerfile):
        for line in text.splitlines():
            if ("pip install" in line or "$(UV_LOCKED)" in line) and "-r " not in line and "UV_LOCKED =" not in line:
                assert "--no-deps" in line, line
                assert line.rstrip().endswith(("-e .", " .", ". && pip check")), line
    assert "--require-hashes --no-deps" in dockerfile and "locks/image${EXTRAS:+-$EXTRAS}.txt" in dockerfile
    for extras in ("", "gpu"):
        assert os.path.exists(os.path.join(ROOT, "locks", f"image{'-' + extras if extras else ''}.txt"))


def _installed(python: str) -> dict[str, str]:
    code = ("import importlib.metadata as m, json; "
            "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))")
    out = subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout
    return {locks.normalise(n): v for n, v in json.loads(out).items()}


def _compare(venv: str, lock_names: list[str]) -> None:
    python = os.path.join(ROOT, venv, "bin", "python")
    if not os.path.exists(python):
        if os.environ.get("CI"):
            pytest.fail(f"{venv} is missing: `make test` builds it")
        pytest.skip(f"{venv} is not built here (`make test` builds it)")
    expected: dict[str, str] = {}
    for name in lock_names:
        expected.update({n: e["version"] for n, e in locks.read_lock(locks.lock_path(name)).items()})
    installed = _installed(python)
    installed.pop("curation", None)  # the project itself, installed after its lock
    for name in BOOTSTRAP:
        installed.pop(name, None)
    extra = sorted(set(installed) - set(expected))
    missing = sorted(set(expected) - set(installed))
    moved = sorted(f"{n} {installed[n]} != {expected[n]}" for n in set(installed) & set(expected)
                   if installed[n] != expected[n])
    assert (extra, missing, moved) == ([], [], []), f"{venv} differs from {lock_names}"
    check = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_project_venv_holds_exactly_its_lock():
    venv = os.path.relpath(sys.prefix, ROOT)
    if venv.startswith(".."):
        pytest.skip("the tests do not run from this checkout's virtualenv")
    bench = os.path.exists(os.path.join(sys.prefix, ".installed-bench"))
    _compare(venv, ["dev", "bench"] if bench else ["dev"])


def test_the_label_studio_venv_holds_exactly_its_lock():
    _compare(".venv-label-studio", ["build", "label-studio"])


@pytest.mark.parametrize("venv, module", [(None, "torch"), (None, "ray"), (".venv-label-studio", "django")])
def test_the_venvs_hold_compiled_bytecode(venv, module):
    """Where PYTHONDONTWRITEBYTECODE is set (CI here), Python never writes bytecode: a venv
    installed without it compiles torch's sources again in every process that imports it
    (each Ray worker), 6 s or more each on this machine."""
    python = sys.executable if venv is None else os.path.join(ROOT, venv, "bin", "python")
    if not os.path.exists(python):
        if os.environ.get("CI"):
            pytest.fail(f"{venv} is missing: `make test` builds it")
        pytest.skip(f"{venv} is not built here (`make test` builds it)")
    code = (f"import importlib.util as u, os; s = u.find_spec({module!r}).origin; "
            "print(os.path.exists(u.cache_from_source(s)))")
    out = subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    assert out == "True", f"{module} in {venv or sys.prefix} has no compiled bytecode"
