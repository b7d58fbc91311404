"""The report's box map (detection runs): the boxes' crop vectors in 2-D, as the embedding map
places images (:mod:`curation.report.map`).

The same capped sample rule: every flagged box first (a box flag of
:data:`curation.object_scores.OBJECT_FLAGS`), then the other ok annotated boxes stratified by
class, at most ``report.map_points`` in all; only their crop vectors are fetched, in one Ray
task. The coordinates become ``objects/``'s ``x``, ``y`` (null for a box not plotted).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.config import ReportConfig
from curation.object_profile import annotated_ok_mask
from curation.object_scores import OBJECT_FLAGS
from curation.report.map import choose_map_rows, layout_in_task

log = logging.getLogger(__name__)


def flagged_boxes(objects: pa.Table) -> np.ndarray:
    """Rows that any declared box flag marks."""
    out = np.zeros(objects.num_rows, bool)
    for name in OBJECT_FLAGS:
        if name in objects.column_names:
            out |= pc.fill_null(objects[name], False).to_numpy(zero_copy_only=False).astype(bool)
    return out


def box_map_coordinates(objects: pa.Table, vectors, config: ReportConfig) -> tuple[pa.Table, dict]:
    """``objects`` with ``x``, ``y`` for the plotted boxes, and a summary (``run.json`` →
    ``objects.map``). ``vectors``: the ok boxes' crop vectors by ``object_vector_id``."""
    start = time.perf_counter()
    vector_id = objects["object_vector_id"].to_numpy(zero_copy_only=False).astype(np.float64)
    usable = np.isfinite(vector_id) & annotated_ok_mask(objects).to_numpy(zero_copy_only=False)
    labels = pc.dictionary_encode(objects["label"].cast(pa.string())).combine_chunks()
    codes = np.nan_to_num(labels.indices.to_numpy(zero_copy_only=False).astype(np.float64), nan=-1).astype(np.int64)
    rows = choose_map_rows(usable, flagged_boxes(objects), codes, config.map_points if vectors is not None else 0)
    coords = np.full((objects.num_rows, 2), np.nan, np.float32)
    how = "none"
    if len(rows):
        ids = vector_id[rows].astype(np.int64)
        order = np.argsort(ids)
        xy, how = layout_in_task(vectors, ids[order], config.map_method, what="the box map's UMAP task")
        coords[rows[order]] = xy
    has = np.isfinite(coords[:, 0])
    for name, column in (("x", coords[:, 0]), ("y", coords[:, 1])):
        objects = objects.set_column(objects.column_names.index(name), name, pa.array(column, pa.float32(), mask=~has))
    info = {"method": how, "points": int(has.sum()), "seconds": round(time.perf_counter() - start, 3)}
    log.info("box map: %d boxes by %s in %.1fs", info["points"], how, info["seconds"])
    return objects, info

