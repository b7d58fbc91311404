"""``curation export`` of a detection run: one Label Studio task per selected image, its boxes
as ``RectangleLabels``.

Each task's ``data`` holds the image reference, ``uri``, the selection's ``rank`` and
``reason``, the stored image's ``width`` and ``height`` and ``objects``: the image's given boxes
(``object_id``, ``label``, ``bbox`` in pixels) -- what the corrections import compares the
annotators' rectangles with. Two predictions pre-annotate it:

* ``given`` -- the boxes as annotated, each region's ``id`` its ``object_id``;
* ``curation <run_id>`` -- the run's suggestions: each given box with its suggested class
  (``suggested_box_label``) and place (``suggested_bbox``, from a matched detector box), and
  the confident predictions no annotation covers (``source = prediction`` rows), ids
  ``object_id`` too.

Coordinates are Label Studio's: percent of the image's width and height. Boxes are in the
stored pixel frame (an EXIF-turned image is shown upright by the browser: its boxes would
need turning too; such images are exported as stored, a known limit).
"""

from __future__ import annotations

from xml.sax.saxutils import quoteattr

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.io.filesystem import Location
from curation.objects import SOURCE_ANNOTATION
from curation.run_layout import OBJECTS_FOLDER
from curation.schema import STATUS_OK

BOX_FIELD = "box"  # the labelling config's <RectangleLabels name=...>
GIVEN_VERSION = "given"


def is_detection_run(run: Location) -> bool:
    try:
        return bool(run.filesystem.get_file_info(run.child(OBJECTS_FOLDER).path).type.name == "Directory")
    except OSError:
        return False


def rectangle_config(classes: list[str], *, image_field: str) -> str:
    """Label Studio's labelling config: the image and rectangles, one label per class."""
    labels = "\n".join(f"    <Label value={quoteattr(c)}/>" for c in classes)
    return (f'<View>\n  <Image name="{image_field}" value="${image_field}"/>\n'
            f'  <RectangleLabels name="{BOX_FIELD}" toName="{image_field}">\n{labels}\n'
            f"  </RectangleLabels>\n</View>\n")


def rectangle(region_id: str, label: str, bbox: list[float], width: int, height: int, *, image_field: str) -> dict:
    """One Label Studio rectangle region (percent coordinates) of a pixel ``[x, y, w, h]``."""
    x, y, w, h = (float(v) for v in bbox)
    return {"id": region_id, "from_name": BOX_FIELD, "to_name": image_field, "type": "rectanglelabels",
            "original_width": int(width), "original_height": int(height), "image_rotation": 0,
            "value": {"x": 100.0 * x / width, "y": 100.0 * y / height, "width": 100.0 * w / width,
                      "height": 100.0 * h / height, "rotation": 0, "rectanglelabels": [label]}}


def box_tasks(run: Location, rows: list[dict], *, run_id: str, image_field: str, reference) -> list[dict]:
    """One task per selected image (``rows``: the selection joined to samples, with ``uri``,
    ``rank``, ``reason``, ``width``, ``height``); ``reference(uri)`` is the image's URL."""
    wanted = pa.array([r["uri"] for r in rows], pa.string())
    objects = pq.read_table(run.child(OBJECTS_FOLDER).path, filesystem=run.filesystem)
    objects = objects.filter(pc.is_in(objects["uri"], value_set=wanted))
    by_uri: dict[str, list[dict]] = {}
    for obj in objects.to_pylist():
        by_uri.setdefault(obj["uri"], []).append(obj)
    tasks, seen = [], set()
    for row in rows:
        if row["uri"] in seen:  # a box_review selection: one task per image, at its first box's rank
            continue
        seen.add(row["uri"])
        width, height = row.get("width"), row.get("height")
        mine = by_uri.get(row["uri"], [])
        given = [o for o in mine if o["source"] == SOURCE_ANNOTATION and o["status"] == STATUS_OK and o["bbox"]]
        task = {"data": {image_field: reference(row["uri"]), "uri": row["uri"], "rank": row["rank"],
                         "reason": row["reason"], "width": width, "height": height,
                         "objects": [{"object_id": o["object_id"], "label": o["label"], "bbox": o["bbox"]}
                                     for o in given]}}
        if width and height:
            suggested = [rectangle(o["object_id"], o.get("suggested_box_label") or o["label"],
                                   o.get("suggested_bbox") or o["bbox"], width, height, image_field=image_field)
                         for o in given]
            suggested += [rectangle(o["object_id"], o["label"], o["bbox"], width, height, image_field=image_field)
                          for o in mine if o["source"] != SOURCE_ANNOTATION and o.get("is_overlooked_object")]
            task["predictions"] = [
                {"model_version": GIVEN_VERSION, "score": 1.0,
                 "result": [rectangle(o["object_id"], o["label"], o["bbox"], width, height, image_field=image_field)
                            for o in given]},
                {"model_version": f"curation {run_id}", "score": 0.5, "result": suggested},
            ]
        tasks.append(task)
    return tasks


def box_classes(run: Location) -> list[str]:
    """The classes of the run's ok boxes."""
    objects = pq.read_table(run.child(OBJECTS_FOLDER).path, filesystem=run.filesystem, columns=["label", "status"])
    labels = objects.filter(pc.equal(objects["status"], STATUS_OK))["label"].drop_null()
    return sorted(set(labels.to_pylist()))
