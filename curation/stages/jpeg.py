"""JPEG facts read from the file's bytes, without decoding: its frame size (a plain JPEG's SOF
marker), EXIF orientation, the digest of its coded image, the smallest DCT-scaled decode every
consumer can use, and whether the device decode path takes it.
"""

from __future__ import annotations

import hashlib

try:  # libjpeg-turbo's header parser (a declared dependency); without it no file is read as a plain JPEG
    import simplejpeg
except ImportError:  # pragma: no cover
    simplejpeg = None

from curation.stages.features import STATS_MAX_SIDE

_METADATA_MARKERS = set(range(0xE0, 0xF0)) | {0xFE}  # APP0..APP15, COM


def jpeg_image_digest(data: bytes) -> str | None:
    """The digest of a JPEG's coded image: its segments up to the first scan without the APPn
    (EXIF, ICC, XMP, ...) and COM ones, and everything from the first scan on. None when the
    markers cannot be walked (the caller then hashes decoded pixels). With the EXIF orientation,
    so a rotated copy is not an exact one."""
    if data[:2] != b"\xff\xd8":
        return None
    # The orientation tag lives in the metadata left out: it is hashed on its own.
    digest = hashlib.sha1(b"\xff\xd8" + str(exif_orientation(data) or 1).encode(), usedforsecurity=False)
    at, end = 2, len(data)
    while at + 4 <= end:
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:
            at += 1
            continue
        if marker == 0xDA:  # start of scan: the coded image and whatever follows it
            digest.update(data[at:])
            return digest.hexdigest()[:32]
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            digest.update(data[at:at + 2])
            at += 2
            continue
        length = int.from_bytes(data[at + 2:at + 4], "big")
        if length < 2:
            return None
        if marker not in _METADATA_MARKERS:
            digest.update(data[at:at + 2 + length])
        at += 2 + length
    return None


def draft_request(width: int, height: int, image_size: int) -> tuple[int, int]:
    """The smallest JPEG decode every consumer can use: the shorter side at least the model
    input (``image_size``), the longer side at least the working thumbnail's (or the full size)."""
    longer = min(max(width, height), STATS_MAX_SIDE)
    return (longer, image_size) if width >= height else (image_size, longer)


def _plain_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` of a JPEG that libjpeg-turbo decodes to RGB as it stands (YCbCr, RGB
    or grey, and no EXIF orientation to apply), read from its header without PIL; None for
    anything else (PIL then opens it, and says why when it cannot)."""
    if simplejpeg is None or data[:3] != b"\xff\xd8\xff":
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except (ValueError, RuntimeError, OSError):
        return None
    if colorspace not in ("YCbCr", "RGB", "Gray") or exif_orientation(data) != 1:
        return None
    return width, height


def exif_orientation(jpeg: bytes) -> int | None:
    """The EXIF orientation tag of a JPEG (1, upright, when it has none), from the first EXIF
    segment before the image data (as PIL reads it); None when the markers cannot be walked."""
    at, end = 2, len(jpeg)
    while at + 4 <= end:
        if jpeg[at] != 0xFF:
            return None
        marker = jpeg[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in (0xDA, 0xD9):  # start of scan, end of image: no metadata after
            return 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            at += 2
            continue
        length = int.from_bytes(jpeg[at + 2:at + 4], "big")
        if length < 2:
            return None
        if marker == 0xE1 and jpeg[at + 4:at + 10] == b"Exif\x00\x00":
            return _tiff_orientation(jpeg[at + 10:at + 2 + length])
        at += 2 + length
    return None


def _tiff_orientation(tiff: bytes) -> int | None:
    """Tag 0x0112 of a TIFF header's first IFD (1 when absent); None when malformed."""
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return None
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return None
    for entry in range(ifd + 2, ifd + 2 + 12 * int.from_bytes(tiff[ifd:ifd + 2], order), 12):
        if entry + 12 > len(tiff):
            return None
        if int.from_bytes(tiff[entry:entry + 2], order) == 0x0112:
            return int.from_bytes(tiff[entry + 8:entry + 10], order)  # a SHORT, first in its value field
    return 1


def torch_decodable(data: bytes, max_pixels: int) -> bool:
    """A file the torch path decodes: a JPEG libjpeg-turbo decodes to RGB as it stands (YCbCr,
    RGB or grey; not CMYK), upright (no EXIF rotation to apply), complete (it ends with the
    end-of-image marker: a truncated file takes the CPU path and gets its reason there) and
    within ``decode.max_pixels``."""
    size = _plain_jpeg_size(data)
    if size is None or size[0] * size[1] > max_pixels or size[0] <= 0 or size[1] <= 0:
        return False
    return data.rstrip(b"\x00\r\n ")[-2:] == b"\xff\xd9"
