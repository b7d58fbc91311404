"""Write (or check) the lock of every environment the project builds.

    make lock          # rewrite locks/*.txt from pyproject.toml and locks/*.in
    make lock-check    # exit 1 when a lock is not what `make lock` would write now

Each lock names every package, direct and transitive, at one exact version with its sha256
hashes, resolved by uv for CPython 3.11 on Linux x86_64 (this machine, CI and Ray's image).
An existing lock is the starting point: `make lock` keeps every version that still satisfies
the inputs and only adds or moves what a changed input needs. `UPGRADE=1 make lock` re-resolves
from scratch (newest versions the ranges allow, none published after LOCK_DATE).

The table below is the one list of environments; tests/test_locks.py walks it too.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# name -> (pyproject extras, or None when the project is not in it; extra input files here;
#          whether pyproject's build-system requirements are in it)
ENVIRONMENTS: dict[str, tuple[list[str] | None, list[str], bool]] = {
    # .venv: `make demo`, `make test`
    "dev": (["dev"], [], True),
    # .venv after `make bench-venv`: dev plus the side-by-side tools; resolved with dev's
    # versions as constraints so installing it adds packages and moves none.
    "bench": (["dev", "bench"], [], True),
    # cluster/Dockerfile, CPU image (EXTRAS="") and GPU image (EXTRAS=gpu)
    "image": ([], [], True),
    "image-gpu": (["gpu"], [], True),
    # .venv-label-studio: the review round-trip test's server, apart from our packages
    "label-studio": (None, ["label-studio.in"], False),
    # the build tools alone: installed first into .venv-label-studio, which builds one sdist
    "build": (None, [], True),
}
# Versions published after this date are never picked, so `make lock` gives the same answer
# on any day; move it forward (with UPGRADE=1) to take newer releases on purpose.
LOCK_DATE = "2026-12-07T00:00:00Z"
PLATFORM = ["--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_28"]


def lock_path(name: str) -> str:
    return os.path.join(HERE, f"{name}.txt")


def build_requirements() -> list[str]:
    """pyproject's build-system requirements: locked too, installed before the project."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        return list(tomllib.load(fh)["build-system"]["requires"])


def read_lock(path: str) -> dict[str, dict]:
    """{normalised name: {"version", "hashes", "via"}} of a lock written by compile_lock."""
    entries: dict[str, dict] = {}
    current = None
    for line in open(path):
        stripped = line.strip()
        if not stripped or (stripped.startswith("#") and current is None):
            continue
        if not line.startswith(" "):
            spec = stripped.rstrip("\\").strip()
            name, sep, version = spec.partition("==")
            if not sep:
                raise ValueError(f"{path}: {spec!r} is not pinned with ==")
            current = {"version": version.split(";")[0].strip(), "hashes": [], "via": []}
            entries[normalise(name)] = current
        elif stripped.startswith("--hash=sha256:"):
            current["hashes"].append(stripped.split(":", 1)[1].rstrip("\\").strip())
        elif stripped.startswith("# via"):
            rest = stripped[len("# via"):].strip()
            current["via"] += [rest] if rest else []
        elif stripped.startswith("#"):
            current["via"].append(stripped.lstrip("#").strip())
    return entries


def normalise(name: str) -> str:
    """PEP 503's form of a distribution name (what pip and importlib.metadata compare by)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _uv() -> str:
    uv = shutil.which("uv") or os.path.join(os.path.dirname(sys.executable), "uv")
    if not os.path.exists(uv):
        raise SystemExit("uv not found: run `make lock`, which installs it from locks/tools.txt")
    return uv


def compile_lock(name: str, out: str, *, upgrade: bool) -> None:
    extras, inputs, with_build = ENVIRONMENTS[name]
    with tempfile.TemporaryDirectory() as tmp:
        args = [_uv(), "pip", "compile", "--quiet", "--generate-hashes", "--no-header",
                "--exclude-newer", LOCK_DATE, *PLATFORM, "-o", out]
        build_in = os.path.join(tmp, "build-system.in")
        if with_build:
            with open(build_in, "w") as fh:
                fh.write("\n".join(build_requirements()) + "\n")
            args.append(build_in)
        if extras is not None:
            args.append("pyproject.toml")
            for extra in extras:
                args += ["--extra", extra]
        args += [os.path.join("locks", f) for f in inputs]
        if name == "bench":
            args += ["-c", os.path.join("locks", "dev.txt")]
        if upgrade:
            args.append("--upgrade")
        subprocess.run(args, cwd=ROOT, check=True)
    with open(out) as fh:
        body = fh.read()
    with open(out, "w") as fh:
        fh.write(f"# The {name} environment's lock. Written by `make lock` (locks/update.py); do not edit.\n")
        # uv names the temporary file it was given; the lock must not change with its name.
        fh.write(body.replace(build_in, "pyproject.toml (build-system)"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, write nothing; exit 1 on a difference")
    parser.add_argument("--upgrade", action="store_true", default=os.environ.get("UPGRADE") == "1")
    parser.add_argument("names", nargs="*", default=list(ENVIRONMENTS))
    args = parser.parse_args(argv)
    stale = []
    for name in args.names:
        if not args.check:
            compile_lock(name, lock_path(name), upgrade=args.upgrade)
            print(f"wrote {os.path.relpath(lock_path(name), ROOT)}")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            fresh = os.path.join(tmp, f"{name}.txt")
            if os.path.exists(lock_path(name)):
                shutil.copy(lock_path(name), fresh)  # the same starting point as `make lock`
            compile_lock(name, fresh, upgrade=False)
            with open(fresh) as fh:
                new = fh.readlines()
        old = open(lock_path(name)).readlines() if os.path.exists(lock_path(name)) else []
        if new != old:
            stale.append(name)
            sys.stdout.writelines(difflib.unified_diff(old, new, f"locks/{name}.txt", "make lock", n=0))
    if stale:
        print(f"stale locks: {', '.join(stale)} -- run `make lock` and commit locks/", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
