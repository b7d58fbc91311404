"""The objects of a detection run (``input.annotations``): every box a row of ``objects/``.

Two steps, each returning a new table:

* :func:`read_objects` (preflight, before any work): the annotation file(s) read
  (:mod:`curation.annotations`) and joined to the listed inputs; a box whose image is not among
  them is a rejected row that says so. The file is checked here, so a file that cannot be read
  or parsed is exit 2 before any work.
* :func:`place_objects` (after decoding, when each image's size is known): the boxes put on
  their decoded image -- clipped within ``objects.clip_tolerance_px``, too small or too many
  rejected with a reason -- in the stored image's pixels, and given their ``object_id``
  (:func:`curation.item_key.object_ids`).

Accounting: every annotated box in is exactly one ``annotation`` row out, ``ok`` or
``rejected`` with a reason. The usable boxes travel to the decode stage (:mod:`curation.crop_store`),
which cuts their crops from the same decode as the image (:mod:`curation.stages.crops`); their
vectors are stored in ``object-embeddings/`` and named on each row (:func:`with_object_vectors`).

YOLO's ``.txt`` files are read by the driver at preflight (before Ray starts), 32 reads in
flight: about a minute per 100k files on S3 at 20 ms a read; at tens of millions of images this
step belongs on Ray tasks.
"""

from __future__ import annotations

import dataclasses
import logging
import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from curation.annotations import (COCO, YOLO, AnnotationsError, Annotations, box_matrix, place_boxes,
                                  read_annotations, to_pixels, yolo_label_path)
from curation.config import Config
from curation.config_sections import ObjectsConfig
from curation.index.source import parquet_parts
from curation.io.filesystem import Location, Resolver, StorageError, to_uri
from curation.item_key import object_ids
from curation.predictions import read_predictions
from curation.schema import is_ok, with_rejections

log = logging.getLogger(__name__)

SOURCE_ANNOTATION = "annotation"
# The columns of objects/*.parquet, in order (docs/contract.md).
OBJECTS_CONTRACT = pa.schema([
    ("uri", pa.string()), ("object_id", pa.string()), ("annotation_id", pa.string()), ("source", pa.string()),
    ("label", pa.string()), ("bbox", pa.list_(pa.float64(), 4)), ("area", pa.float64()), ("iscrowd", pa.bool_()),
    ("status", pa.string()), ("reason", pa.string()), ("segmentation", pa.string()), ("input_id", pa.int64()),
    # an annotator's correction of the box (curation/box_corrections.py): what changed and what was given
    ("change", pa.string()), ("given_label", pa.string()), ("given_bbox", pa.list_(pa.float64(), 4)),
])


@dataclass(frozen=True)
class ObjectsInput:
    """The boxes joined to the inputs (``input_id`` null where the image is not among them),
    their units (``pixels`` or ``fraction``) and, per input, how many boxes the annotations
    list for it (null: the annotations do not list the image, so it is unlabelled)."""

    boxes: pa.Table
    units: str
    object_count: pa.Array
    classes: tuple[str, ...]
    # input.predictions (curation/predictions.py) with each one's input_id; None without
    predictions: pa.Table | None = None
    # box corrections that hold tonight (kept with the run) and their counts (curation/box_corrections.py)
    corrections: pa.Table | None = None
    correction_counts: dict | None = None
    # input.object_embeddings: the box vectors' files (row i = box i; curation/object_vectors.py)
    vector_files: list | None = None


def read_objects(config: Config, resolver: Resolver, inputs: pa.Table) -> ObjectsInput:
    """``input.annotations`` read and joined to ``inputs`` (raises :class:`AnnotationsError`
    for a file that cannot be read or parsed)."""
    inp = config.input
    root = resolver.resolve(inp.images)
    location = resolver.resolve(inp.annotations)
    fmt = None if inp.annotations_format == "auto" else inp.annotations_format
    try:
        if (fmt or (YOLO if location.path.lower().endswith((".yaml", ".yml")) else COCO)) == YOLO:
            annotations = read_annotations(location, fmt=YOLO, label_files=_yolo_label_files(root, inputs))
        else:
            annotations = read_annotations(location, fmt=fmt)
    except StorageError as exc:
        raise AnnotationsError(f"input.annotations: {exc}") from None
    joined = _joined(annotations, root, inputs)
    if not inp.predictions:
        return joined
    try:
        predictions = read_predictions(resolver.resolve(inp.predictions), annotations)
    except StorageError as exc:
        raise AnnotationsError(f"input.predictions: {exc}") from None
    input_of = {name: i for i, name in enumerate(_relative_names(root, inputs)) if name is not None}
    ids = [input_of.get(f) if f is not None else None for f in predictions["file_name"].to_pylist()]
    return dataclasses.replace(joined, predictions=predictions.append_column("input_id", pa.array(ids, pa.int64())))


def _relative_names(root: Location, inputs: pa.Table) -> list[str | None]:
    prefix = root.uri.rstrip("/") + "/"
    return [u[len(prefix):] if isinstance(u, str) and u.startswith(prefix) else None
            for u in inputs["uri"].to_pylist()]


def _yolo_label_files(root: Location, inputs: pa.Table) -> dict[str, Location]:
    """Image name (relative to ``input.images``) -> its ``.txt``, for the images that have one
    (one listing per folder of label files)."""
    wanted: dict[str, str] = {}
    for name in _relative_names(root, inputs):
        if name is not None:
            wanted[name] = yolo_label_path(posixpath.join(root.path, name))
    present: set[str] = set()
    for folder in sorted({posixpath.dirname(p) for p in wanted.values()}):
        infos = root.filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        present.update(i.path for i in infos if i.type == pafs.FileType.File)
    return {name: Location(root.filesystem, path, to_uri(root.filesystem, path))
            for name, path in wanted.items() if path in present}


def _joined(annotations: Annotations, root: Location, inputs: pa.Table) -> ObjectsInput:
    names = _relative_names(root, inputs)
    input_of = {name: i for i, name in enumerate(names) if name is not None}
    boxes = annotations.boxes
    n = boxes.num_rows
    # Column-wise (millions of boxes): each box's input row by its file name, null where none.
    file_name = boxes["file_name"].cast(pa.string())
    input_id = pc.index_in(file_name, value_set=pa.array(names, pa.string()))
    prefix = root.uri.rstrip("/") + "/"
    table = pa.table({
        "uri": pc.binary_join_element_wise(prefix, file_name, ""), "annotation_id": boxes["annotation_id"],
        "source": pa.repeat(pa.scalar(SOURCE_ANNOTATION), n), "label": boxes["label"],
        "bbox": boxes["bbox"], "area": boxes["area"], "iscrowd": boxes["iscrowd"],
        "status": boxes["status"], "reason": boxes["reason"],
        "segmentation": boxes["segmentation"], "input_id": input_id.cast(pa.int64()),
        "change": pa.nulls(n, pa.string()), "given_label": pa.nulls(n, pa.string()),
        "given_bbox": pa.nulls(n, pa.list_(pa.float64(), 4)),
    })
    not_listed = pc.binary_join_element_wise("image '", file_name, f"' is not among the inputs under {root.uri}", "")
    table = with_rejections(table, ~pc.is_valid(input_id).to_numpy(zero_copy_only=False), pc.fill_null(
        not_listed, "no file name"))
    counts: list[int | None] = [None] * inputs.num_rows
    for row in annotations.images.to_pylist():
        where = input_of.get(row["file_name"])
        if where is not None:
            counts[where] = row["boxes"]
    rejected = table.num_rows - int(is_ok(table["status"]).sum())
    log.info("annotations: %d boxes on %d listed images (%d classes); %d rejected before decoding",
             table.num_rows, annotations.images.num_rows, len(annotations.classes), rejected)
    return ObjectsInput(table, annotations.units, pa.array(counts, pa.int32()), annotations.classes)


def within_cap(boxes: pa.Table, max_per_image: int) -> np.ndarray:
    """The boxes among the first ``max_per_image`` of their image that the annotations list
    usable (in the file's order); the rest are over the per-image cap."""
    ok = is_ok(boxes["status"])
    input_id = boxes["input_id"].to_numpy(zero_copy_only=False).astype(np.float64)
    keep = np.ones(len(ok), bool)
    rows = np.flatnonzero(ok & ~np.isnan(input_id))
    order = rows[np.argsort(input_id[rows], kind="stable")]  # each image's usable boxes, in file order
    owner = input_id[order]
    starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]]) if len(order) else np.zeros(0, np.int64)
    place = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    keep[order] = place < max_per_image
    return keep


@dataclass(frozen=True)
class ObjectVectors:
    """The crop vectors a detection run stored (``object-embeddings/``): the files in order
    (:func:`~curation.index.source.parquet_parts`) and, per stored vector, its box's row in the
    objects table (-1: a square of its image's background) and its image's ``input_id``;
    ``copied``: how many of them came from the crop store (:mod:`curation.crop_store`)."""

    parts: list
    rows: np.ndarray
    images: np.ndarray
    copied: int = 0


@dataclass(frozen=True)
class PlacedObjects:
    """A detection run's objects after scoring: the ``objects/`` table, ``run.json`` →
    ``objects``, and the ok boxes' crop vectors by ``object_vector_id`` (a
    :class:`~curation.index.source.VectorParts`; None when no box had one)."""

    table: pa.Table
    summary: dict
    vectors: object = None


def read_object_vectors(folder: Location, names: list[str], *, copied: list[str] = ()) -> ObjectVectors:
    """The ``object-embeddings/`` files ``names`` (those written tonight, then ``copied``: those
    copied from the crop store) and their ``object_row`` column (8 bytes a box on the driver;
    the vectors stay where they are)."""
    files = [folder.child(name) for name in names]
    tables = [pq.read_table(f.path, columns=["object_row", "input_id"], filesystem=f.filesystem) for f in files]
    rows = [t["object_row"].to_numpy() for t in tables]
    images = [t["input_id"].to_numpy() for t in tables]
    empty = np.zeros(0, np.int64)
    from_store = sum(t.num_rows for t, name in zip(tables, names) if name in set(copied))
    return ObjectVectors(parquet_parts(files), np.concatenate(rows) if rows else empty,
                         np.concatenate(images) if images else empty, from_store)


def with_object_vectors(table: pa.Table, vector_rows: np.ndarray) -> tuple[pa.Table, np.ndarray]:
    """``object_vector_id`` on every ok box whose crop was embedded (``vector_rows``: the
    objects-table row of each stored crop vector, in storage order), and the mask over those
    vectors that are kept (their box is ok). An ok box without a vector becomes a rejected row
    that says so (never silently dropped)."""
    n = table.num_rows
    ok = is_ok(table["status"])
    in_range = (vector_rows >= 0) & (vector_rows < n)
    keep = np.zeros(len(vector_rows), bool)
    keep[in_range] = ok[vector_rows[in_range]]
    ids = np.full(n, -1, np.int64)
    ids[vector_rows[keep]] = np.arange(int(keep.sum()))
    missing = ok & (ids < 0)
    if missing.any():
        log.warning("objects: %d ok boxes got no crop vector (rejected with a reason)", int(missing.sum()))
    table = with_rejections(table, missing, "no crop was embedded for this box")
    return table.append_column("object_vector_id", pa.array(ids, pa.int64(), mask=ids < 0)), keep


def place_objects(objects: ObjectsInput, samples: pa.Table, cfg: ObjectsConfig) -> pa.Table:
    """The boxes on their decoded images (``samples``: one row per input, by ``input_id``), in
    ``OBJECTS_CONTRACT`` order: pixel boxes clipped to the image, ``object_id`` set, a box of a
    rejected image, one out of the image, too small, or over ``cfg.max_per_image`` rejected."""
    boxes = objects.boxes
    n = boxes.num_rows
    samples = samples.sort_by("input_id")
    input_id = boxes["input_id"].to_numpy(zero_copy_only=False)
    has_image = ~np.isnan(input_id.astype(np.float64))
    row = np.where(has_image, np.nan_to_num(input_id.astype(np.float64)), 0).astype(np.int64)
    image_ok = is_ok(samples["status"])[row] & has_image if samples.num_rows else np.zeros(n, bool)
    width, height = (samples[c].to_numpy(zero_copy_only=False).astype(np.float64)[row] if samples.num_rows
                     else np.zeros(n) for c in ("width", "height"))
    # No size (precomputed vectors: nothing decoded): a box is placed on an unbounded image.
    unknown = ~(np.nan_to_num(width) > 0) | ~(np.nan_to_num(height) > 0)
    width, height = np.where(unknown, np.inf, width), np.where(unknown, np.inf, height)
    if "orientation" in samples.column_names and samples.num_rows:  # the stored frame (EXIF turned 90 degrees)
        turned = np.isin(samples["orientation"].to_numpy(zero_copy_only=False)[row], (5, 6, 7, 8))
        width, height = np.where(turned, height, width), np.where(turned, width, height)
    over = ~within_cap(boxes, cfg.max_per_image)  # the per-image cap, before placement (the decode stage's rule too)
    boxes = with_rejections(boxes, over, f"more than objects.max_per_image ({cfg.max_per_image}) boxes on this image")
    raw, known = box_matrix(boxes["bbox"])
    sized = image_ok & known
    pixels = np.full((n, 4), np.nan)
    if sized.any():
        pixels[sized] = to_pixels(raw[sized], units=objects.units, width=width[sized], height=height[sized])
    placed = pixels.copy()
    if sized.any():
        placed[sized], why = place_boxes(raw[sized], units=objects.units, width=width[sized], height=height[sized],
                                         tolerance_px=cfg.clip_tolerance_px,
                                         min_size_px=0.0 if objects.vector_files else cfg.min_size_px)
        why = pc.replace_with_mask(pa.nulls(n, pa.string()), pa.array(sized), why)  # a reason per row, or null
        boxes = with_rejections(boxes, why.is_valid().to_numpy(zero_copy_only=False), why)
    unplaced = has_image & ~image_ok
    if unplaced.any():
        image_reason = pc.fill_null(samples["reason"].take(pa.array(row)).cast(pa.string()), "no reason given")
        boxes = with_rejections(boxes, unplaced, pc.binary_join_element_wise("image rejected: ", image_reason, ""))
    # Pixels where the image's size is known; a COCO box (pixels already) as given otherwise.
    shown = np.where(sized[:, None], placed, raw if objects.units == "pixels" else np.nan).round(3)
    shown_ok = known & ~np.isnan(shown).any(axis=1)
    bbox = _box_array(shown, shown_ok)
    ids = object_ids(boxes["uri"], _box_array(pixels, sized))
    pixel_area = pa.array(shown[:, 2] * shown[:, 3], pa.float64(), mask=~shown_ok)
    area = pc.if_else(pc.is_valid(boxes["area"]), boxes["area"], pixel_area)
    if objects.units == "fraction":  # YOLO gives no area: the pixel box's
        area = pixel_area
    table = boxes.set_column(boxes.schema.get_field_index("bbox"), "bbox", bbox)
    table = table.set_column(table.schema.get_field_index("area"), "area", area)
    table = table.append_column("object_id", ids)
    return table.select(OBJECTS_CONTRACT.names).cast(OBJECTS_CONTRACT)


def _box_array(matrix: np.ndarray, valid: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.where(valid[:, None], matrix, 0.0).ravel(), pa.float64()), 4,
                                             mask=pa.array(~valid))


def objects_summary(objects: pa.Table, object_count: pa.Array) -> dict:
    """``run.json`` → ``objects``: boxes in, ok and rejected, per class, and the reasons."""
    ok = is_ok(objects["status"])
    labels = objects["label"].filter(pa.array(ok)).drop_null()
    per_class = {str(v["values"]): int(v["counts"]) for v in pc.value_counts(labels).to_pylist()} if len(labels) else {}
    reasons: dict[str, int] = {}
    for text in objects["reason"].filter(pa.array(~ok)).to_pylist():
        head = (text or "").split(":")[0].split(" (")[0][:80]
        reasons[head] = reasons.get(head, 0) + 1
    listed = pc.drop_null(object_count)
    return {"annotations": objects.num_rows, "ok": int(ok.sum()), "rejected": int((~ok).sum()),
            "images_listed": len(listed), "images_listed_empty": int(pc.sum(pc.equal(listed, 0)).as_py() or 0),
            "per_class": per_class, "rejected_by_reason": dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:20])}
