"""What drift and leakage see of a detection run's boxes (issue 37): their classes and sizes.

* :func:`box_profile` -- the ok annotated boxes' class shares and size shares (COCO's bins:
  ``small`` under 32x32 px of area, ``medium`` under 96x96, ``large`` above), kept in the
  drift profile (``profile.json`` → ``objects``) so that the next night compares.
* :func:`compare_boxes` -- ``run.json`` → ``drift.objects``: each class's and size bin's share
  before and after, with their total-variation distances; a class share that moved more than
  ``drift.alarm_class_share_change`` fires the alarm, as an image label's does.
* :func:`leaked_boxes` -- ``run.json`` → ``leakage.objects``: per split, the boxes by class and
  size on the images that have a copy in another split (a leaked image leaks its boxes).

Column-wise over the objects table: no Python object per box.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.drift_profile import shares_change
from curation.objects import SOURCE_ANNOTATION
from curation.schema import STATUS_OK

# COCO's object sizes, by area in pixels (small < 32^2 <= medium < 96^2 <= large)
SIZE_BINS = (("small", 32.0 ** 2), ("medium", 96.0 ** 2), ("large", float("inf")))


def annotated_ok_mask(objects: pa.Table) -> pa.Array:
    """Which rows are ok boxes the annotations give (not the detector's possibly overlooked ones)."""
    return pc.fill_null(pc.and_(pc.equal(objects["source"], SOURCE_ANNOTATION),
                                pc.equal(objects["status"], STATUS_OK)), False)


def annotated_ok(objects: pa.Table) -> pa.Table:
    """The ok boxes the annotations give."""
    return objects.filter(annotated_ok_mask(objects))


def size_bins(area) -> pa.Array:
    """Each box's COCO size bin by its ``area`` (null where the area is unknown)."""
    values = np.asarray(pc.fill_null(area, np.nan).to_numpy(zero_copy_only=False), np.float64)
    edges = np.array([upper for _, upper in SIZE_BINS[:-1]])
    codes = np.searchsorted(edges, values, side="right")
    names = pa.array([name for name, _ in SIZE_BINS], pa.string())
    return names.take(pa.array(codes, pa.int64(), mask=np.isnan(values)))


def _shares(values: pa.Array) -> dict[str, float]:
    values = values.drop_null()
    if not len(values):
        return {}
    return {str(v["values"]): round(int(v["counts"]) / len(values), 6)
            for v in sorted(pc.value_counts(values).to_pylist(), key=lambda v: str(v["values"]))}


def box_profile(objects: pa.Table | None) -> dict | None:
    """``{"boxes", "class_shares", "size_shares"}`` of the ok annotated boxes; None without boxes."""
    if objects is None:
        return None
    boxes = annotated_ok(objects)
    return {"boxes": boxes.num_rows, "class_shares": _shares(boxes["label"].cast(pa.string())),
            "size_shares": _shares(size_bins(boxes["area"]))}


def compare_boxes(before: dict, after: dict, *, alarm_class_share_change: float) -> tuple[dict, list[str]]:
    """``drift.objects`` between two :func:`box_profile` s, and the alarm rules it fires."""
    classes, class_tv = shares_change(before.get("class_shares", {}), after.get("class_shares", {}))
    sizes, size_tv = shares_change(before.get("size_shares", {}), after.get("size_shares", {}))
    out = {"boxes_before": before.get("boxes", 0), "boxes_after": after.get("boxes", 0),
           "classes": {"tv": class_tv, "shares": classes}, "sizes": {"tv": size_tv, "shares": sizes}}
    fired = []
    moved = max(classes.items(), key=lambda kv: abs(kv[1]["change"]), default=None)
    if before.get("boxes") and after.get("boxes") and moved and abs(moved[1]["change"]) > alarm_class_share_change:
        fired.append(f"box class {moved[0]!r} share moved {moved[1]['change']:+.3f} "
                     f"(more than {alarm_class_share_change})")
    return out, fired


def leaked_boxes(objects: pa.Table, uris: pa.Array, splits: pa.Array) -> dict:
    """Per split, the ok annotated boxes by class and by size on the images ``uris`` (those
    with a copy in another split; ``splits``: each one's split)."""
    boxes = annotated_ok(objects)
    where = pc.index_in(boxes["uri"], value_set=uris.cast(pa.string()))
    found = pc.is_valid(where)
    leaked = boxes.filter(found)
    split_of = splits.cast(pa.string()).take(where.filter(found))
    out: dict[str, dict] = {}
    for split in sorted(set(pc.unique(split_of).to_pylist()) - {None}):
        mine = pc.equal(split_of, split)
        out[split] = {"boxes": int(pc.sum(mine).as_py() or 0),
                      "by_class": _counts(leaked["label"].filter(mine)),
                      "by_size": _counts(size_bins(leaked["area"]).filter(mine))}
    return out


def _counts(values: pa.Array) -> dict[str, int]:
    return {str(v["values"]): int(v["counts"]) for v in sorted(pc.value_counts(values.drop_null()).to_pylist(),
                                                              key=lambda v: str(v["values"]))}
