"""Helpers shared by the benchmarks: process-tree memory, synthetic embeddings, tables, JSON."""

from __future__ import annotations

import json
import os
import threading

import numpy as np


def process_tree_rss() -> int:
    """RSS of this process and all its descendants (Ray workers included), in bytes."""
    total = 0
    pids = [os.getpid()]
    seen = set()
    while pids:
        pid = pids.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            with open(f"/proc/{pid}/task/{pid}/children") as fh:
                pids.extend(int(c) for c in fh.read().split())
        except OSError:
            continue
    return total


class PeakSampler:
    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, process_tree_rss())

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()


def write_embeddings(path: str, n: int, d: int, clusters: int, classes: int, flip: float, dups: float, seed: int = 0):
    """Clustered vectors; labels = cluster mod classes, a share flipped; the last ``dups`` share
    of rows are near copies (cosine ~0.99) of rows from the first chunk."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, d)).astype(np.float32)
    assign = rng.integers(clusters, size=n)
    labels = (assign % classes).astype(np.int64)
    flipped = rng.random(n) < flip
    labels[flipped] = (labels[flipped] + rng.integers(1, classes, flipped.sum())) % classes
    chunk = 100_000
    n_dups = int(n * dups)
    dup_items = np.arange(n - n_dups, n)
    dup_src = rng.choice(min(chunk, n - n_dups), n_dups, replace=False)
    labels[dup_items] = labels[dup_src]
    flipped[dup_items] = flipped[dup_src]
    os.makedirs(path, exist_ok=True)
    first = None
    for part, start in enumerate(range(0, n, chunk)):
        stop = min(n, start + chunk)
        x = centers[assign[start:stop]] + rng.normal(size=(stop - start, d)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        if first is None:
            first = x.copy()
        idx = np.arange(start, stop)
        is_dup = idx >= n - n_dups
        if is_dup.any():
            src = dup_src[idx[is_dup] - (n - n_dups)]
            copy = first[src] + (0.15 / np.sqrt(d)) * rng.normal(size=(len(src), d)).astype(np.float32)
            x[is_dup] = copy / np.linalg.norm(copy, axis=1, keepdims=True)
        table = pa.table({
            "uri": [f"s3://lake/img/{i:08d}.jpg" for i in idx],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), d),
            "label": [f"class{c}" for c in labels[start:stop]],
        })
        pq.write_table(table, os.path.join(path, f"part-{part:05d}.parquet"))
    return flipped, dup_src, dup_items


def print_table(rows: list[dict], columns: list[str]) -> None:
    """A plain text table of ``rows`` (dicts) over ``columns``."""
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))


def save_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1)
