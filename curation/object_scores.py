"""The box scores of a detection run (issue 37), from the crops' kNN graph and the boxes'
geometry; each score in [0, 1] with **low = likely an error**.

* ``box_label_quality`` -- is the class right: the probability of the given class, the
  average (``scores.label_probe_weight``) of a kNN vote among the crop vectors (neighbours on
  the same image left out, so a second box on the same object does not vouch for the first;
  each weighted by its cosine similarity, smoothed by the classes' shares) and the images'
  linear probe fitted on the crops, out of sample (:mod:`curation.scores.label_probe`). The
  most probable class is ``suggested_box_label``, its probability ``suggested_box_confidence``.
  (Measured on CIFAR-10 crops, benchmarks/README.md: the probability of the given class ranks
  swapped classes better than the normalised margin, and the average better than either.)
* ``box_spurious_quality`` -- is there an object in the box: each image also gives
  ``objects.background_crops`` squares of its background (where no box is); the share of a
  crop's neighbours (other images') that are boxes rather than background squares.
* ``box_duplicate_quality`` (internal to ``box_quality``) -- ``1 - IoU`` with the box it
  repeats: two usable boxes on one image overlapping by at least ``objects.duplicate_iou``;
  of a same-class pair the later-listed box is the duplicate, of a pair with different
  classes the one whose class the neighbours believe less.
* ``box_quality`` -- the one column to sort annotated boxes by: the lowest of the above, each
  taken as its share of the run's scored boxes at or below it (the components have scales of
  their own); 0 for a degenerate box (no area).

Flags: ``is_box_mislabel`` (another class is more probable and ``box_label_quality`` is under
``objects.mislabel_below``), ``is_spurious_box`` (``box_spurious_quality`` under
``objects.spurious_below``), ``is_duplicate_box`` (+ ``duplicate_box_of``, the
``object_id`` repeated), ``is_degenerate_box``. Crowd boxes (``iscrowd``) are scored for their
class but neither vote nor take part in duplicates.

With a detector's predictions (:mod:`curation.predictions`): ``box_location_quality``,
``suggested_bbox``, ``is_box_misplaced`` and the ``source = prediction`` rows of possibly
overlooked objects (``overlooked_quality``: 1 - the detector's score).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.config_sections import ObjectsConfig
from curation.annotations import box_matrix
from curation.objects import OBJECTS_CONTRACT
from curation.predictions import detector_evidence, iou_matrix, overlooked_rows
from curation.schema import is_ok
from curation.scores.label_probe import FOLDS, dense_probabilities, fold_keys, probe_probabilities

log = logging.getLogger(__name__)

VOTE_ROWS_PER_STEP = 16_384  # the class-vote matrix is built this many boxes at a time
MAJORITY = 0.5  # a box is flagged mislabelled only when another class has at least this probability
SMOOTHING = 1.0  # prior weight of the class shares in the vote (in units of one perfect neighbour)

# The columns this module adds to objects/, in order, and the flags among them.
OBJECT_SCORE_COLUMNS = pa.schema([
    ("object_vector_id", pa.int64()), ("box_label_quality", pa.float32()), ("box_spurious_quality", pa.float32()),
    ("box_quality", pa.float32()), ("suggested_box_label", pa.string()), ("suggested_box_confidence", pa.float32()),
    ("is_box_mislabel", pa.bool_()), ("is_spurious_box", pa.bool_()), ("is_duplicate_box", pa.bool_()),
    ("duplicate_box_of", pa.string()), ("is_degenerate_box", pa.bool_()),
    ("box_location_quality", pa.float32()), ("suggested_bbox", pa.list_(pa.float64(), 4)),
    ("is_box_misplaced", pa.bool_()), ("overlooked_quality", pa.float32()), ("is_overlooked_object", pa.bool_()),
])
OBJECT_FLAGS = {
    "is_box_mislabel": "the crop's neighbours name another class",
    "is_spurious_box": "the crop looks like the images' background, not like the boxed objects",
    "is_duplicate_box": "a second box on an object already boxed",
    "is_degenerate_box": "a box with no area",
    "is_box_misplaced": "the detector's nearest box overlaps it, but by less than objects.misplaced_below",
    "is_overlooked_object": "a confident prediction no annotated box covers (source = prediction rows)",
}
# The box map's coordinates (curation/report/box_map.py; null for a box not plotted).
OBJECT_MAP_COLUMNS = pa.schema([("x", pa.float32()), ("y", pa.float32())])
# objects/*.parquet as published: the placed boxes (curation/objects.py), these scores, the map.
OBJECTS_MANIFEST = pa.schema(list(OBJECTS_CONTRACT) + list(OBJECT_SCORE_COLUMNS) + list(OBJECT_MAP_COLUMNS))
# samples/ columns of a detection run (beside object_count): per image.
SAMPLE_OBJECT_COLUMNS = ("object_quality", "box_mislabel_count", "spurious_box_count", "duplicate_box_count",
                         "degenerate_box_count", "misplaced_box_count", "overlooked_object_count")


@dataclass(frozen=True)
class CropGraph:
    """The crops' kNN graph and what its nodes are: the ok boxes' crops and the background
    squares, ``node_rows`` the box's row in the objects table for each (-1: background),
    ``node_images`` its image's ``input_id``; ``vectors`` the ok boxes' crop vectors by
    ``object_vector_id`` (for the linear probe). ``graph`` is None when no box was usable."""

    graph: object
    node_rows: np.ndarray
    node_images: np.ndarray
    vectors: object = None


@dataclass
class _Evidence:
    """Per row of the objects table: what the crops (and the detector) say."""

    classes: list
    codes: np.ndarray
    label_quality: np.ndarray
    spurious_quality: np.ndarray
    suggested: np.ndarray
    confidence: np.ndarray
    probe: dict


def score_objects(table: pa.Table, crops: CropGraph, cfg: ObjectsConfig, *, probe_weight: float = 0.0,
                  predictions: pa.Table | None = None, classes_listed: tuple = ()) -> tuple[pa.Table, dict]:
    """``table`` (objects, with ``object_vector_id``) with the score columns (and, with a
    detector's ``predictions`` -- :mod:`curation.predictions`, their probabilities over
    ``classes_listed`` -- a row for each object no box covers), and a summary for ``run.json``.
    ``probe_weight``: the linear probe's share of the class probabilities
    (``scores.label_probe_weight``)."""
    n = table.num_rows
    ok = is_ok(table["status"])
    crowd = table["iscrowd"].fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
    evidence = _crop_evidence(table, crops, ok, crowd, probe_weight)
    location, misplaced, detector = np.full(n, np.nan), np.zeros(n, bool), None
    suggested_bbox = pa.nulls(n, pa.list_(pa.float64(), 4))
    if predictions is not None:
        detector = detector_evidence(table, ok & table["bbox"].is_valid().to_numpy(zero_copy_only=False),
                                     predictions, classes_listed, cfg)
        location, misplaced, suggested_bbox = detector["location"], detector["misplaced"], detector["suggested_bbox"]
        quality, said = evidence.label_quality, ~np.isnan(detector["class_probability"]) & ~np.isnan(
            evidence.label_quality)
        quality[said] = (quality[said] + detector["class_probability"][said]) / 2  # the crops and the detector
    usable = ok & ~crowd & ~np.isnan(evidence.label_quality)
    dup, dup_of, dup_quality = _duplicates(table, usable, evidence.codes, evidence.label_quality, cfg.duplicate_iou)
    degenerate = pc.fill_null(pc.starts_with(table["reason"], "degenerate"), False).to_numpy(
        zero_copy_only=False) & ~ok
    # The components are on scales of their own (a class probability, a share of neighbours,
    # 1 - IoU): each becomes its share of the run's scored boxes at or below it before the
    # lowest is taken, so every kind of error reaches the top of the review queue.
    scored_rows = ~np.isnan(evidence.label_quality)
    box_quality = np.full(n, np.nan)
    for component in (evidence.label_quality, evidence.spurious_quality,
                      np.where(scored_rows, dup_quality, np.nan), location):
        box_quality = np.fmin(box_quality, _share_at_or_below(component, scored_rows))
    box_quality[degenerate] = 0.0
    columns = {
        "object_vector_id": table["object_vector_id"],
        "box_label_quality": _nullable(evidence.label_quality),
        "box_spurious_quality": _nullable(evidence.spurious_quality),
        "box_quality": _nullable(box_quality.astype(np.float32)),
        "suggested_box_label": _names(evidence.classes, evidence.suggested),
        "suggested_box_confidence": _nullable(evidence.confidence),
        "is_box_mislabel": pa.array(_confidently_another_class(evidence, cfg.mislabel_below)),
        "is_spurious_box": pa.array(~np.isnan(evidence.spurious_quality) & ~crowd
                                    & (evidence.spurious_quality < cfg.spurious_below)),
        "is_duplicate_box": pa.array(dup),
        "duplicate_box_of": table["object_id"].take(pa.array(np.maximum(dup_of, 0), mask=dup_of < 0)),
        "is_degenerate_box": pa.array(degenerate),
        "box_location_quality": _nullable(location.astype(np.float32)),
        "suggested_bbox": suggested_bbox,
        "is_box_misplaced": pa.array(misplaced),
        "overlooked_quality": pa.nulls(n, pa.float32()),
        "is_overlooked_object": pa.array(np.zeros(n, bool)),
    }
    out = _manifest(table, columns, predictions, detector, cfg)
    flags = {name: int(pc.sum(out[name]).as_py() or 0) for name in OBJECT_FLAGS}
    summary = {"flags": flags, "classes_voted": len(evidence.classes), **evidence.probe,
               "thresholds": {"mislabel_below": cfg.mislabel_below, "spurious_below": cfg.spurious_below,
                              "duplicate_iou": cfg.duplicate_iou}}
    if detector is not None:
        summary["predictions"] = detector["summary"]
    log.info("object scores: %s", ", ".join(f"{k} {v}" for k, v in flags.items()))
    return out, summary


def _crop_evidence(table: pa.Table, crops: CropGraph, ok: np.ndarray, crowd: np.ndarray,
                   probe_weight: float) -> _Evidence:
    """The class vote (and probe) and the background share of every ok box with a crop."""
    n = table.num_rows
    node_of_row = np.full(n, -1, np.int64)
    is_box = crops.node_rows >= 0
    node_of_row[crops.node_rows[is_box]] = np.flatnonzero(is_box)
    has_node = ok & (node_of_row >= 0)
    labels = table["label"].cast(pa.string())
    classes = sorted(pc.unique(labels.filter(pa.array(has_node)).drop_null()).to_pylist())
    codes = pc.fill_null(pc.index_in(labels, value_set=pa.array(classes, pa.string())), -1).to_numpy(
        zero_copy_only=False).astype(np.int64)
    found = _Evidence(classes, codes, np.full(n, np.nan, np.float32), np.full(n, np.nan, np.float32),
                      np.full(n, -1, np.int64), np.full(n, np.nan, np.float32), {"probe": "off"})
    if crops.graph is None or not classes or not has_node.any():
        return found
    voters = has_node & ~crowd & (codes >= 0)
    scored = np.flatnonzero(has_node & (codes >= 0))
    probe = None
    if crops.vectors is not None and probe_weight > 0 and len(classes) > 1 and voters.sum() >= 2 * FOLDS:
        probe, found.probe["probe"] = _probe(table, crops.vectors, codes, voters, classes, scored)
    vote = _neighbour_vote(node_of_row[scored], crops, codes, voters, len(classes), probe=probe,
                           probe_weight=probe_weight)
    found.label_quality[scored], found.suggested[scored], found.confidence[scored] = vote[0], vote[1], vote[2]
    if (~is_box).any():  # background squares were cut: how much a crop looks like them
        found.spurious_quality[scored] = vote[3]
    return found


def _manifest(table: pa.Table, columns: dict, predictions, detector, cfg) -> pa.Table:
    """``table`` with the score ``columns``, in ``OBJECTS_MANIFEST`` order, and the rows of the
    objects no annotated box covers (flags false, the other scores null)."""
    out = table.drop_columns([c for c in OBJECT_SCORE_COLUMNS.names + OBJECT_MAP_COLUMNS.names
                              if c in table.column_names])
    for field in OBJECT_SCORE_COLUMNS:
        out = out.append_column(field, columns[field.name].cast(field.type))
    for field in OBJECT_MAP_COLUMNS:  # set by the report's box map
        out = out.append_column(field, pa.nulls(out.num_rows, field.type))
    out = out.select(OBJECTS_MANIFEST.names).cast(OBJECTS_MANIFEST)
    if detector is None or not len(detector["overlooked"]):
        return out
    images, first = np.unique(table["input_id"].fill_null(-1).to_numpy(zero_copy_only=False), return_index=True)
    uris = dict(zip(images.tolist(), table["uri"].take(pa.array(first)).to_pylist()))  # one per image
    extra = overlooked_rows(predictions, detector["overlooked"], uris, cfg)
    count = len(detector["overlooked"])
    rows = pa.table({field.name: pa.array(extra[field.name], field.type) if field.name in extra
                     else pa.array([False] * count) if field.type == pa.bool_()  # flags are never null
                     else pa.nulls(count, field.type) for field in OBJECTS_MANIFEST})
    return pa.concat_tables([out, rows.cast(OBJECTS_MANIFEST)])


def per_image(objects: pa.Table, n_inputs: int) -> dict[str, pa.Array]:
    """The samples/ columns a detection run adds (``SAMPLE_OBJECT_COLUMNS``), by ``input_id``:
    ``object_quality`` (the image's lowest ``box_quality``, or ``overlooked_quality`` of an
    object the annotations may have missed; low = it likely holds a box error; null without a
    scored box) and its flagged boxes per flag."""
    owner = objects["input_id"].to_numpy(zero_copy_only=False).astype(np.float64)
    placed = ~np.isnan(owner)
    at = owner[placed].astype(np.int64)
    quality = np.full(n_inputs, np.inf)
    # an annotated box's box_quality; a possibly overlooked object's overlooked_quality
    box_quality = pc.coalesce(objects["box_quality"], objects["overlooked_quality"]).to_numpy(
        zero_copy_only=False).astype(np.float64)[placed]
    scored = ~np.isnan(box_quality)
    np.minimum.at(quality, at[scored], box_quality[scored])
    out = {"object_quality": pa.array(np.where(np.isinf(quality), np.nan, quality), pa.float32(),
                                      mask=np.isinf(quality))}
    for name, flag in (("box_mislabel_count", "is_box_mislabel"), ("spurious_box_count", "is_spurious_box"),
                       ("duplicate_box_count", "is_duplicate_box"), ("degenerate_box_count", "is_degenerate_box"),
                       ("misplaced_box_count", "is_box_misplaced"),
                       ("overlooked_object_count", "is_overlooked_object")):
        counts = np.zeros(n_inputs, np.int32)
        np.add.at(counts, at, objects[flag].to_numpy(zero_copy_only=False)[placed].astype(np.int32))
        out[name] = pa.array(counts)
    return out


def _confidently_another_class(evidence: _Evidence, ceiling: float) -> np.ndarray:
    """Confident learning's rule, per class: a box is flagged when another class is more
    probable, at least as probable as that class's own boxes are on average (and at least
    ``MAJORITY``), while its given class is less probable than its class's boxes are on
    average -- and under ``ceiling``. (Weak features give near-flat probabilities, where the
    rule alone flagged half the boxes of a CIFAR set; the majority keeps those quiet.)"""
    quality, suggested, codes = evidence.label_quality, evidence.suggested, evidence.codes
    scored = ~np.isnan(quality) & (codes >= 0)
    if not scored.any():
        return np.zeros(len(quality), bool)
    n_classes = len(evidence.classes)
    totals = np.bincount(codes[scored], weights=quality[scored], minlength=n_classes)
    counts = np.bincount(codes[scored], minlength=n_classes)
    threshold = np.where(counts > 0, totals / np.maximum(counts, 1), 1.0)
    safe_code, safe_best = np.maximum(codes, 0), np.maximum(suggested, 0)
    return (scored & (suggested >= 0) & (suggested != codes) & (quality < threshold[safe_code])
            & (np.nan_to_num(evidence.confidence) >= np.maximum(threshold[safe_best], MAJORITY))
            & (quality < ceiling))


def _share_at_or_below(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Each of ``rows``' values as the share of ``rows``' values at or below it (NaN where
    there is none)."""
    out = np.full(len(values), np.nan)
    known = rows & ~np.isnan(values)
    if known.any():
        ordered = np.sort(values[known])
        out[known] = np.searchsorted(ordered, values[known], side="right") / len(ordered)
    return out


def _names(classes: list, codes: np.ndarray) -> pa.Array:
    """Class names of ``codes`` (null for -1), without a Python object per row."""
    return pa.array(classes, pa.string()).take(pa.array(np.maximum(codes, 0), mask=codes < 0)) if classes \
        else pa.nulls(len(codes), pa.string())


def _nullable(values: np.ndarray) -> pa.Array:
    return pa.array(values, pa.float32(), mask=np.isnan(values))


def _probe(table: pa.Table, vectors, codes: np.ndarray, voters: np.ndarray, classes: list, scored: np.ndarray):
    """The linear probe's out-of-sample top classes for the ``scored`` rows (the images'
    probe, :func:`~curation.scores.label_probe.probe_probabilities`, on the crop vectors; its
    folds follow the ``object_id``)."""
    vector_id = table["object_vector_id"].to_numpy(zero_copy_only=False).astype(np.float64)
    has = ~np.isnan(vector_id)
    row_of_vector = np.full(int(vector_id[has].max()) + 1, -1, np.int64)
    row_of_vector[vector_id[has].astype(np.int64)] = np.flatnonzero(has)
    vector_codes = np.where(voters[row_of_vector], codes[row_of_vector], -1)
    keys = fold_keys(table["object_id"].take(pa.array(row_of_vector)))
    top_classes, top_p, info, _ = probe_probabilities(vectors, vector_codes, len(classes), keys=keys)
    at = vector_id[scored].astype(np.int64)
    return (top_classes[at], top_p[at]), info


def _neighbour_vote(nodes: np.ndarray, crops: CropGraph, codes: np.ndarray, voters: np.ndarray, n_classes: int, *,
                    probe=None, probe_weight: float = 0.0):
    """What the neighbours of ``nodes`` say (see the module), neighbours on the same image left
    out: the class probabilities' quality (the probability of the given class; the vote's,
    averaged with ``probe``'s by ``probe_weight``), the most probable class and its
    probability; and the share of the weight on boxes rather than background squares
    (smoothed by their shares of all nodes)."""
    graph, node_rows, node_images = crops.graph, crops.node_rows, crops.node_images
    prior = np.bincount(codes[voters], minlength=n_classes).astype(np.float64)
    prior = prior / max(prior.sum(), 1.0)
    box_share = float((node_rows >= 0).mean()) if len(node_rows) else 1.0
    quality = np.empty(len(nodes), np.float32)
    best = np.empty(len(nodes), np.int64)
    share = np.empty(len(nodes), np.float32)
    objectness = np.empty(len(nodes), np.float32)
    for start in range(0, len(nodes), VOTE_ROWS_PER_STEP):
        part = nodes[start:start + VOTE_ROWS_PER_STEP]
        ids = graph.ids[part].astype(np.int64)
        valid = ids >= 0
        ids = np.where(valid, ids, 0)
        weight = np.where(valid & (node_images[ids] != node_images[part][:, None]),
                          np.clip(graph.sims[part].astype(np.float64), 0.0, 1.0), 0.0)
        row = node_rows[ids]
        background = row < 0
        on_box = np.where(background, 0.0, weight)
        objectness[start:start + len(part)] = ((on_box.sum(axis=1) + SMOOTHING * box_share)
                                               / (weight.sum(axis=1) + SMOOTHING))
        row = np.where(background, 0, row)
        vote_weight = np.where(~background & voters[row], weight, 0.0)
        votes = np.tile(SMOOTHING * prior, (len(part), 1))
        np.add.at(votes, (np.repeat(np.arange(len(part)), ids.shape[1]), np.maximum(codes[row], 0).reshape(-1)),
                  vote_weight.reshape(-1))
        votes /= votes.sum(axis=1, keepdims=True)
        if probe is not None:
            stop = start + len(part)
            votes = (probe_weight * dense_probabilities(probe[0][start:stop], probe[1][start:stop], prior)
                     + (1.0 - probe_weight) * votes)
        given = codes[node_rows[part]]
        quality[start:start + len(part)] = votes[np.arange(len(part)), given]
        best[start:start + len(part)] = votes.argmax(axis=1)
        share[start:start + len(part)] = votes.max(axis=1)
    return quality, best, share, objectness


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
    boxes = box_matrix(table["bbox"].take(pa.array(rows)))[0]
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
