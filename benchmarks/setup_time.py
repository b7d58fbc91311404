"""How long a fresh machine takes to get going: the project's virtualenv built from its lock by
pip and by uv (each from a cold cache, then uv again warm), and `curation demo` run twice.

    .venv/bin/python benchmarks/setup_time.py            # venv builds only (~3 min)
    .venv/bin/python benchmarks/setup_time.py --demo     # and the demo, first and second run

Each build goes into a new temporary virtualenv made by the interpreter's `venv`, exactly as the
Makefile does (hash-checked, no dependencies resolved), with its own empty cache. Prints a table
and writes JSON (benchmarks/results/setup_time.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCK = os.path.join(ROOT, "locks", "dev.txt")


def _timed(cmd: list[str], env: dict | None = None, cwd: str | None = None) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, **(env or {})}, cwd=cwd,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def build(installer: str, cache: str, work: str) -> float:
    """Seconds to make a venv and install the lock and the project into it."""
    venv = os.path.join(work, f"venv-{installer}-{len(os.listdir(work))}")
    python = os.path.join(venv, "bin", "python")
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    if installer == "pip":
        env = {"PIP_CACHE_DIR": cache}
        _timed([python, "-m", "pip", "install", "-q", "--require-hashes", "--no-deps", "--only-binary", ":all:",
                "-r", LOCK], env)
        _timed([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", ROOT], env)
    else:
        uv = shutil.which("uv") or os.path.join(ROOT, ".venv-lock", "bin", "uv")
        env = {"UV_CACHE_DIR": cache}
        _timed([uv, "pip", "install", "-q", "--require-hashes", "--no-deps", "--only-binary", ":all:",
                "--python", python, "-r", LOCK], env)
        _timed([uv, "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--python", python, "-e", ROOT], env)
    seconds = time.perf_counter() - t
    shutil.rmtree(venv)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true", help="also time `curation demo` twice (.venv)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "setup_time.json"))
    args = parser.parse_args()
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as work:
        pip_cache, uv_cache = os.path.join(work, "pip-cache"), os.path.join(work, "uv-cache")
        rows.append(("venv: pip, cold cache", build("pip", pip_cache, work)))
        rows.append(("venv: uv, cold cache", build("uv", uv_cache, work)))
        rows.append(("venv: uv, warm cache", build("uv", uv_cache, work)))
        if args.demo:
            curation = os.path.join(ROOT, ".venv", "bin", "curation")
            out = os.path.join(work, "demo")
            rows.append(("make demo's run, first", _timed([curation, "demo", "--out", out])))
            rows.append(("make demo's run, second", _timed([curation, "demo", "--out", out])))
    width = max(len(name) for name, _ in rows)
    print(f"{'step':<{width}}  seconds")
    for name, seconds in rows:
        print(f"{name:<{width}}  {seconds:7.1f}")
    pip, uv = rows[0][1], rows[1][1]
    print(f"uv / pip (cold): {uv / pip:.2f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"rows": {name: round(s, 1) for name, s in rows}, "uv_over_pip_cold": round(uv / pip, 3)}, fh,
                  indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
