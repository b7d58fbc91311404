"""A detector's boxes (``input.predictions``) beside the annotations (issue 37).

The file is COCO's results format: a JSON list of ``{"image_id" or "file_name", "bbox": [x, y,
w, h] (pixels, the stored frame), "category_id", "score"}``, each optionally with
``"probabilities"``: the detector's class probabilities, one per category in the order the
annotations list them (COCO ``categories``; YOLO ``names``). ``image_id`` and ``category_id``
are the annotations' own (YOLO: the 0-based class index; images by ``file_name``). A
prediction that cannot be used is a row with a reason; a file that cannot be read or is not a
list is exit 2 before any work.

How annotations and predictions meet, per image (:func:`match_predictions`): every usable
annotated box's best overlap (IoU) with any prediction scoring at least
``objects.prediction_min_score``:

* ``box_location_quality`` = that IoU (0 where no prediction touches the box);
  ``suggested_bbox`` = that prediction's box where the IoU is at least 0.1;
* the detector's class evidence: the matched prediction (IoU at least ``objects.match_iou``)
  gives its probability of the box's class (its ``probabilities``, else its ``score`` for its
  own class and the rest spread evenly), averaged into ``box_label_quality``;
* a prediction scoring at least ``objects.overlooked_min_score`` that no usable annotation
  covers (IoU under ``objects.covered_iou`` with every one) becomes a ``source = prediction``
  row of ``objects/``: ``overlooked_quality = 1 - score`` (low = a real object is likely not
  annotated).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa

from curation.annotations import Annotations, AnnotationsError, box_matrix, escapes_root, normal_name
from curation.io.filesystem import Location, read_bytes
from curation.item_key import object_ids
from curation.schema import STATUS_OK, STATUS_REJECTED, is_ok

log = logging.getLogger(__name__)

SUGGEST_IOU = 0.1  # a prediction overlapping a box at least this much is its suggested box
PREDICTION_COLUMNS = pa.schema([
    ("file_name", pa.string()), ("prediction_id", pa.string()), ("label", pa.string()),
    ("bbox", pa.list_(pa.float64(), 4)), ("score", pa.float64()), ("probabilities", pa.list_(pa.float32())),
    ("status", pa.string()), ("reason", pa.string()),
])


def read_predictions(location: Location, annotations: Annotations) -> pa.Table:
    """``input.predictions`` as rows (``PREDICTION_COLUMNS``), a bad prediction a rejected row
    with its reason; raises :class:`AnnotationsError` for a file that cannot be read or parsed."""
    try:
        doc = json.loads(read_bytes(location).decode("utf-8-sig"))
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotationsError(f"input.predictions: {location.uri}: cannot read ({exc})") from None
    except ValueError as exc:
        raise AnnotationsError(f"input.predictions: {location.uri}: not JSON ({exc})") from None
    if not isinstance(doc, list):
        raise AnnotationsError(f"input.predictions: {location.uri}: expected a JSON list of COCO results "
                               f"(image_id or file_name, bbox, category_id, score), got {type(doc).__name__}")
    order = list(annotations.category_ids)  # the categories' order, for `probabilities`
    rows = {name: [] for name in PREDICTION_COLUMNS.names}
    for i, pred in enumerate(doc):
        file_name, label, bbox, score, probabilities, problem = _one(pred, annotations, order)
        rows["file_name"].append(file_name)
        rows["prediction_id"].append(f"prediction:{i}")
        rows["label"].append(label)
        rows["bbox"].append(bbox)
        rows["score"].append(score)
        rows["probabilities"].append(probabilities)
        rows["status"].append(STATUS_REJECTED if problem else STATUS_OK)
        rows["reason"].append(problem)
    table = pa.table(rows, schema=PREDICTION_COLUMNS)
    log.info("predictions: %d boxes, %d usable", table.num_rows, int(is_ok(table["status"]).sum()))
    return table


def _one(pred, annotations: Annotations, order: list):
    """One result: its file name, class, box, score, probabilities (over the classes in
    ``annotations.classes`` order) and None, or what is wrong with it."""
    if not isinstance(pred, dict):
        return None, None, None, None, None, "not an object"
    file_name = pred.get("file_name")
    if isinstance(file_name, str):
        file_name = normal_name(file_name)
        if escapes_root(file_name):
            return None, None, None, None, None, f"file_name {file_name!r} is not a path inside input.images"
    else:
        file_name = annotations.image_ids.get(pred.get("image_id"))
        if file_name is None:
            return None, None, None, None, None, f"image_id {pred.get('image_id')!r} is not in the annotations' images"
    label = annotations.category_ids.get(pred.get("category_id"))
    if label is None:
        return file_name, None, None, None, None, f"category_id {pred.get('category_id')!r} is not a known category"
    box = pred.get("bbox")
    try:
        bbox = [float(v) for v in box]
    except (TypeError, ValueError):
        bbox = None
    if bbox is None or len(bbox) != 4 or not np.all(np.isfinite(bbox)) or bbox[2] <= 0 or bbox[3] <= 0:
        return file_name, label, None, None, None, f"bbox: expected [x, y, w, h] with w, h > 0, got {str(box)[:60]}"
    score = pred.get("score")
    if not isinstance(score, (int, float)) or not 0 <= float(score) <= 1:
        return file_name, label, bbox, None, None, f"score: expected a number in [0, 1], got {str(score)[:30]}"
    probabilities = None
    given = pred.get("probabilities")
    if given is not None:
        try:
            values = np.asarray(given, np.float64)
        except (TypeError, ValueError):
            values = np.zeros(0)
        if values.shape != (len(order),) or not np.all(np.isfinite(values)) or values.min() < 0:
            return file_name, label, bbox, float(score), None, (
                f"probabilities: expected {len(order)} non-negative numbers (one per category, in the "
                f"annotations' order), got {str(given)[:60]}")
        merged = np.zeros(len(annotations.classes))
        for value, key in zip(values, order):  # repeated category names are one class
            merged[annotations.classes.index(annotations.category_ids[key])] += value
        probabilities = (merged / max(merged.sum(), 1e-12)).astype(np.float32).tolist()
    return file_name, label, bbox, float(score), probabilities, None


def match_predictions(boxes: np.ndarray, box_images: np.ndarray, usable: np.ndarray, predictions: pa.Table,
                      prediction_images: np.ndarray, *, min_score: float, match_iou: float,
                      covered_iou: float) -> dict[str, np.ndarray]:
    """Per annotated box (``boxes`` (n, 4) pixels, their images, ``usable``): the best IoU with
    a prediction of its image (``location``), that prediction's row (``best``, -1 where no
    prediction reaches ``SUGGEST_IOU``) and whether it counts as matched (``matched``: IoU at
    least ``match_iou``). Per prediction: the best IoU with a usable box (``covered``)."""
    n, m = len(boxes), predictions.num_rows
    location = np.zeros(n)
    best = np.full(n, -1, np.int64)
    covered = np.zeros(m)
    ok = is_ok(predictions["status"]) & (predictions["score"].fill_null(0).to_numpy() >= min_score) \
        & (prediction_images >= 0)
    pred_boxes = box_matrix(predictions["bbox"])[0]
    rows = np.flatnonzero(usable)
    pred_rows = np.flatnonzero(ok)
    by_image: dict[int, list[int]] = {}
    for j in pred_rows:
        by_image.setdefault(int(prediction_images[j]), []).append(j)
    for image in np.unique(box_images[rows]):
        mine = rows[box_images[rows] == image]
        theirs = np.array(by_image.get(int(image), []), np.int64)
        if not len(theirs):
            continue
        iou = iou_matrix(boxes[mine], pred_boxes[theirs])
        location[mine] = iou.max(axis=1)
        pick = iou.argmax(axis=1)
        best[mine] = np.where(iou.max(axis=1) >= SUGGEST_IOU, theirs[pick], -1)
        covered[theirs] = np.maximum(covered[theirs], iou.max(axis=0))
    matched = (location >= match_iou) & (best >= 0)
    return {"location": location, "best": best, "matched": matched, "covered": covered, "usable_prediction": ok,
            "covered_enough": covered >= covered_iou}


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of every box of ``a`` (n, 4) with every box of ``b`` (m, 4),
    ``[x, y, w, h]``."""
    ax1, ay1 = a[:, 0] + a[:, 2], a[:, 1] + a[:, 3]
    bx1, by1 = b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    w = np.clip(np.minimum(ax1[:, None], bx1[None]) - np.maximum(a[:, 0][:, None], b[:, 0][None]), 0, None)
    h = np.clip(np.minimum(ay1[:, None], by1[None]) - np.maximum(a[:, 1][:, None], b[:, 1][None]), 0, None)
    inter = w * h
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def detector_class_probability(predictions: pa.Table, rows: np.ndarray, labels: list, classes: tuple) -> np.ndarray:
    """The detector's probability of ``labels[i]`` for prediction ``rows[i]``: its
    ``probabilities`` when given, else its ``score`` for its own class and the rest spread
    evenly over the others."""
    probabilities = predictions["probabilities"].to_pylist()
    predicted = predictions["label"].to_pylist()
    scores = predictions["score"].to_pylist()
    out = np.full(len(rows), np.nan)
    for i, (row, label) in enumerate(zip(rows, labels)):
        if row < 0 or label not in classes:
            continue
        given = probabilities[row]
        if given is not None:
            out[i] = given[classes.index(label)]
        elif predicted[row] == label:
            out[i] = scores[row]
        else:
            out[i] = (1.0 - scores[row]) / max(len(classes) - 1, 1)
    return out


def detector_evidence(table: pa.Table, usable: np.ndarray, predictions: pa.Table, classes: tuple, cfg) -> dict:
    """What the detector says of each annotated box of ``table`` (objects; ``usable`` rows are
    matched) and which predictions no box covers (see the module): ``location`` (NaN where not
    usable), ``suggested_bbox``, ``class_probability`` (the matched prediction's probability of
    the box's class; NaN where unmatched), ``misplaced``, and ``overlooked`` (prediction rows)."""
    boxes = box_matrix(table["bbox"])[0]
    images = table["input_id"].fill_null(-1).to_numpy(zero_copy_only=False)
    prediction_images = predictions["input_id"].fill_null(-1).to_numpy(zero_copy_only=False)
    found = match_predictions(boxes, images, usable, predictions, prediction_images,
                              min_score=cfg.prediction_min_score, match_iou=cfg.match_iou,
                              covered_iou=cfg.covered_iou)
    location = np.where(usable, found["location"], np.nan)
    suggest = usable & (found["best"] >= 0)
    suggested_bbox = predictions["bbox"].take(pa.array(np.maximum(found["best"], 0), mask=~suggest)).cast(
        pa.list_(pa.float64(), 4))
    matched = np.where(found["matched"] & usable, found["best"], -1)
    probability = detector_class_probability(predictions, matched, table["label"].to_pylist(), classes)
    misplaced = usable & (location >= SUGGEST_IOU) & (location < cfg.misplaced_below)
    scores = predictions["score"].fill_null(0).to_numpy()
    overlooked = found["usable_prediction"] & ~found["covered_enough"] & (scores >= cfg.overlooked_min_score)
    summary = {"predictions": predictions.num_rows,
               "rejected": int((~is_ok(predictions["status"])).sum()),
               "not_among_the_inputs": int((is_ok(predictions["status"]) & (prediction_images < 0)).sum()),
               "boxes_matched": int((matched >= 0).sum()), "possibly_overlooked": int(overlooked.sum()),
               "thresholds": {"prediction_min_score": cfg.prediction_min_score, "match_iou": cfg.match_iou,
                              "covered_iou": cfg.covered_iou, "overlooked_min_score": cfg.overlooked_min_score,
                              "misplaced_below": cfg.misplaced_below, "overlooked_below": cfg.overlooked_below}}
    return {"location": location, "suggested_bbox": suggested_bbox, "class_probability": probability,
            "misplaced": misplaced, "overlooked": np.flatnonzero(overlooked), "summary": summary}


def overlooked_rows(predictions: pa.Table, rows: np.ndarray, image_uri: dict, cfg) -> dict[str, list]:
    """The ``source = prediction`` rows of ``objects/`` for predictions ``rows`` (columns by
    name; the scores an annotated box has are null on them)."""
    picked = predictions.take(pa.array(rows, pa.int64()))
    uris = [image_uri.get(i) for i in picked["input_id"].to_pylist()]
    bbox = picked["bbox"]
    quality = (1.0 - picked["score"].to_numpy()).astype(np.float32)
    return {
        "uri": uris, "object_id": object_ids(pa.array(uris, pa.string()), bbox).to_pylist(),
        "annotation_id": picked["prediction_id"].to_pylist(), "source": ["prediction"] * len(rows),
        "label": picked["label"].to_pylist(), "bbox": bbox.to_pylist(),
        "area": [b[2] * b[3] for b in bbox.to_pylist()], "iscrowd": [False] * len(rows),
        "status": [STATUS_OK] * len(rows), "reason": [None] * len(rows), "segmentation": [None] * len(rows),
        "input_id": picked["input_id"].to_pylist(), "overlooked_quality": quality.tolist(),
        "is_overlooked_object": (quality < cfg.overlooked_below).tolist(),
        "suggested_box_label": picked["label"].to_pylist(),
        "suggested_box_confidence": picked["score"].to_pylist(),
    }
