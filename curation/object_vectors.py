"""``input.object_embeddings``: precomputed box vectors beside ``input.embeddings``.

Each row of the Parquet file(s) is one box: ``uri`` (its image, as ``input.embeddings`` names
it), ``bbox`` (``[x, y, w, h]`` pixels), ``label``, ``embedding``, and optionally
``annotation_id`` and ``iscrowd``. Nothing is decoded: the boxes become ``objects/`` rows as
annotated boxes do (:mod:`curation.objects`), their vectors are read where they are stored (row
i of the files, in name order, is box i) and scored from their own kNN graph. Without pixels
there are no background squares (``box_spurious_quality`` is null) and no image size (a box is
checked for a positive area and non-negative corner only, never clipped).

The driver reads every column but the vectors at preflight (the same bytes per box as an
image's row); Ray tasks check the vectors where they are stored.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from curation.config import Config, ConfigError
from curation.io.filesystem import Location, Resolver, to_uri
from curation.annotations import box_matrix
from curation.objects import SOURCE_ANNOTATION, ObjectVectors, ObjectsInput
from curation.index.source import parquet_parts
from curation.schema import STATUS_OK, STATUS_REJECTED, with_rejections

REQUIRED = ("uri", "bbox", "label", "embedding")
BOX = pa.list_(pa.float64(), 4)


def read_object_embeddings(config: Config, resolver: Resolver) -> ObjectsInput:
    """The boxes of ``input.object_embeddings`` (every column but the vectors), each bad box a
    rejected row with a reason; ``input_id`` is joined later (:func:`joined_to_samples`).
    Raises :class:`ConfigError` for a file that cannot be read or lacks a required column."""
    location = resolver.resolve(config.input.object_embeddings)
    key = "config key 'input.object_embeddings'"
    try:
        dataset = pads.dataset(location.path, filesystem=location.filesystem, format="parquet")
        names = dataset.schema.names
        missing = [c for c in REQUIRED if c not in names]
        if missing:
            raise ConfigError(f"{key}: {location.uri} has no {missing[0]!r} column (columns: {', '.join(names)})")
        wanted = [c for c in ("uri", "bbox", "label", "annotation_id", "iscrowd") if c in names]
        table = dataset.to_table(columns=wanted)
        files = [Location(location.filesystem, p, to_uri(location.filesystem, p)) for p in dataset.files]
    except (OSError, pa.ArrowException) as exc:
        raise ConfigError(f"{key}: {location.uri}: cannot read Parquet ({str(exc).splitlines()[0]})") from None
    n = table.num_rows
    bbox, reason = _checked_boxes(table["bbox"])
    reason = pc.if_else(pc.is_valid(table["uri"]), reason, pa.scalar("no uri naming the image"))
    label = table["label"].cast(pa.string())
    reason = pc.if_else(pc.or_(pc.is_valid(reason), pc.is_valid(label)), reason, pa.scalar("no label"))
    ok = ~pc.is_valid(reason).to_numpy(zero_copy_only=False)
    matrix, _ = box_matrix(bbox)
    area = pa.array(matrix[:, 2] * matrix[:, 3], pa.float64(), mask=~bbox.is_valid().to_numpy(zero_copy_only=False))
    annotation_id = (table["annotation_id"].cast(pa.string()) if "annotation_id" in names
                     else pa.array(np.arange(n)).cast(pa.string()))
    iscrowd = pc.fill_null(table["iscrowd"].cast(pa.bool_()), False) if "iscrowd" in names else pa.array(
        np.zeros(n, bool))
    boxes = pa.table({
        "uri": table["uri"].cast(pa.string()), "annotation_id": annotation_id,
        "source": pa.repeat(pa.scalar(SOURCE_ANNOTATION), n), "label": label, "bbox": bbox, "area": area,
        "iscrowd": iscrowd, "status": pc.if_else(pa.array(ok), pa.scalar(STATUS_OK), pa.scalar(STATUS_REJECTED)),
        "reason": reason, "segmentation": pa.nulls(n, pa.string()), "input_id": pa.nulls(n, pa.int64()),
        "change": pa.nulls(n, pa.string()), "given_label": pa.nulls(n, pa.string()), "given_bbox": pa.nulls(n, BOX),
    })
    classes = tuple(sorted(set(label.filter(pa.array(ok)).drop_null().to_pylist())))
    return ObjectsInput(boxes, "pixels", pa.nulls(0, pa.int32()), classes, vector_files=files)


def _checked_boxes(column: pa.ChunkedArray) -> tuple[pa.Array, pa.Array]:
    """``bbox`` as four float64 (null where unusable) and the reason of each unusable one:
    vectorised (a million boxes), row by row only for a column that is not lists of four."""
    try:
        matrix, known = box_matrix(column)
    except (pa.ArrowException, ValueError, TypeError):
        return _checked_boxes_one_by_one(column.to_pylist())
    good = known & np.isfinite(matrix).all(axis=1)
    bad = np.flatnonzero(~good)
    reasons = np.full(len(good), None, dtype=object)
    if len(bad):
        shown = column.take(pa.array(bad)).to_pylist()
        reasons[bad] = [f"bbox: expected 4 finite numbers [x, y, w, h], got {str(b)[:60]}" for b in shown]
    return (pa.FixedSizeListArray.from_arrays(pa.array(np.where(good[:, None], matrix, 0.0).ravel()), 4,
                                              mask=pa.array(~good)), pa.array(reasons, pa.string()))


def _checked_boxes_one_by_one(values: list) -> tuple[pa.Array, pa.Array]:
    out, reasons = [], []
    for box in values:
        try:
            numbers = [float(v) for v in box] if box is not None else []
        except (TypeError, ValueError):
            numbers = []
        if len(numbers) != 4 or not all(np.isfinite(numbers)):
            out.append(None)
            reasons.append(f"bbox: expected 4 finite numbers [x, y, w, h], got {str(box)[:60]}")
        else:
            out.append(numbers)
            reasons.append(None)
    return pa.array(out, BOX), pa.array(reasons, pa.string())


def joined_to_samples(objects: ObjectsInput, samples: pa.Table, checks: list) -> tuple[ObjectsInput, ObjectVectors]:
    """The boxes given their image's ``input_id`` (by ``uri``; a box of an image the embeddings
    do not hold, or whose vector is null, of another length, zero or not finite, is rejected
    with the reason), each image's ``object_count``, and the box vectors where they are stored.
    ``checks``: :func:`curation.io.inputs.check_vectors` of each file, in order."""
    boxes = objects.boxes
    where = pc.index_in(boxes["uri"], value_set=samples["uri"].combine_chunks().cast(pa.string()))
    ids = samples["input_id"].take(pc.fill_null(where, 0)).to_numpy(zero_copy_only=False) if samples.num_rows \
        else np.zeros(boxes.num_rows, np.int64)
    found = pc.is_valid(where).to_numpy(zero_copy_only=False)
    lengths = np.concatenate([c[0] for c in checks]) if checks else np.zeros(0, np.int64)
    finite = np.concatenate([c[1] for c in checks]) if checks else np.zeros(0, bool)
    valid = lengths >= 0
    dim = int(lengths[valid][0]) if valid.any() else 0
    # Column-wise (millions of boxes): the first problem of each box, as its reason.
    for bad, why in ((~found, pc.binary_join_element_wise("image '", boxes["uri"], "' is not among input.embeddings",
                                                          "")),
                     (~valid, "corrupt: null embedding"),
                     (lengths != dim, f"corrupt: embedding length differs from {dim}"),
                     (~finite, "corrupt: embedding is zero or not finite")):
        boxes = with_rejections(boxes, bad, why)
    input_id = np.where(found, ids, -1).astype(np.int64)
    boxes = boxes.set_column(boxes.schema.get_field_index("input_id"), "input_id",
                             pa.array(input_id, pa.int64(), mask=~found))
    counts = np.bincount(input_id[found], minlength=samples.num_rows)[:samples.num_rows]
    vectors = ObjectVectors(parquet_parts(objects.vector_files), np.arange(boxes.num_rows, dtype=np.int64), input_id)
    return dataclasses.replace(objects, boxes=boxes, object_count=pa.array(counts.astype(np.int32))), vectors
