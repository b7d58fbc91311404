"""report.html at scale: page size, build time and load time in headless Chromium.

Two pages, side by side: the demo's (``make demo`` first; its newest run), and one built for a
synthetic run of ``--items`` items (default 100k: 20 clusters of 128-d vectors, the demo's
flag rates, real JPEG files behind every uri via symlinks to a few thousand rendered images) with
the default ``report`` settings, so the map sample (20k), thumbnails (5k) and galleries are the
ones a real run of that size gets.

    .venv/bin/python benchmarks/report_page.py [--items 100000] [--demo demo-output]

Prints a table and writes ``benchmarks/results/report_page.json``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from curation.config import ReportConfig, ScoresConfig  # noqa: E402
from curation.demo import CLASSES, render_scene  # noqa: E402
from curation.io.filesystem import Resolver  # noqa: E402
from curation.report import thumbnail_order  # noqa: E402
from curation.report.galleries import choose_galleries  # noqa: E402
from curation.report.map import highlight_masks, map_coordinates  # noqa: E402
from curation.report.page import render_report  # noqa: E402
from curation.report.thumbnails import fetch_thumbnails  # noqa: E402
from curation.schema import SELECTION_SCHEMA  # noqa: E402

UNIQUE_IMAGES = 2000


def synthetic_run(n: int, folder: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "real"), exist_ok=True)
    classes = np.array(list(CLASSES))
    for i in range(UNIQUE_IMAGES):
        render_scene(str(classes[i % len(classes)]), rng, 96).save(os.path.join(folder, "real", f"{i}.jpg"), quality=85)
    uris = []
    for i in range(n):
        path = os.path.join(folder, f"{i:07d}.jpg")
        os.symlink(os.path.join(folder, "real", f"{i % UNIQUE_IMAGES}.jpg"), path)
        uris.append(path)
    centres = rng.normal(size=(20, 128)).astype(np.float32)
    cluster = rng.integers(0, 20, n)
    vectors = centres[cluster] + 0.6 * rng.normal(size=(n, 128)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    labels = classes[cluster % len(classes)]
    dup_group = np.full(n, np.nan)
    dup_of = np.full(n, None, object)
    starts = rng.choice(n - 4, n // 50, replace=False)
    for g, s in enumerate(starts):
        size = int(rng.integers(2, 4))
        members = [m for m in range(s, s + size) if np.isnan(dup_group[m])]
        if len(members) < 2:
            continue
        dup_group[members] = g
        for m in members[1:]:
            dup_of[m] = uris[members[0]]
    samples = pa.table({
        "uri": uris, "label": labels, "status": ["ok"] * n, "reason": pa.nulls(n, pa.string()),
        "is_dark": rng.random(n) < 0.01, "is_bright": rng.random(n) < 0.01, "is_blurry": rng.random(n) < 0.01,
        "is_low_information": rng.random(n) < 0.015, "highlights": rng.random(n), "shadows": rng.random(n),
        "sharpness": rng.random(n), "contrast": rng.random(n),
        "dup_group": pa.array(dup_group, pa.int64(), from_pandas=True), "dup_of": pa.array(dup_of, pa.string()),
        "dup_kind": ["near"] * n, "is_suspected_mislabel": rng.random(n) < 0.03,
        "label_quality": rng.random(n).astype(np.float32), "suggested_label": labels[::-1],
        "sparseness": rng.random(n).astype(np.float32), "cluster": cluster.astype(np.int32),
    })
    edge = pa.table({"uri": uris[:200], "label": list(labels[:200]), "rank": pa.array(range(1, 201), pa.int32()),
                     "score": pa.array(np.linspace(1, 0.5, 200), pa.float32()), "reason": ["rare"] * 200},
                    schema=SELECTION_SCHEMA)
    review = edge.slice(0, 0)
    return samples, vectors, {"edge_cases": edge, "label_review": review}, {"edge_cases": "edge_cases",
                                                                              "label_review": "label_review"}


def build_page(samples, vectors, tables, modes, config: ReportConfig) -> tuple[str, dict]:
    timings = {}
    start = time.perf_counter()
    samples, map_info = map_coordinates(samples, vectors, tables, modes, config)
    timings["map_s"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    galleries = choose_galleries(samples, tables, modes, size=config.gallery_size)
    uris = thumbnail_order(samples, galleries, highlight_masks(samples, tables, modes), config.thumbnails)
    thumbnails = fetch_thumbnails(uris, Resolver(), px=config.thumbnail_px, max_pixels=10**8)
    timings["thumbnails_s"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    n = samples.num_rows
    page = render_report(run_id="bench", samples=samples, run_info={
        "counts": {"inputs": n, "ok": n, "rejected": 0}, "flags": {}, "map": map_info,
        "selections": [{"name": k, "mode": v, "rows": tables[k].num_rows, "eligible": n, "note": None}
                       for k, v in modes.items()], "embedder": {"model": "synthetic"}},
        selections=tables, modes=modes, galleries=galleries, thumbnails=thumbnails, scores_config=ScoresConfig())
    timings["render_s"] = round(time.perf_counter() - start, 1)
    timings.update(points=map_info["points"], thumbnails=len(thumbnails))
    return page, timings


def load_time(path: str) -> float:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=[
            "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page()
        start = time.perf_counter()
        page.goto("file://" + os.path.abspath(path))
        page.wait_for_function("window.curationMapReady === true", timeout=120_000)
        seconds = time.perf_counter() - start
        browser.close()
    return round(seconds, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--demo", default="demo-output")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "report_page.json"))
    args = parser.parse_args()
    rows = []
    demo = sorted(glob.glob(os.path.join(args.demo, "runs", "2*", "report.html")))
    if demo:
        info = json.load(open(os.path.join(os.path.dirname(demo[-1]), "run.json")))
        rows.append({"page": "demo", "items": info["counts"]["inputs"], "points": info["map"]["points"],
                     "thumbnails": info["map"]["thumbnails"], "MB": round(os.path.getsize(demo[-1]) / 1e6, 2),
                     "build_s": info["timings_s"].get("report_data"), "load_s": load_time(demo[-1])})
    folder = tempfile.mkdtemp(prefix="report-bench-")
    try:
        samples, vectors, tables, modes = synthetic_run(args.items, folder)
        page, timings = build_page(samples, vectors, tables, modes, ReportConfig())
        path = os.path.join(folder, "report.html")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(page)
        rows.append({"page": f"synthetic {args.items}", "items": args.items, "points": timings["points"],
                     "thumbnails": timings["thumbnails"], "MB": round(len(page.encode()) / 1e6, 2),
                     "build_s": round(timings["map_s"] + timings["thumbnails_s"] + timings["render_s"], 1),
                     "load_s": load_time(path), **{k: v for k, v in timings.items() if k.endswith("_s")}})
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    columns = ["page", "items", "points", "thumbnails", "MB", "build_s", "load_s"]
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(str(row.get(c)) for c in columns))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump({"machine": "2-core dev box, no GPU", "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
