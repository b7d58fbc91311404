"""An input given as a manifest of 1M rows: preflight reads it without listing any bucket.

Writes a Parquet manifest of ``--rows`` uris (with a label and a metadata column) that point
into a prefix that is never listed, runs the job's preflight on it, and reports the time and
the driver's memory for that step. Prints a table and writes ``results/manifest_1m.json``.

    .venv/bin/python benchmarks/manifest_1m.py [--rows 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from curation.config import load_config  # noqa: E402
from curation.io.filesystem import Resolver  # noqa: E402
from curation.job import preflight  # noqa: E402


def rss_mb(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "manifest_1m.json"))
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="manifest-bench-")
    n = args.rows
    rng = np.random.default_rng(0)
    manifest = os.path.join(folder, "manifest.parquet")
    pq.write_table(pa.table({
        "uri": [f"s3://never-listed-bucket/images/{i:08d}.jpg" for i in range(n)],
        "label": pa.array(np.array(["cat", "dog", "bird", "fish"])[rng.integers(0, 4, n)]),
        "camera": pa.array(rng.integers(0, 12, n).astype(np.int32)),
    }), manifest)
    config = load_config(data={"input": {"manifest": manifest}, "output": {"uri": os.path.join(folder, "out")},
                               "embedder": {"model": "thumbnail", "weights": "none"}})
    before = rss_mb("VmRSS")
    start = time.perf_counter()
    plan = preflight(config, Resolver())
    seconds = time.perf_counter() - start
    row = {"rows": n, "inputs": plan.count, "preflight_s": round(seconds, 2), "rss_before_mb": round(before),
           "peak_mb": round(rss_mb("VmHWM")), "inputs_table_mb": round(plan.inputs.nbytes / 2**20, 1),
           "bytes_per_row_table": round(plan.inputs.nbytes / n, 1), "listing": "none (manifest)"}
    print(" | ".join(row))
    print(" | ".join(str(v) for v in row.values()))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump({"machine": "2-core dev box", **row}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
