"""The ``box_review`` selection mode: a detection run's annotated boxes to review, one row per
box, lowest ``box_quality`` first (every box error pools into it: see
:mod:`curation.object_scores`), the budget in boxes.

Eligible: ``source = annotation`` rows that are ``ok`` and scored; ``where`` filters over the
``objects/`` columns (``label``, ``area``, the box scores and flags, ...), ``balance_on`` names
one of them (interleaved round-robin over its values). The selection file adds ``object_id``
and ``bbox`` to the usual columns, and the nightly diff keys it by ``object_id``.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.config import SelectionConfig
from curation.object_scores import OBJECT_FLAGS, OBJECTS_MANIFEST
from curation.objects import SOURCE_ANNOTATION
from curation.schema import SELECTION_SCHEMA, STATUS_OK
from curation.select_view import SelectionResult, columns_named, interleave_by
from curation.where import where_mask

log = logging.getLogger(__name__)

MODE = "box_review"
BOX_SELECTION_SCHEMA = pa.schema(list(SELECTION_SCHEMA) + [("object_id", pa.string()),
                                                           ("bbox", pa.list_(pa.float64(), 4))])


def box_review(objects: pa.Table, sel: SelectionConfig) -> SelectionResult:
    """``sel`` (mode ``box_review``) over a detection run's ``objects`` table."""
    quality = objects["box_quality"].to_numpy(zero_copy_only=False).astype(np.float64)
    eligible = (pc.fill_null(pc.and_(pc.equal(objects["source"], SOURCE_ANNOTATION),
                                     pc.equal(objects["status"], STATUS_OK)), False).to_numpy(zero_copy_only=False)
                & np.isfinite(quality))
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
