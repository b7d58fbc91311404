"""Small thumbnails for the report, read back from where the images are stored.

Only the items the page shows get one (gallery members, then map points, at most
``report.thumbnails``), made by Ray tasks next to the data; the driver receives a few hundred
bytes per item. An image that cannot be read now (deleted since, unreadable) simply has no
thumbnail: the page shows its uri instead.
"""

from __future__ import annotations

import base64
import io
import logging
import time

from PIL import Image, ImageOps

from curation.io.filesystem import Resolver
from curation.session import run_tasks

log = logging.getLogger(__name__)

CHUNK = 256
WEBP_QUALITY = 60


def make_thumbnail(data: bytes, px: int, *, max_pixels: int) -> bytes:
    """WebP bytes of the image in ``data`` with its longer side at most ``px``."""
    # Imported here, on the worker that makes thumbnails: the decode stage brings torch, which
    # the driver (which imports this module through the report) does not load.
    from curation.stages.decode import _to_rgb, draft_request

    with Image.open(io.BytesIO(data)) as image:
        if image.width * image.height > max_pixels:
            raise ValueError(f"{image.width}x{image.height} exceeds {max_pixels} pixels")
        if image.format == "JPEG":
            image.draft("RGB", draft_request(image.width, image.height, px))
        image = ImageOps.exif_transpose(image)
        rgb = _to_rgb(image, (255, 255, 255))
        rgb.thumbnail((px, px), Image.Resampling.BILINEAR, reducing_gap=2.0)
        out = io.BytesIO()
        rgb.save(out, format="WEBP", quality=WEBP_QUALITY, method=4)
        return out.getvalue()


def _thumbnails_of(uris: list[str], resolver: Resolver, px: int, max_pixels: int) -> list[bytes | None]:
    result: list[bytes | None] = []
    for uri in uris:
        try:
            location = resolver.resolve(uri)
            with location.filesystem.open_input_stream(location.path) as fh:
                result.append(make_thumbnail(fh.read(), px, max_pixels=max_pixels))
        except Exception as exc:  # a thumbnail is decoration: never fail the run for one
            log.debug("no thumbnail for %s: %s", uri, exc)
            result.append(None)
    return result


def fetch_thumbnails(uris: list[str], resolver: Resolver, *, px: int, max_pixels: int) -> dict[str, str]:
    """``uri -> data:image/webp;base64,...`` for the uris whose image could be read."""
    start = time.perf_counter()
    chunks = [uris[i:i + CHUNK] for i in range(0, len(uris), CHUNK)]
    results = run_tasks(_thumbnails_of, [(chunk, resolver, px, max_pixels) for chunk in chunks])
    out: dict[str, str] = {}
    total = 0
    for chunk, thumbs in zip(chunks, results):
        for uri, thumb in zip(chunk, thumbs):
            if thumb:
                total += len(thumb)
                out[uri] = "data:image/webp;base64," + base64.b64encode(thumb).decode("ascii")
    log.info("report thumbnails: %d of %d in %.1fs (%.0f KB)", len(out), len(uris), time.perf_counter() - start,
             total / 1024)
    return out
