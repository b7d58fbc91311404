"""Object-level curation (issue 37): the job itself in a detection run, on sets with planted box
errors (``testkit.detection``: CIFAR-10 *test* photos pasted at known boxes, or drawn shapes),
once with ``thumbnail`` and once with the trained encoder (``benchmarks/models/cifar10_cnn.pt``).

Reported per error kind, each against the clean annotated boxes: the AUROC of ``box_quality``
(low = error) and of ``box_label_quality``, precision at the planted count, the flags' precision
and recall; per image, the AUROC of ``object_quality`` for "holds any box error"; and the
objects phase's wall time beside the run's. Prints a table, writes JSON.

    .venv/bin/python benchmarks/objects.py [--images 300] [--source cifar] [--out benchmarks/objects.json]
    .venv/bin/python benchmarks/objects.py --decode-cost
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
ENCODER = os.path.join(ROOT, "benchmarks", "models", "cifar10_cnn.pt")


def run(source: str, n_images: int, model: str, seed: int, keep: str | None = None,
        predictions: bool = False, peer: bool = False, detector_boost: float = 8.0) -> dict:
    from curation.config import load_config
    from curation.job import run_job
    from testkit.detection import evaluate_boxes, make_detection_set

    with tempfile.TemporaryDirectory() as scratch:
        tmp = os.path.join(keep, model) if keep else scratch
        truth = make_detection_set(os.path.join(tmp, "set"), n_images=n_images, seed=seed, source=source,
                                   image_size=(256, 192), object_size=(32, 72), detector_boost=detector_boost)
        embedder = {"model": "thumbnail"} if model == "thumbnail" else {"model": "torchscript", "weights": ENCODER,
                                                                        "image_size": 32}
        inputs = {"images": truth.images, "annotations": os.path.join(truth.root, "annotations.json")}
        if predictions:
            inputs["predictions"] = os.path.join(truth.root, "predictions.json")
        config = load_config(data={"input": inputs,
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
        if peer:
            start = time.perf_counter()
            scores["objectlab"] = objectlab(truth.root, truth)
            scores["objectlab"]["wall_s"] = round(time.perf_counter() - start, 1)
        return scores


def objectlab(root: str, truth) -> dict:
    """ObjectLab (cleanlab 2.9's ``object_detection``) fed the same annotations and predictions:
    per annotated box its swap and bad-location scores, per prediction its overlooked score,
    per image its label quality; the AUROCs as :func:`testkit.detection.evaluate_boxes` counts
    them (swapped: the swap score; misplaced: bad location; duplicate and spurious: the lower
    of the two, ObjectLab's own per-box view; "box": that lower score for every kind)."""
    from cleanlab.object_detection.rank import (compute_badloc_box_scores, compute_overlooked_box_scores,
                                                compute_swap_box_scores, get_label_quality_scores)

    from testkit.detection import SCORED_KINDS, auroc

    doc = json.load(open(os.path.join(root, "annotations.json")))
    predictions = json.load(open(os.path.join(root, "predictions.json")))
    k = len(doc["categories"])
    images = [image["file_name"] for image in doc["images"]]
    by_image = {name: [] for name in images}
    for ann in doc["annotations"]:
        by_image[images[ann["image_id"] - 1]].append(ann)
    preds = {name: [] for name in images}
    for pred in predictions:
        preds[pred["file_name"]].append(pred)

    def corners(box):
        x, y, w, h = box
        return [x, y, x + w, y + h]

    labels, predicted, entry_owner = [], [], {}
    for name in images:
        anns = by_image[name]
        labels.append({"bboxes": np.array([corners(a["bbox"]) for a in anns], np.float64).reshape(-1, 4),
                       "labels": np.array([a["category_id"] - 1 for a in anns], np.int64)})
        # Each box in every class's list with the detector's probability of that class (its
        # per-class scores, as a detector's per-class output gives them); ObjectLab ignores
        # entries under its own low-probability threshold.
        per_class = [np.zeros((0, 5), np.float32) for _ in range(k)]
        owners = [[] for _ in range(k)]
        for index, pred in enumerate(preds[name]):
            probabilities = pred.get("probabilities") or [
                pred["score"] if c == pred["category_id"] - 1 else 0.0 for c in range(k)]
            for c, value in enumerate(probabilities):
                if value >= 0.01:
                    row = np.array([[*corners(pred["bbox"]), value]], np.float32)
                    per_class[c] = np.vstack([per_class[c], row])
                    owners[c].append(index)
        entry_owner[name] = [i for c in range(k) for i in owners[c]]
        array = np.empty(k, dtype=object)
        array[:] = per_class
        predicted.append(array)
    swap = compute_swap_box_scores(labels=labels, predictions=predicted)
    badloc = compute_badloc_box_scores(labels=labels, predictions=predicted)
    overlooked = compute_overlooked_box_scores(labels=labels, predictions=predicted)
    image_quality = get_label_quality_scores(labels, predicted, verbose=False)
    score = {}
    for name, s_img, b_img in zip(images, swap, badloc):
        for ann, s, b in zip(by_image[name], s_img, b_img):
            score[ann["id"]] = (float(s), float(b))
    bad_any = set().union(*(set(truth.errors[kind]) for kind in SCORED_KINDS))
    clean = [a for a in score if a not in bad_any]
    out = {}
    for kind in SCORED_KINDS:
        ids = [a for a in truth.errors[kind] if a in score]
        pick = {"swapped": lambda v: v[0], "misplaced": lambda v: v[1]}.get(kind, lambda v: min(v))
        out[kind] = {"auroc_own_score": auroc(np.array([pick(score[a]) for a in ids]),
                                              np.array([pick(score[a]) for a in clean])),
                     "auroc_box": auroc(np.array([min(score[a]) for a in ids]), np.array([min(score[a]) for a in clean]))}
    dropped_images = {truth.objects[o]["file_name"] for o in truth.errors["dropped"]}
    bad_images = {images[next(a for a in doc["annotations"] if a["id"] == i)["image_id"] - 1] for i in bad_any}
    quality = dict(zip(images, image_quality))
    out["image_has_box_error"] = {"auroc": auroc(np.array([quality[n] for n in images if n in bad_images]),
                                                 np.array([quality[n] for n in images if n not in bad_images
                                                           and n not in dropped_images]))}
    # overlooked: every prediction, is it on a dropped object (as evaluate_boxes counts it)
    from testkit.detection import box_iou

    truths = {}
    for o in truth.errors["dropped"]:
        truths.setdefault(truth.objects[o]["file_name"], []).append(truth.objects[o]["bbox"])
    hits, scores = [], []
    for name, per_image in zip(images, overlooked):
        lowest = {}  # a prediction's lowest overlooked score over its class entries
        for index, value in zip(entry_owner[name], per_image):
            value = float(value) if np.isfinite(value) else 1.0
            lowest[index] = min(lowest.get(index, 1.0), value)
        for index, pred in enumerate(preds[name]):
            hits.append(any(box_iou(pred["bbox"], t) >= 0.5 for t in truths.get(name, [])))
            scores.append(lowest.get(index, 1.0))
    hits, scores = np.array(hits), np.array(scores)
    out["overlooked"] = {"auroc": auroc(scores[hits], scores[~hits])}
    return out


def decode_cost(rounds: int = 20) -> dict:
    """The box-aware decode scale's cost: one 1920x1080 photo-like JPEG decoded by the decode
    stage's one-image path for the whole image alone, with one 512-px box, and with one 32-px
    box (full size: the DCT scale cannot drop), at the encoder's 32-px and resnet's 224-px input
    (median ms per image; two background squares cut beside the boxes)."""
    import io

    from PIL import Image

    from curation.stages.crops import CropJob
    from curation.stages.decode import decode_into

    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 255, (68, 120, 3), dtype=np.uint8)).resize((1920, 1080), Image.BICUBIC)
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    out = {}
    for size in (32, 224):
        for name, boxes in (("image only", None), ("one 512-px box", [[700, 300, 512, 512]]),
                            ("one 32-px box", [[900, 500, 32, 32]])):
            times = []
            job = None
            for _ in range(rounds):
                job = None if boxes is None else CropJob(np.array(boxes, float), units="pixels", image_size=size,
                                                         margin=0.1, tolerance_px=2, min_size_px=4,
                                                         out=np.empty((len(boxes) + 2, size, size, 3), np.uint8),
                                                         backgrounds=2)
                start = time.perf_counter()
                decode_into(data, image_size=size, max_pixels=10**9, background=(255, 255, 255),
                            pixels_out=np.empty((size, size, 3), np.uint8), crops=job)
                times.append(time.perf_counter() - start)
            scale = None if job is None else job.decode_scale(1920, 1080)
            out[f"{name} @ {size}px"] = {"ms": round(1000 * float(np.median(times)), 2),
                                         "decode_scale_for_boxes": None if scale is None else round(scale, 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--source", default="cifar", choices=("cifar", "shapes", "mnist"))
    parser.add_argument("--models", default="thumbnail,encoder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "objects.json"))
    parser.add_argument("--keep", help="leave the sets and runs in this folder (for a closer look)")
    parser.add_argument("--predictions", action="store_true", help="give the simulated detector's boxes too")
    parser.add_argument("--detector-boost", type=float, default=8.0,
                        help="how sure the simulated detector is of its class (8: median top probability "
                             "about 0.65; 200: about 0.98)")
    parser.add_argument("--objectlab", action="store_true",
                        help="ObjectLab (cleanlab 2.9, make bench-venv) on the same annotations and predictions")
    parser.add_argument("--decode-cost", action="store_true", help="only the box-aware decode's cost per image")
    args = parser.parse_args()
    if args.decode_cost:
        cost = decode_cost()
        for name, row in cost.items():
            print(f"{name:<28} {row['ms']:>8.2f} ms  decode scale for the boxes {row['decode_scale_for_boxes']}")
        with open(args.out, "w") as fh:
            json.dump({"decode_cost": cost}, fh, indent=1)
        return
    results = {}
    for model in args.models.split(","):
        results[model] = run(args.source, args.images, model, args.seed, args.keep, args.predictions
                             or args.objectlab, args.objectlab, args.detector_boost)
    print(f"\n{args.source}, {args.images} images")
    print(f"{'kind':<22}" + "".join(f"{m:>48}" for m in results))
    kinds = ["swapped", "misplaced", "duplicate", "spurious", "image_has_box_error"]
    kinds += ["overlooked"] if args.predictions or args.objectlab else []
    for kind in kinds:
        cells = []
        for m in results:
            r = results[m][kind]
            if kind == "overlooked":
                cells.append(f"AUROC {r['auroc_overlooked_quality']:.3f} recall {r['flag_recall']:.2f} "
                             f"(n={r['on_dropped_objects']}/{r['predictions']})")
            elif kind == "image_has_box_error":
                cells.append(f"AUROC {r['auroc_object_quality']:.3f} ({r['with_error']}/{r['images']})")
            else:
                extra = f" P@n {r['precision_at_planted']:.2f}"
                if "flag_precision" in r:
                    extra += f" flag P/R {r['flag_precision']:.2f}/{r['flag_recall']:.2f}"
                cells.append(f"AUROC {r['auroc_box_quality']:.3f}{extra} (n={r['planted']})")
        print(f"{kind:<22}" + "".join(f"{c:>48}" for c in cells))
    if args.objectlab:
        first = next(iter(results.values()))["objectlab"]
        print("\nObjectLab (cleanlab 2.9.0) on the same annotations and predictions (its own score per kind; "
              "its lower box score)")
        for kind in ("swapped", "misplaced", "duplicate", "spurious"):
            print(f"  {kind:<20} {first[kind]['auroc_own_score']:.3f}  {first[kind]['auroc_box']:.3f}")
        print(f"  {'image':<20} {first['image_has_box_error']['auroc']:.3f}")
        print(f"  {'overlooked':<20} {first['overlooked']['auroc']:.3f}   ({first['wall_s']} s)")
    for m in results:
        print(f"{m}: {results[m]['boxes']} boxes, run {results[m]['wall_s']} s, objects phase "
              f"{results[m]['objects_phase_s']} s; swapped label AUROC "
              f"{results[m]['swapped'].get('auroc_box_label_quality', float('nan')):.3f}")
    with open(args.out, "w") as fh:
        json.dump({"source": args.source, "images": args.images, "seed": args.seed, "predictions": args.predictions,
                   "detector_boost": args.detector_boost,
                   "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
