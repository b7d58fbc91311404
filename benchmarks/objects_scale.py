"""Object-level curation at scale, in embeddings mode (issue 37): a detection run of N images x
P boxes (``input.embeddings`` + ``input.object_embeddings``) beside an image run of N x P items
(``input.embeddings``) on the same machine, in the same session.

Both runs see the same N x P clustered vectors (the boxes', as the image run's items; classes =
clusters mod C, a share of labels swapped); the detection run adds N image vectors. Each run is
the ``curation run`` command in its own process; the driver's peak memory (VmHWM of that
process, sampled each second) and the wall time are recorded, with run.json's phase timings.
``--slope M`` adds a detection run of M images to give the driver's bytes per box between the
two sizes (the way ``../shared/tools/driver-memory`` gives bytes per item). Prints a table,
writes JSON.

    python benchmarks/objects_scale.py --images 200000 --per-image 6 --slope 50000
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
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import save_json  # noqa: E402

CHUNK = 50_000


def write_sets(work: str, n_images: int, per_image: int, d: int, classes: int, swap: float, seed: int = 0) -> dict:
    """``images.parquet`` (N image vectors), ``objects.parquet`` (N x P boxes) and
    ``items.parquet`` (the same N x P vectors as image items)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes * 4, d)).astype(np.float32)
    writers = {}
    n_boxes = n_images * per_image
    for start in range(0, n_boxes, CHUNK):
        stop = min(n_boxes, start + CHUNK)
        m = stop - start
        cluster = rng.integers(len(centres), size=m)
        x = centres[cluster] + 1.5 * rng.normal(size=(m, d)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        labels = cluster % classes
        swapped = rng.random(m) < swap
        labels[swapped] = (labels[swapped] + rng.integers(1, classes, int(swapped.sum()))) % classes
        image = np.arange(start, stop) // per_image
        slot = np.arange(start, stop) % per_image
        emb = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), d)
        uris = pa.array([f"s3://lake/img/{i:09d}.jpg" for i in image])
        tables = {
            "objects": pa.table({"uri": uris, "bbox": pa.array([[8.0 + 70 * s, 16.0, 60.0, 48.0] for s in slot],
                                                               pa.list_(pa.float64(), 4)),
                                 "label": pa.array([f"c{k}" for k in labels]), "embedding": emb}),
            "items": pa.table({"uri": pa.array([f"s3://lake/box/{i:010d}.jpg" for i in range(start, stop)]),
                               "label": pa.array([f"c{k}" for k in labels]), "embedding": emb}),
        }
        for name, table in tables.items():
            if name not in writers:
                writers[name] = pq.ParquetWriter(os.path.join(work, f"{name}.parquet"), table.schema)
            writers[name].write_table(table, row_group_size=16384)
    for start in range(0, n_images, CHUNK):
        stop = min(n_images, start + CHUNK)
        x = rng.normal(size=(stop - start, d)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        table = pa.table({"uri": pa.array([f"s3://lake/img/{i:09d}.jpg" for i in range(start, stop)]),
                          "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), d)})
        if "images" not in writers:
            writers["images"] = pq.ParquetWriter(os.path.join(work, "images.parquet"), table.schema)
        writers["images"].write_table(table, row_group_size=16384)
    for writer in writers.values():
        writer.close()
    return {"boxes": n_boxes, "images": n_images}


def run(work: str, name: str, inputs: dict) -> dict:
    """One ``curation run`` in its own process: wall time, the driver's peak, run.json timings."""
    out = os.path.join(work, f"out-{name}")
    config = os.path.join(work, f"{name}.json")
    with open(config, "w") as fh:
        json.dump({"input": inputs, "output": {"uri": out}, "knn": {"nprobe": 16},
                   "selections": [{"name": "clean", "mode": "clean"}]}, fh)
    start = time.perf_counter()
    log = open(os.path.join(work, f"{name}.log"), "w")
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "curation"), "run", "--config", config],
                            stdout=log, stderr=subprocess.STDOUT)
    peak = 0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as fh:
                peak = max(peak, next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM")))
        except (OSError, StopIteration):
            pass
        time.sleep(1)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"run {name} failed ({proc.returncode}); see {log.name}")
    from curation.published_run import latest_run_id

    latest = latest_run_id(open(os.path.join(out, "latest"), "rb").read())
    info = json.load(open(os.path.join(out, latest, "run.json")))
    shutil.rmtree(out, ignore_errors=True)
    return {"wall_s": round(wall, 1), "driver_peak_mib": round(peak / 2**20), "timings_s": info.get("timings_s"),
            "objects": {k: info.get("objects", {}).get(k) for k in ("annotations", "ok", "rejected")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200_000)
    parser.add_argument("--per-image", type=int, default=6)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--swap", type=float, default=0.05)
    parser.add_argument("--slope", type=int, default=0, help="a second, smaller detection run of this many images")
    parser.add_argument("--image-from", default=None,
                        help="take the image run from this earlier JSON of the same machine and session")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "curation-bench-objects-scale"))
    parser.add_argument("--out", default="benchmarks/results/objects-scale.json")
    args = parser.parse_args()
    results = {"args": vars(args)}
    sizes = [args.images] + ([args.slope] if args.slope else [])
    for n in sizes:
        work = os.path.join(args.work, str(n))
        os.makedirs(work, exist_ok=True)
        t = time.perf_counter()
        counts = write_sets(work, n, args.per_image, args.d, args.classes, args.swap)
        print(f"wrote {n} images x {args.per_image} boxes ({counts['boxes']}) x {args.d} in "
              f"{time.perf_counter() - t:.0f} s", flush=True)
        detection = run(work, "detection", {"embeddings": os.path.join(work, "images.parquet"),
                                            "object_embeddings": os.path.join(work, "objects.parquet")})
        print(f"  detection run: {detection['wall_s']} s, driver {detection['driver_peak_mib']} MiB", flush=True)
        results[f"detection_{n}"] = detection
        if n == args.images and args.image_from:
            results["image"] = json.load(open(args.image_from))["image"]
            results["image_from"] = args.image_from
        elif n == args.images:
            image = run(work, "image", {"embeddings": os.path.join(work, "items.parquet")})
            print(f"  image run of {counts['boxes']} items: {image['wall_s']} s, driver {image['driver_peak_mib']} MiB",
                  flush=True)
            results["image"] = image
        shutil.rmtree(work, ignore_errors=True)
    big = results[f"detection_{args.images}"]
    rows = [("detection / image run wall time", f"{big['wall_s'] / results['image']['wall_s']:.2f}x"),
            ("detection run", f"{big['wall_s']} s, driver peak {big['driver_peak_mib']} MiB"),
            ("image run", f"{results['image']['wall_s']} s, driver peak {results['image']['driver_peak_mib']} MiB")]
    if args.slope:
        small = results[f"detection_{args.slope}"]
        boxes = (args.images - args.slope) * args.per_image
        per_box = (big["driver_peak_mib"] - small["driver_peak_mib"]) * 2**20 / boxes
        results["driver_bytes_per_box"] = round(per_box)
        rows.append(("driver bytes per box (slope)", f"{per_box:.0f}"))
        projected = big["driver_peak_mib"] + per_box * 9 * args.images * args.per_image / 2**20
        results["driver_peak_at_10x_mib"] = round(projected)
        rows.append(("driver peak projected at 10x", f"{projected / 1024:.1f} GiB"))
    for key, value in rows:
        print(f"{key:36s} {value}")
    save_json(args.out, results)


if __name__ == "__main__":
    main()
