"""The report's box galleries (detection runs): crops of the boxes to review, each with its box
drawn -- the given box in orange, the detector's suggested box (``suggested_bbox``) in blue.

Galleries are chosen from ``objects/`` (:func:`box_galleries`); each item's key is
``<uri>#box=<object_id>``, and its crop thumbnail is cut by Ray tasks next to the data
(:func:`fetch_crops`): the box's square plus as much context again, in the file's own pixel
frame (where boxes are given), drawn, then turned upright as the file's EXIF orientation says.
"""

from __future__ import annotations

import base64
import io
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw

from curation.io.filesystem import Resolver
from curation.object_scores import OBJECT_FLAGS
from curation.report.box_map import flagged_boxes
from curation.report.galleries import Gallery, GalleryItem
from curation.session import run_tasks

log = logging.getLogger(__name__)

GIVEN = (255, 127, 14)  # the annotated box
SUGGESTED = (23, 190, 207)  # the detector's box
CONTEXT = 0.5  # context around the box, as a fraction of its longer side on each side
CHUNK = 128
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}


def crop_key(uri: str, object_id: str) -> str:
    return f"{uri}#box={object_id}"


def box_galleries(objects: pa.Table | None, size: int) -> list[Gallery]:
    """The annotated boxes with the lowest ``box_quality``, and the objects the annotations may
    have missed (``source = prediction`` rows, lowest ``overlooked_quality`` first)."""
    if objects is None or size <= 0 or "box_quality" not in objects.column_names:
        return []
    out = []
    for key, title, note, source, by in (
            ("boxes", "Boxes to review", "annotated boxes with the lowest box_quality (every box error pools in)",
             "annotation", "box_quality"),
            ("overlooked", "Possibly overlooked objects",
             "confident detector boxes no annotated box covers, lowest overlooked_quality first",
             "prediction", "overlooked_quality")):
        rows = objects.filter(pc.and_(pc.equal(objects["source"], source), pc.is_valid(objects[by])))
        if not rows.num_rows:
            continue
        rows = rows.sort_by(by).slice(0, size)
        gallery = Gallery(key, title, note, total=int(pc.sum(pc.is_valid(
            objects.filter(pc.equal(objects["source"], source))[by])).as_py() or 0))
        gallery.groups.append([_item(row, by) for row in rows.to_pylist()])
        out.append(gallery)
    return out


def _item(row: dict, by: str) -> GalleryItem:
    flags = [name.removeprefix("is_") for name in OBJECT_FLAGS if row.get(name)]  # the declared box flags
    lines = [f"{by} {row[by]:.3f}", f"label {row['label']!r}"]
    if row.get("suggested_box_label") and row["suggested_box_label"] != row["label"]:
        lines.append(f"suggested {row['suggested_box_label']!r}")
    if flags:
        lines.append(", ".join(flags))
    return GalleryItem(crop_key(row["uri"], row["object_id"]), lines, badge=flags[0] if flags else None)


def crop_requests(objects: pa.Table | None, galleries: list[Gallery], *, map_cap: int = 0) -> list[tuple]:
    """``(key, uri, bbox, suggested_bbox)`` for every gallery item of :func:`box_galleries`,
    then for the box map's flagged boxes and the rest of its boxes, at most ``map_cap`` more."""
    if objects is None:
        return []
    wanted = {item.uri for g in galleries for item in g.groups[0]} if galleries else set()
    if map_cap > 0 and "x" in objects.column_names:
        plotted = pc.is_valid(objects["x"]).to_numpy(zero_copy_only=False)
        flagged = flagged_boxes(objects)
        rows = np.concatenate([np.flatnonzero(plotted & flagged), np.flatnonzero(plotted & ~flagged)])[:map_cap]
        picked = objects.take(pa.array(rows, pa.int64())).select(["uri", "object_id"]).to_pylist()
        wanted |= {crop_key(r["uri"], r["object_id"]) for r in picked}
    ids = [key.rsplit("#box=", 1)[1] for key in wanted]
    shown = objects.filter(pc.is_in(objects["object_id"], value_set=pa.array(ids, pa.string())))  # not every box
    requests = []
    for row in shown.select(["uri", "object_id", "bbox", "suggested_bbox"]).to_pylist():
        key = crop_key(row["uri"], row["object_id"]) if row["uri"] and row["object_id"] else None
        if key in wanted and row["bbox"] is not None:
            requests.append((key, row["uri"], row["bbox"], row["suggested_bbox"]))
    return requests


def make_crop(data: bytes, bbox, suggested, px: int, *, max_pixels: int) -> bytes:
    """WebP bytes of the box's square with context, both boxes drawn, upright, at most ``px``."""
    from curation.stages.decode import _to_rgb  # on the worker (torch stays off the driver)

    with Image.open(io.BytesIO(data)) as image:
        if image.width * image.height > max_pixels:
            raise ValueError(f"{image.width}x{image.height} exceeds {max_pixels} pixels")
        orientation = int(image.getexif().get(0x0112, 1))
        image.load()  # before the file closes: _to_rgb hands an RGB image back as it is
        rgb = _to_rgb(image, (255, 255, 255))
    x, y, w, h = bbox
    side = max(w, h) * (1 + 2 * CONTEXT)
    left, top = x + w / 2 - side / 2, y + h / 2 - side / 2
    square = rgb.crop((int(np.floor(left)), int(np.floor(top)), int(np.ceil(left + side)), int(np.ceil(top + side))))
    draw = ImageDraw.Draw(square)
    width = max(1, int(round(side / 60)))
    for box, colour in ((suggested, SUGGESTED), (bbox, GIVEN)):
        if box is not None:
            bx, by, bw, bh = box
            draw.rectangle([bx - np.floor(left), by - np.floor(top), bx + bw - np.floor(left), by + bh - np.floor(top)],
                           outline=colour, width=width)
    if orientation in UPRIGHT:
        square = square.transpose(UPRIGHT[orientation])
    square.thumbnail((px, px), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    square.save(out, format="WEBP", quality=70, method=4)
    return out.getvalue()


def _crops_of(requests: list[tuple], resolver: Resolver, px: int, max_pixels: int) -> list[bytes | None]:
    out: list[bytes | None] = []
    for _, uri, bbox, suggested in requests:
        try:
            location = resolver.resolve(uri)
            with location.filesystem.open_input_stream(location.path) as fh:
                out.append(make_crop(fh.read(), bbox, suggested, px, max_pixels=max_pixels))
        except Exception as exc:  # a thumbnail is decoration: never fail the run for one
            log.debug("no crop for %s: %s", uri, exc)
            out.append(None)
    return out


def fetch_crops(requests: list[tuple], resolver: Resolver, *, px: int, max_pixels: int) -> dict[str, str]:
    """``key -> data:image/webp;base64,...`` for the crops that could be cut."""
    chunks = [requests[i:i + CHUNK] for i in range(0, len(requests), CHUNK)]
    results = run_tasks(_crops_of, [(chunk, resolver, px, max_pixels) for chunk in chunks]) if chunks else []
    out = {}
    for chunk, crops in zip(chunks, results):
        for request, crop in zip(chunk, crops):
            if crop:
                out[request[0]] = "data:image/webp;base64," + base64.b64encode(crop).decode("ascii")
    log.info("report box crops: %d of %d", len(out), len(requests))
    return out
