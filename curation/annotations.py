"""Detection annotations read into one table of boxes: COCO instances JSON and YOLO layouts.

The first step of object-level curation (issue 37): every box of the input becomes a row, the
bad ones with ``status = rejected`` and a ``reason`` (as decoding does for images), never an
exception that stops the job. Only a file that cannot be read or parsed at all is an error
(:class:`AnnotationsError`, a one-line message naming the file), as for ``input.labels``.

Coordinates stay in the annotation's own frame here: pixels for COCO (``[x, y, w, h]``, the
stored image's pixel frame -- the frame of the file's pixels before any EXIF rotation, which is
what COCO tools draw on), fractions of the image for YOLO (``class cx cy w h``). Boxes meet the
decoded image's size only in :func:`place_boxes`, because a COCO file's ``images[].width`` and
``height`` may disagree with the file itself.

What real files hold, and what becomes of it:

* COCO category ids need not be contiguous or start at 0; two categories with the same name
  are one class (the label is the name). YOLO classes are 0-based indices into ``names``.
* ``iscrowd`` boxes are kept as rows (``iscrowd`` true); the scores leave them out.
* ``segmentation`` (polygons or RLE) is carried as JSON text, never a reason to reject.
* An image listed with no boxes is labelled and empty (a ``images`` row with ``boxes = 0``);
  an image not listed at all (COCO) or without a ``.txt`` (YOLO) is unlabelled.
* Rotated boxes (a fifth COCO number, or YOLO's 8-coordinate OBB lines) are rejected with a reason.
"""

from __future__ import annotations

import json
import math
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from curation.io.filesystem import Location, read_bytes
from curation.schema import STATUS_OK, STATUS_REJECTED

COCO, YOLO = "coco", "yolo"
BOX_COLUMNS = ("file_name", "annotation_id", "label", "bbox", "area", "iscrowd", "segmentation", "status",
               "reason")


class AnnotationsError(ValueError):
    """An annotation file that cannot be read or parsed at all; the message names the file."""


@dataclass(frozen=True)
class Annotations:
    """Boxes and the images they describe.

    ``boxes``: one row per box in the input (``BOX_COLUMNS``; ``bbox`` as ``[x, y, w, h]`` in
    the format's units). ``images``: one row per image the annotations list (``file_name``,
    declared ``width``/``height`` or null, ``boxes``: rows in ``boxes``). ``units``:
    ``pixels`` or ``fraction``.
    """

    boxes: pa.Table
    images: pa.Table
    units: str
    classes: tuple[str, ...]
    # How a detector's results name images and classes (COCO results format): the COCO file's
    # image ids and category ids (in the file's order); YOLO: no image ids, class index -> name.
    image_ids: dict = field(default_factory=dict)
    category_ids: dict = field(default_factory=dict)


LABEL_READS_IN_FLIGHT = 32  # YOLO .txt files read at once (small objects: the round trip dominates)


def read_annotations(location: Location, *, fmt: str | None = None, label_files: dict[str, Location] | None = None
                     ) -> Annotations:
    """Read ``location``: a COCO instances JSON, or (``fmt='yolo'``) a YOLO ``data.yaml``
    whose per-image ``.txt`` files are ``label_files`` (image file name -> location; see
    :func:`yolo_label_path`). ``fmt`` defaults to ``coco`` for a ``.json``, ``yolo`` for a
    ``.yaml``/``.yml``."""
    fmt = fmt or (COCO if location.path.lower().endswith(".json") else
                  YOLO if location.path.lower().endswith((".yaml", ".yml")) else None)
    if fmt not in (COCO, YOLO):
        raise AnnotationsError(f"{location.uri}: cannot tell the annotation format "
                               f"(expected a COCO .json or a YOLO data.yaml; set input.annotations_format)")
    text = _read_text(location)
    if fmt == COCO:
        return read_coco(text, source=location.uri)
    names = yolo_class_names(text, source=location.uri)
    items = list((label_files or {}).items())
    # Many small reads (one .txt per image): in flight together, as object stores want.
    with ThreadPoolExecutor(max_workers=LABEL_READS_IN_FLIGHT) as pool:
        texts = list(pool.map(lambda item: _read_text(item[1]), items))
    return read_yolo(names, {name: text for (name, _), text in zip(items, texts)})


def _read_text(location: Location) -> str:
    try:
        return read_bytes(location).decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotationsError(f"{location.uri}: cannot read ({exc})") from None


# ---------------------------------------------------------------------------------------- COCO


def read_coco(text: str, *, source: str = "annotations") -> Annotations:
    """A COCO instances document (``images``, ``annotations``, ``categories``)."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise AnnotationsError(f"{source}: not JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) \
            or not isinstance(doc.get("categories"), list):
        raise AnnotationsError(f"{source}: expected a COCO instances object with 'images', 'annotations' and "
                               f"'categories' lists")
    categories: dict = {}
    for i, cat in enumerate(doc["categories"]):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), (int, str)) \
                or not isinstance(cat.get("name"), str):
            raise AnnotationsError(f"{source}: categories[{i}]: expected an object with 'id' and 'name', got "
                                   f"{str(cat)[:80]}")
        categories[cat["id"]] = cat["name"].strip()  # repeated names: one class
    images: dict = {}
    rows_images = {"file_name": [], "width": [], "height": [], "boxes": []}
    for i, image in enumerate(doc["images"]):
        if not isinstance(image, dict) or not isinstance(image.get("id"), (int, str)) \
                or not isinstance(image.get("file_name"), str):
            raise AnnotationsError(f"{source}: images[{i}]: expected an object with 'id' and 'file_name', got "
                                   f"{str(image)[:80]}")
        images[image["id"]] = len(rows_images["file_name"])
        rows_images["file_name"].append(normal_name(image["file_name"]))
        rows_images["width"].append(_positive_int(image.get("width")))
        rows_images["height"].append(_positive_int(image.get("height")))
        rows_images["boxes"].append(0)
    rows = _empty_rows()
    for i, ann in enumerate(doc.get("annotations") or []):
        if not isinstance(ann, dict):
            _add(rows, None, f"annotations[{i}]", None, None, reason=f"annotations[{i}]: not an object")
            continue
        ann_id = str(ann.get("id", f"annotations[{i}]"))
        image = _lookup(images, ann.get("image_id"))
        file_name = rows_images["file_name"][image] if image is not None else None
        label = _lookup(categories, ann.get("category_id"))
        bbox, problem = _coco_bbox(ann.get("bbox"))
        if image is None:
            problem = f"image_id {ann.get('image_id')!r} is not in images"
        elif escapes_root(file_name):
            problem = f"file_name {file_name!r} is not a path inside input.images"
        elif label is None and problem is None:
            problem = f"category_id {ann.get('category_id')!r} is not in categories"
        if image is not None:
            rows_images["boxes"][image] += 1
        _add(rows, file_name, ann_id, label, bbox, area=ann.get("area"), iscrowd=bool(ann.get("iscrowd", 0)),
             segmentation=ann.get("segmentation"), reason=problem)
    classes = tuple(sorted(set(categories.values())))
    image_ids = {key: rows_images["file_name"][row] for key, row in images.items()}
    return Annotations(_boxes_table(rows), _images_table(rows_images), "pixels", classes, image_ids, categories)


def _coco_bbox(value) -> tuple[list[float] | None, str | None]:
    if isinstance(value, (list, tuple)) and len(value) == 5 and all(_finite(v) for v in value):
        return None, "rotated box (a fifth, angle, value): not supported"
    if not isinstance(value, (list, tuple)) or len(value) != 4 or not all(_finite(v) for v in value):
        return None, f"bbox: expected 4 finite numbers [x, y, w, h], got {str(value)[:60]}"
    return [float(v) for v in value], None


# ---------------------------------------------------------------------------------------- YOLO


def yolo_class_names(text: str, *, source: str = "data.yaml") -> tuple[str, ...]:
    """``names`` of a YOLO ``data.yaml``: a list, or a mapping from 0-based index to name."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise AnnotationsError(f"{source}: not YAML ({str(exc).splitlines()[0]})") from None
    names = doc.get("names") if isinstance(doc, dict) else None
    if isinstance(names, dict) and names and all(isinstance(k, int) for k in names):
        if sorted(names) != list(range(len(names))):
            raise AnnotationsError(f"{source}: names: expected indices 0..{len(names) - 1}, got {sorted(names)}")
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names or not all(isinstance(n, (str, int)) for n in names):
        raise AnnotationsError(f"{source}: expected 'names', a list of class names or a mapping 0: name, ...")
    return tuple(str(n).strip() for n in names)


def yolo_label_path(image_name: str) -> str:
    """The ``.txt`` beside an image by the common convention: ``images/a/b.jpg`` ->
    ``labels/a/b.txt`` (the last ``images`` folder of the path becomes ``labels``)."""
    parts = normal_name(image_name).split("/")
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return posixpath.splitext("/".join(parts))[0] + ".txt"


def read_yolo(names: tuple[str, ...], files: dict[str, str | None]) -> Annotations:
    """``files``: image file name -> its ``.txt`` text, or None when the image has none (then
    unlabelled, and not listed among ``images``). An empty text: labelled, no boxes."""
    rows = _empty_rows()
    rows_images = {"file_name": [], "width": [], "height": [], "boxes": []}
    for file_name in sorted(files):
        text = files[file_name]
        if text is None:
            continue
        name = normal_name(file_name)
        count = 0
        for number, line in enumerate(text.splitlines(), start=1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            count += 1
            label, bbox, segmentation, problem = _yolo_line(fields, names)
            if escapes_root(name):
                problem = f"image {name!r} is not a path inside input.images"
            _add(rows, name, f"{yolo_label_path(name)}:{number}", label, bbox, segmentation=segmentation,
                 reason=problem)
        rows_images["file_name"].append(name)
        rows_images["width"].append(None)
        rows_images["height"].append(None)
        rows_images["boxes"].append(count)
    return Annotations(_boxes_table(rows), _images_table(rows_images), "fraction", tuple(sorted(set(names))),
                       {}, dict(enumerate(names)))


def _yolo_line(fields: list[str], names: tuple[str, ...]):
    try:
        index = int(fields[0])
    except ValueError:
        return None, None, None, f"class {fields[0][:20]!r}: expected a 0-based integer index"
    label = names[index] if 0 <= index < len(names) else None
    try:
        numbers = [float(v) for v in fields[1:]]
    except ValueError:
        return label, None, None, f"expected numbers after the class, got {' '.join(fields[1:])[:60]!r}"
    if not all(math.isfinite(v) for v in numbers):
        return label, None, None, "a coordinate is not finite"
    segmentation = None
    if len(numbers) == 8:
        return label, None, None, "rotated box (8 corner coordinates, YOLO OBB): not supported"
    if len(numbers) == 4:
        cx, cy, w, h = numbers
        bbox = [cx - w / 2, cy - h / 2, w, h]
    elif len(numbers) >= 6 and len(numbers) % 2 == 0:  # a polygon (YOLO segmentation): its bounding box
        xs, ys = numbers[0::2], numbers[1::2]
        bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
        segmentation = [numbers]
    else:
        return label, None, None, f"expected 'class cx cy w h' (5 fields), got {len(fields)} fields"
    if label is None:
        return None, bbox, segmentation, f"class {index} is not in names (0..{len(names) - 1})"
    return label, bbox, segmentation, None


# ------------------------------------------------------------------------------------ geometry


def place_boxes(bbox: np.ndarray, *, units: str, width, height, tolerance_px: float = 2.0,
                min_size_px: float = 0.0) -> tuple[np.ndarray, pa.Array]:
    """Boxes (n, 4) ``[x, y, w, h]`` in ``units`` on decoded images ``width`` x ``height`` (one
    size, or one per box), as pixel boxes clipped to the image, and per box null or why it
    cannot be cut (a string array): a box reaching more than ``tolerance_px`` outside the image, with no area,
    or with a side under ``min_size_px`` (after clipping)."""
    box = np.asarray(bbox, np.float64).reshape(-1, 4).copy()
    width = np.broadcast_to(np.asarray(width, np.float64), len(box))
    height = np.broadcast_to(np.asarray(height, np.float64), len(box))
    box = to_pixels(box, units=units, width=width, height=height)
    x0, y0 = box[:, 0], box[:, 1]
    x1, y1 = x0 + box[:, 2], y0 + box[:, 3]
    outside = np.maximum.reduce([-x0, -y0, x1 - width, y1 - height, np.zeros(len(box))])
    cx0, cy0 = np.clip(x0, 0, width), np.clip(y0, 0, height)
    cx1, cy1 = np.clip(x1, 0, width), np.clip(y1, 0, height)
    placed = np.stack([cx0, cy0, cx1 - cx0, cy1 - cy0], axis=1)
    degenerate = (box[:, 2] <= 0) | (box[:, 3] <= 0)
    out = ~degenerate & (outside > tolerance_px)
    small = ~degenerate & ~out & (np.minimum(placed[:, 2], placed[:, 3]) < max(min_size_px, 1e-9))
    # A reason is written for the few boxes that have one: no Python object per box (millions).
    reasons = np.full(len(box), None, object)
    for i in np.flatnonzero(degenerate):
        reasons[i] = f"degenerate box (w={box[i, 2]:.4g}, h={box[i, 3]:.4g} px)"
    for i in np.flatnonzero(out):
        reasons[i] = (f"box reaches {outside[i]:.1f} px outside the {width[i]:.0f}x{height[i]:.0f} image "
                      f"(more than the {tolerance_px:g} px tolerance)")
    for i in np.flatnonzero(small):
        reasons[i] = f"box {placed[i, 2]:.1f}x{placed[i, 3]:.1f} px is under the {min_size_px:g} px minimum side"
    return placed, pa.array(reasons, pa.string())
    return placed, reasons


def box_matrix(column) -> tuple[np.ndarray, np.ndarray]:
    """``[x, y, w, h]`` boxes (a list column, four numbers or null per row) as an ``(n, 4)``
    float64 matrix (zeros where null) and which rows have one; without a Python object per box."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not pa.types.is_fixed_size_list(arr.type):
        arr = pc.cast(arr, pa.list_(pa.float64(), 4))
    known = arr.is_valid().to_numpy(zero_copy_only=False)
    values = arr.values.slice(arr.offset * 4, len(arr) * 4).cast(pa.float64())
    matrix = values.to_numpy(zero_copy_only=False).astype(np.float64).reshape(-1, 4)
    return np.where(known[:, None], np.nan_to_num(matrix), 0.0), known


def to_pixels(bbox: np.ndarray, *, units: str, width, height) -> np.ndarray:
    """``[x, y, w, h]`` rows in the image's pixels (``fraction`` rows scaled by its size)."""
    box = np.asarray(bbox, np.float64).reshape(-1, 4)
    if units != "fraction":
        return box.copy()
    scale = np.stack([width, height, width, height], axis=1).astype(np.float64)
    return box * scale


# ------------------------------------------------------------------------------------- helpers


def normal_name(name: str) -> str:
    """A file name relative to ``input.images``, with ``/`` separators and no ``.`` parts."""
    return posixpath.normpath(name.replace("\\", "/"))


def escapes_root(name: str) -> bool:
    """A name that leaves ``input.images`` (absolute, or through ``..``), or names nothing."""
    return name in ("", ".") or name.startswith(("/", "../")) or name == ".."


def _lookup(mapping: dict, key):
    """``mapping.get(key)``, None for a key JSON made unhashable (a list or an object)."""
    try:
        return mapping.get(key)
    except TypeError:
        return None


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(value) -> int | None:
    return int(value) if _finite(value) and value > 0 and float(value).is_integer() else None


def _empty_rows() -> dict[str, list]:
    return {name: [] for name in BOX_COLUMNS}


def _add(rows: dict, file_name, annotation_id, label, bbox, *, area=None, iscrowd=False, segmentation=None,
         reason=None) -> None:
    if bbox is not None and area is None:
        area = bbox[2] * bbox[3]
    rows["file_name"].append(file_name)
    rows["annotation_id"].append(annotation_id)
    rows["label"].append(label)
    rows["bbox"].append(bbox)
    rows["area"].append(float(area) if _finite(area) else None)
    rows["iscrowd"].append(iscrowd)
    rows["segmentation"].append(json.dumps(segmentation) if segmentation is not None else None)
    rows["status"].append(STATUS_OK if reason is None else STATUS_REJECTED)
    rows["reason"].append(reason)


def _boxes_table(rows: dict) -> pa.Table:
    schema = pa.schema([("file_name", pa.string()), ("annotation_id", pa.string()), ("label", pa.string()),
                        ("bbox", pa.list_(pa.float64(), 4)), ("area", pa.float64()), ("iscrowd", pa.bool_()),
                        ("segmentation", pa.string()), ("status", pa.string()), ("reason", pa.string())])
    return pa.table(rows, schema=schema)


def _images_table(rows: dict) -> pa.Table:
    schema = pa.schema([("file_name", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
                        ("boxes", pa.int64())])
    return pa.table(rows, schema=schema)
