"""Object-level curation (issue 37): the job itself in a detection run, on sets with planted box
errors (``testkit.detection``: CIFAR-10 *test* photos pasted at known boxes, or drawn shapes),
once with ``thumbnail`` and once with the trained encoder (``benchmarks/models/cifar10_cnn.pt``).

Reported per error kind, each against the clean annotated boxes: the AUROC of ``box_quality``
(low = error) and of ``box_label_quality``, precision at the planted count, the flags' precision
and recall; per image, the AUROC of ``object_quality`` for "holds any box error"; and the
objects phase's wall time beside the run's. Prints a table, writes JSON.

    .venv/bin/python benchmarks/objects.py [--images 300] [--source cifar] [--out benchmarks/objects.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
ENCODER = os.path.join(ROOT, "benchmarks", "models", "cifar10_cnn.pt")


def run(source: str, n_images: int, model: str, seed: int, keep: str | None = None) -> dict:
    from curation.config import load_config
    from curation.job import run_job
    from testkit.detection import evaluate_boxes, make_detection_set

    with tempfile.TemporaryDirectory() as scratch:
        tmp = os.path.join(keep, model) if keep else scratch
        truth = make_detection_set(os.path.join(tmp, "set"), n_images=n_images, seed=seed, source=source,
                                   image_size=(256, 192), object_size=(32, 72))
        embedder = {"model": "thumbnail"} if model == "thumbnail" else {"model": "torchscript", "weights": ENCODER,
                                                                        "image_size": 32}
        config = load_config(data={"input": {"images": truth.images,
                                             "annotations": os.path.join(truth.root, "annotations.json")},
                                   "output": {"uri": os.path.join(tmp, "out")}, "embedder": embedder,
                                   "report": {"map_method": "pca"}})
        start = time.perf_counter()
        result = run_job(config)
        wall = time.perf_counter() - start
        objects = pq.read_table(os.path.join(result.run_uri, "objects"))
        samples = pq.read_table(os.path.join(result.run_uri, "samples"), columns=["uri", "object_quality"])
        info = json.load(open(os.path.join(result.run_uri, "run.json")))
        scores = evaluate_boxes(objects, samples, truth)
        scores["boxes"] = objects.num_rows
        scores["wall_s"] = round(wall, 1)
        scores["objects_phase_s"] = info.get("timings_s", {}).get("objects")
        return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--source", default="cifar", choices=("cifar", "shapes", "mnist"))
    parser.add_argument("--models", default="thumbnail,encoder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "objects.json"))
    parser.add_argument("--keep", help="leave the sets and runs in this folder (for a closer look)")
    args = parser.parse_args()
    results = {}
    for model in args.models.split(","):
        results[model] = run(args.source, args.images, model, args.seed, args.keep)
    print(f"\n{args.source}, {args.images} images")
    print(f"{'kind':<22}" + "".join(f"{m:>48}" for m in results))
    for kind in ("swapped", "misplaced", "duplicate", "spurious", "image_has_box_error"):
        cells = []
        for m in results:
            r = results[m][kind]
            if kind == "image_has_box_error":
                cells.append(f"AUROC {r['auroc_object_quality']:.3f} ({r['with_error']}/{r['images']})")
            else:
                extra = f" P@n {r['precision_at_planted']:.2f}"
                if "flag_precision" in r:
                    extra += f" flag P/R {r['flag_precision']:.2f}/{r['flag_recall']:.2f}"
                cells.append(f"AUROC {r['auroc_box_quality']:.3f}{extra} (n={r['planted']})")
        print(f"{kind:<22}" + "".join(f"{c:>48}" for c in cells))
    for m in results:
        print(f"{m}: {results[m]['boxes']} boxes, run {results[m]['wall_s']} s, objects phase "
              f"{results[m]['objects_phase_s']} s; swapped label AUROC "
              f"{results[m]['swapped'].get('auroc_box_label_quality', float('nan')):.3f}")
    with open(args.out, "w") as fh:
        json.dump({"source": args.source, "images": args.images, "seed": args.seed, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
