"""Box corrections from annotators: a Label Studio rectangle export folded into detection runs.

``input.label_corrections`` in a detection run is Label Studio's JSON export of the tasks
``curation export`` wrote (:mod:`curation.export_boxes`): each task's ``data.objects`` lists the
image's boxes as given, and the task's latest annotation that was not cancelled holds the
rectangles the annotator left. Compared region by region (a region's ``id`` is its box's
``object_id``):

* a given box whose region has another class is **relabelled**; moved by more than
  ``MOVE_TOLERANCE_PX`` on any side, it is **moved** (both may hold);
* a given box with no region is **deleted** (kept as a ``rejected`` row that says so: every box
  in is still one row out);
* a region with no given box (drawn anew, or one of the run's suggested overlooked objects
  accepted) is **added** (a row with ``source = correction``);
* a rotated rectangle is not applied (counted under ``rotated`` in run.json).

Corrections are applied before decoding (a moved or added box's crop is cut where the annotator
put it) and kept with the run (``object-corrections.parquet``); the next nights apply them
again from there while their image is unchanged (:mod:`curation.item_key`), so they hold
without the file. A newer correction of a box replaces the older one.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa

from curation.annotations import to_pixels
from curation.corrections import CorrectionsError, checked_label
from curation.io.filesystem import Location, StorageError, read_bytes
from curation.item_key import match_items, object_ids
from curation.schema import STATUS_OK, STATUS_REJECTED

MOVE_TOLERANCE_PX = 1.0
SOURCE_CORRECTION = "correction"
BOX = pa.list_(pa.float64(), 4)
# What an objects/ row says of its correction (null where none applies).
CORRECTION_COLUMNS = (("change", pa.string()), ("given_label", pa.string()), ("given_bbox", BOX))
STORE_SCHEMA = pa.schema([
    ("uri", pa.string()), ("fingerprint", pa.string()), ("object_id", pa.string()), ("change", pa.string()),
    ("label", pa.string()), ("bbox", BOX), ("width", pa.int64()), ("height", pa.int64()),
    ("given_label", pa.string()), ("given_bbox", BOX), ("run_id", pa.string()),
])


def read_box_answers(location: Location) -> tuple[pa.Table, dict]:
    """The box corrections in a Label Studio rectangle export (``STORE_SCHEMA`` without
    ``fingerprint`` and ``run_id``) and counts of what was skipped. Raises
    :class:`~curation.corrections.CorrectionsError` naming the file and the first bad task."""
    try:
        tasks = json.loads(read_bytes(location))
    except OSError as exc:
        raise StorageError(f"{location.uri}: cannot read label corrections ({exc})") from exc
    except ValueError as exc:
        raise CorrectionsError(f"{location.uri}: not a Label Studio JSON export ({exc})") from None
    if not isinstance(tasks, list):
        raise CorrectionsError(f"{location.uri}: expected a list of Label Studio tasks, got {type(tasks).__name__}")
    rows, skipped = [], {"rotated": 0, "tasks_without_answer": 0}
    for i, task in enumerate(tasks):
        where = f"{location.uri}: task {i}"
        data = task.get("data") if isinstance(task, dict) else None
        if not isinstance(data, dict) or not isinstance(data.get("uri"), str) or not isinstance(data.get("objects"),
                                                                                                 list):
            raise CorrectionsError(f"{where}: no data.uri and data.objects (box tasks as `curation export` writes "
                                   f"them for a detection run)")
        answer = _latest_answer(task.get("annotations"), where)
        if answer is None:
            skipped["tasks_without_answer"] += 1
            continue
        rows += _task_changes(data, answer, where, skipped)
    if not rows and not any(isinstance(t, dict) and t.get("annotations") for t in tasks):
        raise CorrectionsError(f"{location.uri}: no answers in it (expected Label Studio tasks with annotations)")
    return pa.Table.from_pylist(rows, schema=STORE_SCHEMA.remove(10).remove(1)), skipped


def _latest_answer(annotations, where: str) -> list | None:
    if annotations is None:
        return None
    if not isinstance(annotations, list) or not all(isinstance(a, dict) for a in annotations):
        raise CorrectionsError(f"{where}: 'annotations' must be a list of objects")
    kept = [a for a in annotations if not a.get("was_cancelled")]
    if not kept:
        return None
    latest = max(kept, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), a.get("id") or 0))
    result = latest.get("result") or []
    if not isinstance(result, list) or not all(isinstance(r, dict) for r in result):
        raise CorrectionsError(f"{where}: an annotation's 'result' must be a list of objects")
    return result


def _task_changes(data: dict, result: list, where: str, skipped: dict) -> list[dict]:
    width, height = data.get("width"), data.get("height")
    given = {}
    for obj in data["objects"]:
        if not isinstance(obj, dict) or not isinstance(obj.get("object_id"), str):
            raise CorrectionsError(f"{where}: data.objects entries need an object_id")
        given[obj["object_id"]] = obj
    seen, rows = set(), []
    for region in result:
        if region.get("type") != "rectanglelabels":
            continue
        value = region.get("value") or {}
        labels = value.get("rectanglelabels") or []
        if len(labels) != 1:
            continue
        if abs(float(value.get("rotation") or 0.0)) > 1e-6:
            skipped["rotated"] += 1
            continue
        w = float(region.get("original_width") or width or 0)
        h = float(region.get("original_height") or height or 0)
        if w <= 0 or h <= 0:
            raise CorrectionsError(f"{where}: a rectangle without the image's size (original_width/height)")
        try:
            bbox = [float(value["x"]) * w / 100, float(value["y"]) * h / 100,
                    float(value["width"]) * w / 100, float(value["height"]) * h / 100]
        except (KeyError, TypeError, ValueError):
            raise CorrectionsError(f"{where}: a rectangle needs numeric x, y, width and height") from None
        label = checked_label(labels[0], where)
        row = {"uri": data["uri"], "label": label, "bbox": bbox, "width": int(w), "height": int(h)}
        old = given.get(region.get("id"))
        if old is None:
            rows.append(dict(row, object_id=None, change="added", given_label=None, given_bbox=None))
            continue
        seen.add(old["object_id"])
        moved = np.abs(np.subtract(bbox, old["bbox"])).max() > MOVE_TOLERANCE_PX
        changes = [c for c, on in (("moved", moved), ("relabelled", label != old["label"])) if on]
        if changes:
            rows.append(dict(row, object_id=old["object_id"], change=", ".join(changes),
                             given_label=old["label"], given_bbox=old["bbox"]))
    for object_id, old in given.items():
        if object_id not in seen:
            rows.append({"uri": data["uri"], "object_id": object_id, "change": "deleted", "label": old["label"],
                         "bbox": old["bbox"], "width": width, "height": height, "given_label": old["label"],
                         "given_bbox": old["bbox"]})
    return rows


def kept_corrections(new: pa.Table | None, stored: pa.Table | None, inputs: pa.Table, run_id: str) -> pa.Table:
    """The corrections that hold tonight: the stored ones whose image is unchanged, then the new
    ones (their image's fingerprint taken from ``inputs``), a newer one of a box replacing an
    older one."""
    keep: dict[tuple, dict] = {}
    if stored is not None and stored.num_rows:
        still = match_items(stored, inputs) >= 0
        for row, same in zip(stored.to_pylist(), still):
            if same:
                keep[(row["uri"], row["object_id"] or json.dumps(row["bbox"]))] = row
    if new is not None and new.num_rows:
        fingerprint = dict(zip(inputs["uri"].to_pylist(), inputs["fingerprint"].to_pylist())) \
            if "fingerprint" in inputs.column_names else {}
        for row in new.to_pylist():
            if row["uri"] in fingerprint or "fingerprint" not in inputs.column_names:
                row = dict(row, fingerprint=fingerprint.get(row["uri"]), run_id=run_id)
                keep[(row["uri"], row["object_id"] or json.dumps(row["bbox"]))] = row
    return pa.Table.from_pylist(list(keep.values()), schema=STORE_SCHEMA) if keep else STORE_SCHEMA.empty_table()


def apply_box_corrections(boxes: pa.Table, units: str, corrections: pa.Table) -> tuple[pa.Table, dict]:
    """``boxes`` (the objects input: ``uri``, ``bbox`` in ``units``, ``label``, ``status`` ...)
    with ``corrections`` applied: ``change``, ``given_label`` and ``given_bbox`` set on every
    corrected row, added boxes appended. Returns the table and run.json's counts."""
    n = boxes.num_rows
    columns = {name: boxes[name].to_pylist() for name in boxes.column_names}
    for name in ("change", "given_label", "given_bbox"):
        columns.setdefault(name, [None] * n)
    counts = {"applied": 0, "unmatched": 0, "added": 0, "deleted": 0, "moved": 0, "relabelled": 0}
    by_uri: dict[str, list[dict]] = {}
    for row in corrections.to_pylist():
        by_uri.setdefault(row["uri"], []).append(row)
    uris = columns["uri"]
    for uri, rows in by_uri.items():
        mine = [i for i in range(n) if uris[i] == uri]
        size = next(((r["width"], r["height"]) for r in rows if r["width"] and r["height"]), (0, 0))
        ids = _ids_of(uri, [columns["bbox"][i] for i in mine], units, size)
        where = dict(zip(ids, mine))
        for row in rows:
            if row["change"] == "added":
                _append(columns, boxes.column_names, row, _in_units(row["bbox"], units, size))
                counts["added"] += 1
                counts["applied"] += 1
                continue
            i = where.get(row["object_id"])
            if i is None:
                counts["unmatched"] += 1
                continue
            counts["applied"] += 1
            columns["change"][i], columns["given_label"][i], columns["given_bbox"][i] = (
                row["change"], columns["label"][i], row["given_bbox"])
            if row["change"] == "deleted":
                counts["deleted"] += 1
                if columns["status"][i] == STATUS_OK:
                    columns["status"][i] = STATUS_REJECTED
                    columns["reason"][i] = f"deleted by a label correction (run {row['run_id']})"
                continue
            if "moved" in row["change"]:
                counts["moved"] += 1
                columns["bbox"][i] = _in_units(row["bbox"], units, size)
            if "relabelled" in row["change"]:
                counts["relabelled"] += 1
                columns["label"][i] = row["label"]
    schema = boxes.schema
    for name, type_ in CORRECTION_COLUMNS:
        if name not in schema.names:
            schema = schema.append(pa.field(name, type_))
    return pa.table({name: pa.array(columns[name], schema.field(name).type) for name in schema.names}), counts


def _ids_of(uri: str, raw: list, units: str, size: tuple[int, int]) -> list[str | None]:
    """The object ids the boxes ``raw`` of one image get (:func:`curation.objects.place_objects`'s rule)."""
    if not raw:
        return []
    known = [b is not None for b in raw]
    box = np.array([b if b is not None else [0.0] * 4 for b in raw], np.float64)
    pixels = to_pixels(box, units=units, width=np.full(len(box), size[0]), height=np.full(len(box), size[1]))
    ids = object_ids(pa.array([uri] * len(raw)), pa.array([p.tolist() if k else None
                                                           for p, k in zip(pixels, known)], BOX))
    return ids.to_pylist()


def _in_units(bbox: list[float], units: str, size: tuple[int, int]) -> list[float]:
    if units != "fraction":
        return list(bbox)
    width, height = size
    return [bbox[0] / width, bbox[1] / height, bbox[2] / width, bbox[3] / height]


def _append(columns: dict, names: list[str], row: dict, bbox: list[float]) -> None:
    new = {"uri": row["uri"], "label": row["label"], "bbox": bbox, "status": STATUS_OK, "reason": None,
           "source": SOURCE_CORRECTION, "iscrowd": False, "change": "added"}
    for name in dict.fromkeys(list(names) + [c for c, _ in CORRECTION_COLUMNS]):
        columns[name].append(new.get(name))


def with_box_corrections(objects, inputs: pa.Table, *, new: pa.Table | None, stored: pa.Table | None,
                         run_id: str):
    """``objects`` (:class:`~curation.objects.ObjectsInput`) with the corrections that hold
    tonight applied; its ``corrections`` (kept with the run) and ``correction_counts`` set."""
    kept = kept_corrections(new, stored, inputs, run_id)
    boxes, counts = apply_box_corrections(objects.boxes, objects.units, kept)
    # an added box belongs to its image's input
    input_of = {u: i for u, i in zip(objects.boxes["uri"].to_pylist(), objects.boxes["input_id"].to_pylist())
                if u is not None and i is not None}
    input_of.update({u: i for i, u in enumerate(inputs["uri"].to_pylist())})
    ids = [i if i is not None else input_of.get(u) for u, i in zip(boxes["uri"].to_pylist(),
                                                                 boxes["input_id"].to_pylist())]
    boxes = boxes.set_column(boxes.schema.get_field_index("input_id"), "input_id", pa.array(ids, pa.int64()))
    counts["kept_from_previous_runs"] = sum(1 for r in kept.to_pylist() if r["run_id"] != run_id)
    return dataclasses.replace(objects, boxes=boxes, corrections=kept, correction_counts=counts)
