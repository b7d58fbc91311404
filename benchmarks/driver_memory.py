"""The driver's memory slope: peak RSS of the job's own process per item, and wall time per phase.

Runs ``curation run`` as a subprocess (a local Ray, as a user's laptop or head node would) and
samples its ``VmHWM`` from ``/proc`` (Ray's workers are other processes: they are not counted,
which is the point -- the driver is the one process that cannot be scaled out). For each size the
input is written first:

* embeddings mode: N clustered, L2-normalised d-dim vectors with labels as Parquet
  (``input.embeddings``); run at two or more sizes and two dimensions, so the table shows both the
  bytes per item between sizes and whether they depend on d;
* images mode (``--images N1 N2``): N small PNGs through decode -> embed (``thumbnail``).

``--project DIR`` runs another checkout's code with the same virtualenv (``PYTHONPATH=DIR``), so
a before/after comparison runs side by side on one machine. Prints a table and writes JSON.

    python benchmarks/driver_memory.py --sizes 150000 450000 --dims 512 128 --out benchmarks/results/driver-memory.json
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

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks._common import print_table, save_json, write_embeddings  # noqa: E402


def _write_images(folder: str, n: int) -> None:
    """N distinct small photos-like PNGs (a smooth random layout plus noise, 64 x 48)."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        path = os.path.join(folder, f"{i:07d}.png")
        if not os.path.exists(path):
            layout = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((64, 48), Image.BICUBIC)
            noise = rng.integers(-12, 12, (48, 64, 3))
            Image.fromarray(np.clip(np.asarray(layout, np.int16) + noise, 0, 255).astype(np.uint8)).save(path)


def run_once(project: str, config: dict, work: str) -> dict:
    """Run the job on ``config``; returns the driver's peak RSS, wall time and phase timings."""
    import yaml

    path = os.path.join(work, "config.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(config, fh)
    env = dict(os.environ, PYTHONPATH=project, RAY_AUTH_MODE="disabled")
    log_path = os.path.join(work, "run.log")
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "curation", "run", "--config", path, "--quiet"],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=project)
        peak = 0
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/status") as fh:
                    for line in fh:
                        if line.startswith("VmHWM:"):
                            peak = max(peak, int(line.split()[1]) * 1024)
            except OSError:
                pass
            time.sleep(0.25)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"run failed ({proc.returncode}): {open(log_path).read()[-2000:]}")
    out = config["output"]["uri"]
    run_id = json.load(open(os.path.join(out, "latest")))["run_id"]
    info = json.load(open(os.path.join(out, run_id, "run.json")))
    phases = info.get("driver_peak_bytes", {})
    top = max(phases, key=phases.get) if phases else ""
    return {"peak_bytes": peak, "wall_s": round(wall, 1), "timings_s": info.get("timings_s", {}),
            "peak_phase": top, "phase_peak_bytes": phases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[150_000, 450_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[512])
    parser.add_argument("--images", type=int, nargs="*", default=[], help="images-mode sizes (thumbnail)")
    parser.add_argument("--project", default=ROOT, help="checkout whose code runs (default: this one)")
    parser.add_argument("--label", default="this checkout")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "curation-bench-driver"))
    parser.add_argument("--out", default="benchmarks/results/driver-memory.json")
    args = parser.parse_args()

    rows = []
    for d in args.dims:
        for n in args.sizes:
            work = os.path.join(args.work, f"emb-{d}-{n}")
            shutil.rmtree(work, ignore_errors=True)
            write_embeddings(os.path.join(work, "input"), n, d, clusters=200, classes=20, flip=0.05, dups=0.01)
            config = {"input": {"embeddings": os.path.join(work, "input")}, "output": {"uri": os.path.join(work, "out")},
                      "selections": [{"name": "train", "mode": "representative", "budget": 1000},
                                     {"name": "clean", "mode": "clean"}]}
            result = run_once(args.project, config, work)
            rows.append({"mode": "embeddings", "d": d, "n": n, **result})
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(work, ignore_errors=True)
    for n in args.images:
        work = os.path.join(args.work, f"img-{n}")
        images = os.path.join(args.work, "photos", str(n))
        _write_images(images, n)
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
        config = {"input": {"images": images}, "output": {"uri": os.path.join(work, "out")},
                  "embedder": {"model": "thumbnail", "weights": "none"},
                  "selections": [{"name": "clean", "mode": "clean"}]}
        result = run_once(args.project, config, work)
        rows.append({"mode": "images", "d": 775, "n": n, **result})
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(work, ignore_errors=True)

    # Bytes per item between consecutive sizes of the same mode and d.
    for row in rows:
        row["peak_mib"] = round(row["peak_bytes"] / 2**20)
        prev = [r for r in rows if r["mode"] == row["mode"] and r["d"] == row["d"] and r["n"] < row["n"]]
        if prev:
            p = max(prev, key=lambda r: r["n"])
            row["bytes_per_item"] = round((row["peak_bytes"] - p["peak_bytes"]) / (row["n"] - p["n"]))
        row["phases"] = ", ".join(f"{k} {v:.0f}" for k, v in row["timings_s"].items()
                                  if k in ("read_embeddings", "decode_embed", "knn", "scores", "selections",
                                           "write_outputs"))
    print(f"\ndriver peak memory ({args.label})")
    print_table(rows, ["mode", "d", "n", "peak_mib", "bytes_per_item", "peak_phase", "wall_s", "phases"])
    save_json(args.out, {"label": args.label, "project": args.project, "machine": f"{os.cpu_count()} CPUs",
                         "rows": rows})


if __name__ == "__main__":
    main()
