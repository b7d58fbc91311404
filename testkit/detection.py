"""Detection data sets with known truth, built on the fly (no detection set is on disk).

Objects are pasted at known boxes on textured backgrounds, several per image: CIFAR-10 **test**
photos (the repository's encoder was trained on CIFAR-10 train) when ``../shared/data`` is
there, else drawn shapes (so the object path is tested without it). The annotations are the
true boxes with planted errors, written as COCO (``annotations.json``) and as YOLO
(``data.yaml`` + ``labels/``); a simulated detector's boxes go to ``predictions.json`` (COCO
results format).

Planted errors, each recorded in the returned truth by annotation id (or object, for the
dropped ones):

* ``swapped``: the annotation names another class;
* ``misplaced``: the box shifted by 35-60% of its size, or scaled by 0.55 or 1.7;
* ``dropped``: a real object with no annotation (the detector may still find it: overlooked);
* ``duplicate``: a second annotation of an object already boxed (same class, jittered 3%);
* ``spurious``: a box on background where no object is.

The detector finds each real object with probability ``detect_rate`` (its box jittered by ~5%
of its size) and adds ``false_positives`` boxes per image on background. Its class scores are a
noisy oracle unless ``classify`` is given: a function from a list of crops (H, W, 3 uint8) to
an (n, classes) probability matrix -- a real classifier over the crops.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
SHAPES = ("circle", "square", "triangle", "cross")
ERROR_KINDS = ("swapped", "misplaced", "dropped", "duplicate", "spurious")
SCORED_KINDS = ("swapped", "misplaced", "duplicate", "spurious")  # errors on annotated boxes


@dataclass
class DetectionSet:
    root: str
    classes: list[str]
    objects: list[dict]  # the truth: {"file_name", "object", "label", "bbox"} per real object
    errors: dict[str, list] = field(default_factory=dict)  # kind -> annotation ids (dropped: object ids)
    annotation_of: dict[int, int] = field(default_factory=dict)  # annotation id -> the object it boxes

    @property
    def images(self) -> str:
        return os.path.join(self.root, "images")


def object_sources(source: str, n: int, rng: np.random.Generator) -> tuple[list[np.ndarray], list[str]]:
    """``n`` object patches (uint8 RGB) and their classes: CIFAR-10 test photos, or shapes."""
    if source == "cifar":
        path = os.path.join(SHARED_DATA, "cifar10", "test.tar.gz")
        with tarfile.open(path) as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")),
                             key=lambda m: m.name)
            picked = [members[i] for i in np.sort(rng.choice(len(members), n, replace=n > len(members)))]
            patches = [np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")) for m in picked]
            return patches, [m.name.split("/")[-2] for m in picked]
    if source == "mnist":
        raw = gzip.open(os.path.join(SHARED_DATA, "mnist", "t10k-images-idx3-ubyte.gz")).read()
        digits = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)
        labels = np.frombuffer(gzip.open(os.path.join(SHARED_DATA, "mnist", "t10k-labels-idx1-ubyte.gz")).read(),
                               np.uint8, offset=8)
        idx = rng.choice(len(digits), n, replace=False)
        return [np.repeat(digits[i][:, :, None], 3, axis=2) for i in idx], [f"digit{labels[i]}" for i in idx]
    if source != "shapes":
        raise ValueError(f"source: expected cifar, mnist or shapes, got {source!r}")
    patches, labels = [], []
    for _ in range(n):
        kind = SHAPES[int(rng.integers(len(SHAPES)))]
        canvas = Image.new("RGB", (32, 32), tuple(int(v) for v in rng.integers(0, 80, 3)))
        draw = ImageDraw.Draw(canvas)
        colour = tuple(int(v) for v in rng.integers(120, 256, 3))
        if kind == "circle":
            draw.ellipse((3, 3, 28, 28), fill=colour)
        elif kind == "square":
            draw.rectangle((5, 5, 26, 26), fill=colour)
        elif kind == "triangle":
            draw.polygon([(16, 3), (29, 28), (3, 28)], fill=colour)
        else:
            draw.rectangle((12, 2, 19, 29), fill=colour)
            draw.rectangle((2, 12, 29, 19), fill=colour)
        patches.append(np.asarray(canvas))
        labels.append(kind)
    return patches, labels


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A smooth colour gradient with noise: textured, but unlike any object."""
    gy, gx = np.mgrid[0:height, 0:width].astype(np.float32)
    a, b = rng.uniform(60, 200, 3), rng.uniform(-0.4, 0.4, (2, 3))
    image = a + gx[..., None] * b[0] + gy[..., None] * b[1] + rng.normal(0, 12, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _free_spot(rng, width, height, size, taken, tries=60):
    for _ in range(tries):
        x, y = int(rng.integers(0, width - size)), int(rng.integers(0, height - size))
        if all(x + size <= tx or tx + ts <= x or y + size <= ty or ty + ts <= y for tx, ty, ts in taken):
            return x, y
    return None


def make_detection_set(root: str, *, n_images: int = 40, seed: int = 0, source: str = "shapes",
                       objects_per_image: tuple[int, int] = (2, 5), image_size: tuple[int, int] = (192, 144),
                       object_size: tuple[int, int] = (28, 56), error_rate: dict[str, float] | None = None,
                       detect_rate: float = 0.92, false_positives: float = 0.3, classify=None,
                       detector_boost: float = 8.0) -> DetectionSet:
    """Write the set under ``root`` (``images/``, ``annotations.json``, ``data.yaml`` +
    ``labels/``, ``predictions.json``) and return its truth."""
    rng = np.random.default_rng(seed)
    rates = {"swapped": 0.06, "misplaced": 0.06, "dropped": 0.05, "duplicate": 0.04, "spurious": 0.04,
             **(error_rate or {})}
    width, height = image_size
    counts = rng.integers(objects_per_image[0], objects_per_image[1] + 1, n_images)
    patches, patch_labels = object_sources(source, int(counts.sum()), rng)
    classes = sorted(set(patch_labels))
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "labels"), exist_ok=True)
    truth = DetectionSet(root, classes, [], {k: [] for k in ERROR_KINDS})
    images, annotations, predictions, crops = [], [], [], []
    next_patch = 0

    def annotate(image_id, label, box, obj):
        annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": classes.index(label) + 1,
                            "bbox": [round(float(v), 2) for v in box], "area": round(float(box[2] * box[3]), 2),
                            "iscrowd": 0})
        if obj is not None:
            truth.annotation_of[len(annotations)] = obj
        return len(annotations)

    for i in range(n_images):
        canvas = _background(rng, width, height)
        file_name = f"img{i:05d}.jpg"
        image_id = i + 1
        taken = []
        for _ in range(int(counts[i])):
            patch, label = patches[next_patch], patch_labels[next_patch]
            next_patch += 1
            size = int(rng.integers(object_size[0], object_size[1] + 1))
            spot = _free_spot(rng, width, height, size, taken)
            if spot is None:
                continue
            x, y = spot
            taken.append((x, y, size))
            canvas[y:y + size, x:x + size] = np.asarray(Image.fromarray(patch).resize((size, size), Image.BILINEAR))
            obj = len(truth.objects)
            box = np.array([x, y, size, size], np.float64)
            truth.objects.append({"file_name": file_name, "object": obj, "label": label, "bbox": box.tolist()})
            if rng.random() < detect_rate:  # the detector
                jitter = rng.normal(0, 0.05 * size, 4)
                crops.append(canvas[y:y + size, x:x + size].copy())
                predictions.append({"image_id": image_id, "file_name": file_name,
                                    "bbox": (box + jitter).round(2).tolist(), "true_label": label})
            roll = rng.random()
            if roll < rates["dropped"]:
                truth.errors["dropped"].append(obj)
                continue
            given, kind = label, None
            if roll < rates["dropped"] + rates["swapped"]:
                given = classes[(classes.index(label) + int(rng.integers(1, len(classes)))) % len(classes)]
                kind = "swapped"
            elif roll < rates["dropped"] + rates["swapped"] + rates["misplaced"]:
                if rng.random() < 0.5:
                    # towards the image's centre, so that the edge never cuts the shift short
                    toward = np.where([x + size / 2 < width / 2, y + size / 2 < height / 2], 1, -1)
                    shift = rng.uniform(0.35, 0.6, 2) * size * toward
                    box = np.array([x + shift[0], y + shift[1], size, size])
                else:
                    scale = rng.choice([0.55, 1.7])
                    box = np.array([x + size * (1 - scale) / 2, y + size * (1 - scale) / 2, size * scale, size * scale])
                box[:2] = np.clip(box[:2], 0, [width - box[2], height - box[3]])
                kind = "misplaced"
            ann = annotate(image_id, given, box, obj)
            if kind:
                truth.errors[kind].append(ann)
            if rng.random() < rates["duplicate"]:
                truth.errors["duplicate"].append(annotate(image_id, label, box + rng.normal(0, 0.03 * size, 4), obj))
        for _ in range(int(rng.random() < rates["spurious"] * 5)):  # about rates["spurious"] of the boxes
            size = int(rng.integers(object_size[0], object_size[1] + 1))
            spot = _free_spot(rng, width, height, size, taken)
            if spot is not None:
                taken.append((*spot, size))
                label = classes[int(rng.integers(len(classes)))]
                truth.errors["spurious"].append(annotate(image_id, label, [*spot, size, size], None))
        for _ in range(int(rng.poisson(false_positives))):
            size = int(rng.integers(object_size[0], object_size[1] + 1))
            spot = _free_spot(rng, width, height, size, taken)
            if spot is not None:
                crops.append(canvas[spot[1]:spot[1] + size, spot[0]:spot[0] + size].copy())
                predictions.append({"image_id": image_id, "file_name": file_name,
                                    "bbox": [*spot, size, size], "true_label": None})
        Image.fromarray(canvas).save(os.path.join(root, "images", file_name), quality=92)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})

    probs = classify(crops) if classify is not None and crops else _oracle(predictions, classes, rng,
                                                                            detector_boost)
    for pred, p in zip(predictions, probs):
        label = pred.pop("true_label")
        best = int(np.argmax(p))
        pred["category_id"] = best + 1
        pred["score"] = round(float(p[best]) * (0.95 if label is not None else 0.5), 4)
        pred["probabilities"] = [round(float(v), 4) for v in p]
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(classes)]
    with open(os.path.join(root, "annotations.json"), "w") as fh:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, fh)
    with open(os.path.join(root, "predictions.json"), "w") as fh:
        json.dump(predictions, fh)
    _write_yolo(root, images, annotations, classes)
    return truth


def _oracle(predictions: list[dict], classes: list[str], rng, boost: float = 8.0) -> np.ndarray:
    """A detector's class scores without a classifier: right 85% of the time, confident when
    right (the class it names gets ``boost`` more Dirichlet weight than the others' 0.5: 8 gives
    a median top probability near 0.65; 200, near 0.98, a detector sure of itself)."""
    out = np.empty((len(predictions), len(classes)))
    for i, pred in enumerate(predictions):
        alpha = np.full(len(classes), 0.5)
        if pred["true_label"] is not None:
            right = classes.index(pred["true_label"])
            alpha[right if rng.random() < 0.85 else int(rng.integers(len(classes)))] += boost
        out[i] = rng.dirichlet(alpha)
    return out


def _write_yolo(root: str, images: list[dict], annotations: list[dict], classes: list[str]) -> None:
    with open(os.path.join(root, "data.yaml"), "w") as fh:
        fh.write("names:\n" + "".join(f"  {k}: {name}\n" for k, name in enumerate(classes)))
    by_image: dict[int, list[str]] = {image["id"]: [] for image in images}
    size = {image["id"]: (image["width"], image["height"]) for image in images}
    for ann in annotations:
        w, h = size[ann["image_id"]]
        x, y, bw, bh = ann["bbox"]
        by_image[ann["image_id"]].append(f"{ann['category_id'] - 1} {(x + bw / 2) / w:.6f} {(y + bh / 2) / h:.6f} "
                                         f"{bw / w:.6f} {bh / h:.6f}")
    for image in images:
        name = os.path.splitext(image["file_name"])[0] + ".txt"
        with open(os.path.join(root, "labels", name), "w") as fh:
            fh.write("".join(line + "\n" for line in by_image[image["id"]]))


def auroc(bad: np.ndarray, good: np.ndarray) -> float:
    """P(a bad item scores lower than a good one), ties counting half: low score = error."""
    if not len(bad) or not len(good):
        return float("nan")
    bad, good = np.asarray(bad, np.float64)[:, None], np.asarray(good, np.float64)[None]
    return float((bad < good).mean() + 0.5 * (bad == good).mean())


def evaluate_boxes(objects, samples, truth: DetectionSet) -> dict:
    """How a detection run's ``objects`` / ``samples`` tables (pyarrow) rank the planted box
    errors of ``truth``: per kind (against the clean annotated boxes) the AUROC of
    ``box_quality``, precision at the planted count, the flag's precision and recall; the
    AUROC of ``box_label_quality`` for swapped classes; per image, of ``object_quality`` for
    "holds any planted error" (images with a dropped object left out)."""
    rows = objects.to_pylist()
    by_ann = {int(r["annotation_id"]): r for r in rows if r["annotation_id"].isdigit()}
    planted = {kind: set(truth.errors[kind]) for kind in SCORED_KINDS}
    bad_any = set().union(*planted.values())
    clean = [a for a, r in by_ann.items() if a not in bad_any and r["box_quality"] is not None]
    out = {}
    for kind in SCORED_KINDS:
        ids = [a for a in planted[kind] if a in by_ann and by_ann[a]["box_quality"] is not None]
        bad_q = np.array([by_ann[a]["box_quality"] for a in ids])
        good_q = np.array([by_ann[a]["box_quality"] for a in clean])
        row = {"planted": len(ids), "auroc_box_quality": auroc(bad_q, good_q)}
        if kind == "swapped":
            row["auroc_box_label_quality"] = auroc(np.array([by_ann[a]["box_label_quality"] for a in ids]),
                                                   np.array([by_ann[a]["box_label_quality"] for a in clean]))
            flagged = {a for a, r in by_ann.items() if r["is_box_mislabel"]}
        elif kind == "duplicate":
            flagged = {a for a, r in by_ann.items() if r["is_duplicate_box"]}
        elif kind == "spurious":
            flagged = {a for a, r in by_ann.items() if r["is_spurious_box"]}
        else:
            flagged = set()
        pool = ids + clean
        worst = sorted(pool, key=lambda a: by_ann[a]["box_quality"])[:len(ids)]
        row["precision_at_planted"] = len(set(worst) & set(ids)) / max(len(ids), 1)
        if flagged:
            row["flag_precision"] = len(flagged & set(ids)) / len(flagged)
            row["flag_recall"] = len(flagged & set(ids)) / max(len(ids), 1)
        out[kind] = row
    image_bad = {by_ann[a]["uri"] for a in bad_any if a in by_ann}
    dropped_images = {truth.objects[o]["file_name"] for o in truth.errors["dropped"]}
    q = [(r["uri"], r["object_quality"]) for r in samples.to_pylist() if r["object_quality"] is not None]
    bad = np.array([v for u, v in q if u in image_bad])
    good = np.array([v for u, v in q if u not in image_bad and os.path.basename(u) not in dropped_images])
    out["image_has_box_error"] = {"images": len(q), "with_error": len(bad), "auroc_object_quality": auroc(bad, good)}
    predicted = [r for r in rows if r["source"] == "prediction"]
    if predicted or any(r["box_location_quality"] is not None for r in rows):
        out["overlooked"] = _overlooked(predicted, truth)
    return out


def _overlooked(predicted: list[dict], truth: DetectionSet) -> dict:
    """Among every prediction of the detector (``predictions.json``): is it a dropped object
    (IoU at least 0.5 with one's true box)? Scored by its ``source = prediction`` row's
    ``overlooked_quality``, 1 where it has none (the run found it covered or unsure)."""
    with open(os.path.join(truth.root, "predictions.json")) as fh:
        predictions = json.load(fh)
    dropped = {}
    for o in truth.errors["dropped"]:
        dropped.setdefault(truth.objects[o]["file_name"], []).append(truth.objects[o]["bbox"])
    rows = {(os.path.basename(r["uri"]), tuple(round(v, 2) for v in r["bbox"])): r["overlooked_quality"]
            for r in predicted}
    labels, scores = [], []
    for pred in predictions:
        key = (pred["file_name"], tuple(round(float(v), 2) for v in pred["bbox"]))
        truths = dropped.get(pred["file_name"], [])
        hit = any(box_iou(pred["bbox"], t) >= 0.5 for t in truths)
        labels.append(hit)
        scores.append(rows.get(key, 1.0))
    labels, scores = np.array(labels, bool), np.array(scores, np.float64)
    return {"predictions": len(labels), "on_dropped_objects": int(labels.sum()), "rows": len(predicted),
            "auroc_overlooked_quality": auroc(scores[labels], scores[~labels]),
            "flag_recall": float(np.mean(scores[labels] < 0.5)) if labels.any() else float("nan")}


def box_iou(a, b) -> float:
    ax1, ay1, bx1, by1 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    inter = max(0.0, min(ax1, bx1) - max(a[0], b[0])) * max(0.0, min(ay1, by1) - max(a[1], b[1]))
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0
