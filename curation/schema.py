"""Output column names and Arrow schemas: the ``samples`` and ``selections`` contract.

Names here are part of the product contract (DESIGN.md); more columns are welcome, none of
these may change meaning.
"""

from __future__ import annotations

import pyarrow as pa

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
        ("is_low_information", pa.bool_()),
        ("is_suspected_mislabel", pa.bool_()),
        ("content_hash", pa.string()),
        ("pixel_hash", pa.string()),
        ("phash", pa.int64()),
        ("neighbor_similarity", pa.float32()),
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

# Columns produced by decoding (besides pass-through input columns).
DECODE_COLUMNS = (
    "status", "reason", "width", "height", "brightness", "contrast", "sharpness",
    "content_hash", "pixel_hash", "phash",
)

RESERVED_COLUMNS = set(SAMPLES_CONTRACT.names) | set(SAMPLES_EXTRA.names) | set(INPUT_COLUMNS) | {
    "pixels", "embedding",
}
