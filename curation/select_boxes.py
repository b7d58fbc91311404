"""The ``box_review`` selection mode: a detection run's annotated boxes to review, one row per
box, lowest ``box_quality`` first (every box error pools into it: see
:mod:`curation.object_scores`), the budget in boxes.

Eligible: ``source = annotation`` rows that are ``ok`` and scored; ``where`` filters over the
``objects/`` columns (``label``, ``area``, the box scores and flags, ...), ``balance_on`` names
one of them (interleaved round-robin over its values). The selection file adds ``object_id``
and ``bbox`` to the usual columns, and the nightly diff keys it by ``object_id``.

Image selections of a detection run may balance over the boxes' classes (``balance_on:
object_label``, :func:`balance_by_objects`): the budget stays in images, and run.json reports
the boxes per class the selection brings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy import sparse

from curation.config import SelectionConfig
from curation.object_scores import OBJECT_FLAGS, OBJECTS_MANIFEST
from curation.object_profile import annotated_ok, annotated_ok_mask
from curation.schema import SELECTION_SCHEMA
from curation.select_view import SelectionResult, columns_named, interleave_by
from curation.where import where_mask

log = logging.getLogger(__name__)

MODE = "box_review"
BOX_SELECTION_SCHEMA = pa.schema(list(SELECTION_SCHEMA) + [("object_id", pa.string()),
                                                           ("bbox", pa.list_(pa.float64(), 4))])


def box_review(objects: pa.Table, sel: SelectionConfig) -> SelectionResult:
    """``sel`` (mode ``box_review``) over a detection run's ``objects`` table."""
    quality = objects["box_quality"].to_numpy(zero_copy_only=False).astype(np.float64)
    eligible = annotated_ok_mask(objects).to_numpy(zero_copy_only=False) & np.isfinite(quality)
    if sel.where:  # (preflight checked its columns against OBJECTS_MANIFEST)
        named = sorted(columns_named([sel], objects.column_names)) or ["box_quality"]
        eligible &= where_mask(objects.select(named).to_pandas(), sel.where)
    rows = np.flatnonzero(eligible)
    rows = rows[np.argsort(quality[rows], kind="stable")]
    if sel.balance_on:
        groups = objects[sel.balance_on].cast(pa.string()).fill_null("").to_numpy(zero_copy_only=False)
        rows = rows[interleave_by(np.arange(len(rows)), groups[rows])]
    note = None
    if sel.budget is not None:
        if sel.budget > len(rows):
            note = f"budget {sel.budget} exceeds the {len(rows)} eligible boxes; returned {len(rows)}"
            log.warning("selection %s: %s", sel.name, note)
        rows = rows[: sel.budget]
    take = pa.array(rows, pa.int64())
    picked = objects.take(take)
    table = pa.table({
        "uri": picked["uri"], "label": picked["label"],
        "rank": pa.array(np.arange(1, len(rows) + 1, dtype=np.int32)),
        "score": pa.array(quality[rows].astype(np.float32)),
        "reason": pa.array([_reason(r) for r in picked.to_pylist()], pa.string()),
        "object_id": picked["object_id"], "bbox": picked["bbox"],
    }, schema=BOX_SELECTION_SCHEMA)
    return SelectionResult(sel.name, MODE, table, int(eligible.sum()), note, rows=np.asarray(rows, np.int64))


def _reason(row: dict) -> str:
    flags = [name for name in OBJECT_FLAGS if row.get(name)]
    text = f"box quality {row['box_quality']:.3f}"
    if flags:
        text += ": " + ", ".join(flags)
    suggested = row.get("suggested_box_label")
    if suggested and suggested != row["label"]:
        text += f"; labelled {row['label']!r}, suggested {suggested!r}"
    return text


def box_columns() -> pa.Schema:
    """The columns a ``box_review`` selection's ``where`` and ``balance_on`` may name."""
    return OBJECTS_MANIFEST


OBJECT_LABEL = "object_label"  # balance_on: an image selection balanced over its boxes' classes
BALANCE_WINDOW = 16  # images weighed per step (the best ranked that hold the class served)


@dataclass(frozen=True)
class ObjectClasses:
    """Per samples row, how many ok annotated boxes of each class it holds (``counts``: a
    sparse ``(n_samples, len(names))`` matrix)."""

    names: list[str]
    counts: "sparse.csr_matrix"


def object_classes(samples: pa.Table, objects: pa.Table) -> ObjectClasses:
    """The boxes' classes per image of ``samples`` (matched by ``uri``)."""
    boxes = annotated_ok(objects).select(["uri", "label"]).drop_null()
    row = pc.index_in(boxes["uri"], value_set=samples["uri"].combine_chunks().cast(pa.string()))
    row = np.asarray(row.to_numpy(zero_copy_only=False), np.float64)
    label = boxes["label"].cast(pa.string())
    names = sorted(pc.unique(label).to_pylist())
    codes = pc.index_in(label, value_set=pa.array(names, pa.string())).to_numpy(zero_copy_only=False).astype(np.int64)
    found = np.isfinite(row)
    counts = sparse.csr_matrix((np.ones(int(found.sum())), (row[found].astype(np.int64), codes[found])),
                               shape=(samples.num_rows, len(names)))
    return ObjectClasses([str(n) for n in names], counts)


NO_OBJECTS, UNLABELLED = "<no objects>", "<unlabelled>"


def object_strata(classes: ObjectClasses, listed: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Each image's stratum in a detection run: the class most of its boxes have (ties: the
    first name), ``<no objects>`` for an image listed with none, ``<unlabelled>`` for one the
    annotations do not list (``listed``). Returns ``(code per row, name of each code)``."""
    counts = classes.counts.tocsr()
    has = np.diff(counts.indptr) > 0
    main = np.asarray(counts.argmax(axis=1)).ravel() if counts.shape[1] else np.zeros(counts.shape[0], np.int64)
    k = len(classes.names)
    codes = np.where(has, main, np.where(listed, k, k + 1)).astype(np.int64)
    return codes, list(classes.names) + [NO_OBJECTS, UNLABELLED]


def class_shares_tv(classes: ObjectClasses, population: np.ndarray, sample: np.ndarray) -> float:
    """Total-variation distance between the boxes' class shares on the ``sample`` rows and on
    the ``population`` rows (0: the selection's boxes mirror the data's)."""
    def shares(rows):
        totals = np.asarray(classes.counts[rows].sum(axis=0)).ravel()
        return totals / max(totals.sum(), 1.0)
    if not len(classes.names) or not len(sample) or not len(population):
        return 0.0
    return round(float(0.5 * np.abs(shares(sample) - shares(population)).sum()), 4)


def balance_by_objects(order: np.ndarray, classes: ObjectClasses, budget: int | None) -> tuple[np.ndarray, dict]:
    """Positions in ``order`` (rows, best first) that re-order it so that the first ``budget``
    bring the boxes' classes as evenly as whole images allow: each step serves the class with
    the fewest boxes so far (ties: the class with the fewest boxes on offer), taking among the
    next ``BALANCE_WINDOW`` images that hold it the one whose boxes are most of that class
    (ties: the better ranked); images without boxes follow. Returns the positions and the boxes
    per class of the first ``budget``."""
    budget = len(order) if budget is None else min(int(budget), len(order))
    by_row = classes.counts[order].tocsr()
    by_class = by_row.tocsc()
    k = by_row.shape[1]
    queues = [by_class.indices[by_class.indptr[c]:by_class.indptr[c + 1]] for c in range(k)]  # positions, ascending
    offered = np.asarray(by_row.sum(axis=0)).ravel()
    sizes = np.asarray(by_row.sum(axis=1)).ravel()
    heads = np.zeros(k, np.int64)
    taken = np.zeros(len(order), bool)
    totals = np.zeros(k)
    picks: list[int] = []
    while len(picks) < budget:
        for c in range(k):  # drop taken positions from each queue's head
            while heads[c] < len(queues[c]) and taken[queues[c][heads[c]]]:
                heads[c] += 1
        open_ = np.array([heads[c] < len(queues[c]) for c in range(k)], bool)
        if not open_.any():
            break
        c = int(np.lexsort((offered, np.where(open_, totals, np.inf)))[0])
        window = [int(p) for p in queues[c][heads[c]:] if not taken[p]][:BALANCE_WINDOW]
        share = [by_row[p, c] / max(sizes[p], 1.0) for p in window]
        position = window[int(np.argmax(share))]  # (argmax: the first, best ranked, of equals)
        taken[position] = True
        picks.append(position)
        totals += by_row[position].toarray().ravel()
    rest = np.flatnonzero(~taken)
    return np.concatenate([np.asarray(picks, np.int64), rest]), {n: int(totals[i]) for i, n in enumerate(classes.names)}
