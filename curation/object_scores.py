"""The box scores of a detection run (issue 37), from the crops' kNN graph and the boxes'
geometry; each score in [0, 1] with **low = likely an error**.

* ``box_label_quality`` -- is the class right: a kNN vote among the crop vectors (neighbours
  on the same image left out, so a second box on the same object does not vouch for the
  first), each neighbour weighted by its cosine similarity, smoothed by the class's share
  of the boxes; the score is the normalised margin ``(1 + p[given] - max other p) / 2``. The
  class the neighbours vote for most is ``suggested_box_label``, its share
  ``suggested_box_confidence``.
* ``box_duplicate_quality`` (internal to ``box_quality``) -- ``1 - IoU`` with the box it
  repeats: two usable boxes on one image overlapping by at least ``objects.duplicate_iou``;
  of a same-class pair the later-listed box is the duplicate, of a pair with different
  classes the one whose class the neighbours believe less.
* ``box_quality`` -- the one column to sort annotated boxes by: the lowest of the above, 0 for
  a degenerate box (no area).

Flags: ``is_box_mislabel`` (the neighbours suggest another class and ``box_label_quality`` is
under ``objects.mislabel_below``), ``is_duplicate_box`` (+ ``duplicate_box_of``, the
``object_id`` repeated), ``is_degenerate_box``. Crowd boxes (``iscrowd``) are scored for their
class but neither vote nor take part in duplicates.

Still to come (issue 37): a K-fold probe beside the vote, spurious boxes (a crop that looks
like background), and the detector's predictions (location, overlooked objects).
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.config_sections import ObjectsConfig
from curation.objects import OBJECTS_CONTRACT
from curation.schema import is_ok

log = logging.getLogger(__name__)

VOTE_ROWS_PER_STEP = 65_536  # the class-vote matrix is built this many boxes at a time
SMOOTHING = 1.0  # prior weight of the class shares in the vote (in units of one perfect neighbour)

# The columns this module adds to objects/, in order, and the flags among them.
OBJECT_SCORE_COLUMNS = pa.schema([
    ("object_vector_id", pa.int64()), ("box_label_quality", pa.float32()), ("box_quality", pa.float32()),
    ("suggested_box_label", pa.string()), ("suggested_box_confidence", pa.float32()),
    ("is_box_mislabel", pa.bool_()), ("is_duplicate_box", pa.bool_()), ("duplicate_box_of", pa.string()),
    ("is_degenerate_box", pa.bool_()),
])
OBJECT_FLAGS = {
    "is_box_mislabel": "the crop's neighbours name another class",
    "is_duplicate_box": "a second box on an object already boxed",
    "is_degenerate_box": "a box with no area",
}
# objects/*.parquet as published: the placed boxes (curation/objects.py) and these scores.
OBJECTS_MANIFEST = pa.schema(list(OBJECTS_CONTRACT) + list(OBJECT_SCORE_COLUMNS))
# samples/ columns of a detection run (beside object_count): per image.
SAMPLE_OBJECT_COLUMNS = ("object_quality", "box_mislabel_count", "duplicate_box_count", "degenerate_box_count")


def score_objects(table: pa.Table, graph, cfg: ObjectsConfig) -> tuple[pa.Table, dict]:
    """``table`` (objects, with ``object_vector_id``) with the score columns, and a summary for
    ``run.json`` (flag counts, thresholds). ``graph``: the crops' kNN graph, rows and neighbour
    ids in vector-id order (None when no box was usable)."""
    n = table.num_rows
    ok = is_ok(table["status"])
    vector_id = table["object_vector_id"].to_numpy(zero_copy_only=False)
    has_vector = ok & ~np.isnan(vector_id.astype(np.float64))
    crowd = table["iscrowd"].fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
    labels = table["label"].to_pylist()
    classes = sorted({label for label, usable in zip(labels, has_vector) if usable and label is not None})
    code_of = {c: i for i, c in enumerate(classes)}
    codes = np.array([code_of.get(label, -1) if label is not None else -1 for label in labels], np.int64)
    image = table["input_id"].to_numpy(zero_copy_only=False).astype(np.float64)

    label_quality = np.full(n, np.nan, np.float32)
    suggested = np.full(n, -1, np.int64)
    confidence = np.full(n, np.nan, np.float32)
    if graph is not None and classes and has_vector.any():
        rows_of_vector = np.full(int(np.nanmax(vector_id[has_vector])) + 1, -1, np.int64)
        rows_of_vector[vector_id[has_vector].astype(np.int64)] = np.flatnonzero(has_vector)
        voters = has_vector & ~crowd & (codes >= 0)
        scored = np.flatnonzero(has_vector & (codes >= 0))
        q, s, c = _class_vote(scored, vector_id, rows_of_vector, graph, codes, voters, image, len(classes))
        label_quality[scored], suggested[scored], confidence[scored] = q, s, c

    dup, dup_of, dup_quality = _duplicates(table, has_vector & ~crowd, codes, label_quality, cfg.duplicate_iou)
    degenerate = np.array([bool(r) and r.startswith("degenerate") for r in table["reason"].to_pylist()]) & ~ok
    box_quality = np.where(np.isnan(label_quality), np.nan, np.minimum(label_quality, dup_quality)).astype(np.float32)
    box_quality[degenerate] = 0.0
    mislabel = (suggested >= 0) & (suggested != codes) & (label_quality < cfg.mislabel_below)
    ids = table["object_id"].to_pylist()
    columns = {
        "object_vector_id": table["object_vector_id"],
        "box_label_quality": _nullable(label_quality),
        "box_quality": _nullable(box_quality),
        "suggested_box_label": pa.array([classes[k] if k >= 0 else None for k in suggested], pa.string()),
        "suggested_box_confidence": _nullable(confidence),
        "is_box_mislabel": pa.array(mislabel),
        "is_duplicate_box": pa.array(dup),
        "duplicate_box_of": pa.array([ids[j] if j >= 0 else None for j in dup_of], pa.string()),
        "is_degenerate_box": pa.array(degenerate),
    }
    out = table.drop_columns([c for c in OBJECT_SCORE_COLUMNS.names if c in table.column_names])
    for field in OBJECT_SCORE_COLUMNS:
        out = out.append_column(field, columns[field.name].cast(field.type))
    out = out.select(OBJECTS_MANIFEST.names).cast(OBJECTS_MANIFEST)
    flags = {name: int(np.asarray(columns[name]).sum()) for name in OBJECT_FLAGS}
    summary = {"flags": flags, "classes_voted": len(classes),
               "thresholds": {"mislabel_below": cfg.mislabel_below, "duplicate_iou": cfg.duplicate_iou}}
    log.info("object scores: %s", ", ".join(f"{k} {v}" for k, v in flags.items()))
    return out, summary


def per_image(objects: pa.Table, n_inputs: int) -> dict[str, pa.Array]:
    """The samples/ columns a detection run adds (``SAMPLE_OBJECT_COLUMNS``), by ``input_id``:
    ``object_quality`` (the image's lowest ``box_quality``; low = it likely holds a box error;
    null without a scored box) and its flagged boxes per flag."""
    owner = objects["input_id"].to_numpy(zero_copy_only=False).astype(np.float64)
    placed = ~np.isnan(owner)
    at = owner[placed].astype(np.int64)
    quality = np.full(n_inputs, np.inf)
    box_quality = objects["box_quality"].to_numpy(zero_copy_only=False).astype(np.float64)[placed]
    scored = ~np.isnan(box_quality)
    np.minimum.at(quality, at[scored], box_quality[scored])
    out = {"object_quality": pa.array(np.where(np.isinf(quality), np.nan, quality), pa.float32(),
                                      mask=np.isinf(quality))}
    for name, flag in (("box_mislabel_count", "is_box_mislabel"), ("duplicate_box_count", "is_duplicate_box"),
                       ("degenerate_box_count", "is_degenerate_box")):
        counts = np.zeros(n_inputs, np.int32)
        np.add.at(counts, at, objects[flag].to_numpy(zero_copy_only=False)[placed].astype(np.int32))
        out[name] = pa.array(counts)
    return out


def _nullable(values: np.ndarray) -> pa.Array:
    return pa.array(values, pa.float32(), mask=np.isnan(values))


def _class_vote(rows: np.ndarray, vector_id: np.ndarray, rows_of_vector: np.ndarray, graph, codes: np.ndarray,
                voters: np.ndarray, image: np.ndarray, n_classes: int):
    """The neighbours' class vote for ``rows`` (see the module): quality, the class voted for
    most, its share."""
    prior = np.bincount(codes[voters], minlength=n_classes).astype(np.float64)
    prior = prior / max(prior.sum(), 1.0)
    quality = np.empty(len(rows), np.float32)
    best = np.empty(len(rows), np.int64)
    share = np.empty(len(rows), np.float32)
    for start in range(0, len(rows), VOTE_ROWS_PER_STEP):
        part = rows[start:start + VOTE_ROWS_PER_STEP]
        ids = graph.ids[vector_id[part].astype(np.int64)]
        sims = graph.sims[vector_id[part].astype(np.int64)].astype(np.float64)
        valid = ids >= 0
        neighbour = np.where(valid, rows_of_vector[np.where(valid, ids, 0)], -1)
        valid &= neighbour >= 0
        neighbour = np.where(valid, neighbour, 0)
        valid &= voters[neighbour] & (image[neighbour] != image[part][:, None])
        weight = np.where(valid, np.clip(sims, 0.0, 1.0), 0.0)
        votes = np.tile(SMOOTHING * prior, (len(part), 1))
        np.add.at(votes, (np.repeat(np.arange(len(part)), ids.shape[1]), codes[neighbour].reshape(-1)),
                  weight.reshape(-1))
        votes /= votes.sum(axis=1, keepdims=True)
        given = codes[part]
        p_given = votes[np.arange(len(part)), given]
        others = votes.copy()
        others[np.arange(len(part)), given] = -1.0
        quality[start:start + len(part)] = (1.0 + p_given - others.max(axis=1)) / 2.0
        best[start:start + len(part)] = votes.argmax(axis=1)
        share[start:start + len(part)] = votes.max(axis=1)
    return quality, best, share


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


def _duplicates(table: pa.Table, usable: np.ndarray, codes: np.ndarray, label_quality: np.ndarray,
                threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per box: a duplicate?, the row it repeats (-1), and ``1 - IoU`` (1 when none)."""
    n = table.num_rows
    dup = np.zeros(n, bool)
    dup_of = np.full(n, -1, np.int64)
    quality = np.ones(n, np.float32)
    rows = np.flatnonzero(usable)
    if not len(rows):
        return dup, dup_of, quality
    boxes = np.array(table["bbox"].take(pa.array(rows)).to_pylist(), np.float64).reshape(-1, 4)
    owner = pc.fill_null(table["input_id"], -1).to_numpy(zero_copy_only=False)[rows]
    order = np.argsort(owner, kind="stable")
    bounds = np.flatnonzero(np.diff(owner[order])) + 1
    belief = np.nan_to_num(label_quality, nan=1.0)
    for group in np.split(order, bounds):
        if len(group) < 2:
            continue
        iou = np.triu(iou_matrix(boxes[group], boxes[group]), 1)  # pairs (earlier, later) in file order
        for a, b in zip(*np.nonzero(iou >= threshold)):
            first, second = rows[group[a]], rows[group[b]]
            if codes[first] != codes[second] and belief[first] < belief[second]:
                first, second = second, first
            if dup[first] or dup[second]:
                continue  # one box of the pair is already a duplicate: the other stays the original
            dup[second], dup_of[second] = True, first
            quality[second] = 1.0 - float(iou[a, b])
    return dup, dup_of, quality
