"""Output column names and Arrow schemas: the ``samples`` and ``selections`` contract.

Names here are part of the output contract (docs/contract.md); more columns are welcome, none of
these may change meaning.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

STATUS_OK = "ok"
STATUS_REJECTED = "rejected"

# The contract columns of samples/*.parquet, in order.
SAMPLES_CONTRACT = pa.schema(
    [
        ("uri", pa.string()),
        ("label", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("brightness", pa.float32()),
        ("is_dark", pa.bool_()),
        ("is_bright", pa.bool_()),
        ("is_blurry", pa.bool_()),
        ("dup_group", pa.int64()),
        ("dup_of", pa.string()),
        ("sparseness", pa.float32()),
        ("label_quality", pa.float32()),
        ("suggested_label", pa.string()),
        ("cluster", pa.int32()),
        ("x", pa.float32()),
        ("y", pa.float32()),
    ]
)

# Extra columns we add (after the contract ones, before metadata).
SAMPLES_EXTRA = pa.schema(
    [
        ("input_id", pa.int64()),
        ("fingerprint", pa.string()),
        ("contrast", pa.float32()),
        ("sharpness", pa.float32()),
        ("shadows", pa.float32()),
        ("highlights", pa.float32()),
        ("is_low_information", pa.bool_()),
        ("is_suspected_mislabel", pa.bool_()),
        ("suggested_confidence", pa.float32()),
        ("is_disputed", pa.bool_()),
        ("label_source", pa.string()),
        ("given_label", pa.string()),
        ("content_hash", pa.string()),
        ("pixel_hash", pa.string()),
        ("phash", pa.int64()),
        ("neighbor_similarity", pa.float32()),
        ("dup_kind", pa.string()),
        ("cluster_similarity", pa.float32()),
        ("vector_id", pa.int64()),
        ("object_count", pa.int32()),  # detection runs: boxes the annotations list (null: not listed)
        ("object_quality", pa.float32()),  # detection runs: the image's lowest box_quality (curation/object_scores.py)
        ("box_mislabel_count", pa.int32()),
        ("spurious_box_count", pa.int32()),
        ("duplicate_box_count", pa.int32()),
        ("degenerate_box_count", pa.int32()),
        ("misplaced_box_count", pa.int32()),
        ("overlooked_object_count", pa.int32()),
    ]
)

SELECTION_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("label", pa.string()),
        ("rank", pa.int32()),
        ("score", pa.float32()),
        ("reason", pa.string()),
    ]
)

# Columns produced by listing inputs; anything else in a manifest is metadata.
INPUT_COLUMNS = ("input_id", "uri", "label", "input_error", "fingerprint")

# Internal columns that never reach samples/*.parquet (pixels and vectors travel between stages;
# input_error becomes the reason; vector_file / vector_row become vector_id).
INTERNAL_COLUMNS = ("pixels", "embedding", "copy_vector", "input_error", "vector_file", "vector_row")

# Names a manifest column may not take (the score registry adds its own columns to these:
# see ``curation.scores.reserved_columns``).
SCHEMA_COLUMNS = frozenset(SAMPLES_CONTRACT.names) | frozenset(SAMPLES_EXTRA.names) | frozenset(INPUT_COLUMNS) | frozenset(
    INTERNAL_COLUMNS)


def is_ok(status) -> np.ndarray:
    """The one rule for a usable item: ``status == 'ok'`` (Arrow or numpy column in, bool array out)."""
    if isinstance(status, (pa.Array, pa.ChunkedArray)):
        return pc.fill_null(pc.equal(status, STATUS_OK), False).to_numpy(zero_copy_only=False).astype(bool)
    return np.asarray(status == STATUS_OK, bool)


def with_rejections(table: pa.Table, mask: np.ndarray, reason) -> pa.Table:
    """``table`` with its ok rows under ``mask`` rejected for ``reason``: one string, or an
    array with one per row (only the masked rows' are read). A row already rejected keeps its
    first reason. Column-wise, without a Python object per row (tables of millions of boxes)."""
    change = np.asarray(mask, bool) & is_ok(table["status"])
    if not change.any():
        return table
    where = pa.array(change)
    why = pa.scalar(reason, pa.string()) if isinstance(reason, str) else pc.cast(reason, pa.string())
    status = pc.if_else(where, pa.scalar(STATUS_REJECTED), table["status"])
    reasons = pc.if_else(where, why, table["reason"])
    table = table.set_column(table.schema.get_field_index("status"), "status", status)
    return table.set_column(table.schema.get_field_index("reason"), "reason", reasons)


def vector_id_of_rows(samples: pa.Table) -> np.ndarray:
    """Each row's position among the stored vectors (-1 for a rejected row): the inverse of
    :func:`ok_rows_in_vector_order`."""
    out = np.full(samples.num_rows, -1, np.int64)
    rows = ok_rows_in_vector_order(samples)
    out[rows] = np.arange(len(rows))
    return out


def ok_rows_in_vector_order(samples: pa.Table) -> np.ndarray:
    """Row numbers of the ok items ordered by ``vector_id`` (their position among the stored
    vectors, which is also their id in the kNN graph)."""
    ok = np.flatnonzero(is_ok(samples["status"]))
    if "vector_id" not in samples.column_names:
        return ok
    vector_id = samples["vector_id"].to_numpy(zero_copy_only=False)[ok]
    return ok[np.argsort(vector_id, kind="stable")]
