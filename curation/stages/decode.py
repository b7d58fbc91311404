"""Read and decode images on CPU: one output row per input row, failures as data.

Each input row yields exactly one output row. A file that cannot be read or decoded becomes
``status='rejected'`` with a specific ``reason`` (``missing: ...``, ``corrupt: ...``,
``not an image: ...``, ``too many pixels: ...``) instead of an exception, so one bad JPEG never
fails the job. Pixel statistics for the junk scores are computed here, once, from the decoded
image.

:class:`DecodeStage` is the batch form the pipeline runs. The one-image forms are public
helpers with the same definitions, for code that handles a single image (a query image, a
test, a benchmark): :func:`decode_image` (model input, hashes, statistics and copy descriptor of
one file), :func:`pixel_statistics`, :func:`luminance_percentiles` and :func:`copy_descriptor`.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

try:  # libjpeg-turbo with DCT scaling straight into numpy (PIL's own copy skipped); PIL is the fallback
    import simplejpeg
except ImportError:  # pragma: no cover - a declared dependency
    simplejpeg = None

from curation.io.filesystem import Resolver
from curation.schema import STATUS_OK, STATUS_REJECTED, is_ok
from curation.sizing import DECODE_TASK_MEMORY
from curation.stages.crops import CropJob
from curation.stages.resize import _downscale_rgb, model_input  # noqa: F401 (model_input: public here too)
from curation.stages.features import (  # noqa: F401 (the one-image helpers are public here too)
    COPY_DESCRIPTOR_ID, COPY_DIM, FEATURES_ID, STATS_MAX_SIDE, ThumbnailFeatures, copy_descriptor, copy_grid,
    copy_vectors, grey_statistics, luminance_percentiles, trim_border)
from curation.stages.jpeg import (  # noqa: F401
    _plain_jpeg_size, draft_request, exif_orientation, jpeg_image_digest, torch_decodable)

# We enforce our own pixel cap (decode.max_pixels) before pixels are allocated.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

REDUCE_TO = 1024  # a full-size decode is box-reduced right away to about this longer side (or less)


class RejectedInput(Exception):
    """An input item that cannot be used; ``str()`` is the human-readable reason."""


@dataclass
class Decoded:
    pixels: np.ndarray  # (S, S, 3) uint8, model input
    width: int
    height: int
    brightness: float
    contrast: float
    sharpness: float
    shadows: float  # 1st percentile of luminance
    highlights: float  # 99th percentile of luminance
    pixel_hash: str
    phash: int
    copy_vector: np.ndarray  # (COPY_DIM,) float32, unit norm


# Formats PIL cannot decode here, recognised by their magic bytes.
UNSUPPORTED_MAGIC = (
    (4, b"ftypheic", "HEIC"), (4, b"ftypheix", "HEIC"), (4, b"ftypmif1", "HEIF"), (4, b"ftypavif", "AVIF"),
    (0, b"\xff\x0a", "JPEG XL"), (0, b"\x00\x00\x00\x0cJXL ", "JPEG XL"), (0, b"%PDF", "PDF"),
    (0, b"8BPS", "Photoshop PSD"),
)


def _digest(data: bytes) -> str:
    """128-bit content digest for exact-duplicate matching (SHA-1, hardware-accelerated on
    current CPUs: the fastest of hashlib's here; not used for security)."""
    return hashlib.sha1(data, usedforsecurity=False).hexdigest()[:32]


def pixel_digest(rgb: np.ndarray) -> str:
    """The digest of decoded pixels, ``(H, W, 3)`` uint8: the same picture saved twice
    losslessly. Hashes the array's buffer in place (the same bytes as ``Image.tobytes()``,
    without the copy), followed by its shape."""
    digest = hashlib.sha1(np.ascontiguousarray(rgb), usedforsecurity=False)
    digest.update(repr(tuple(rgb.shape)).encode())
    return digest.hexdigest()[:32]


def _describe_non_image(data: bytes) -> str:
    for offset, magic, name in UNSUPPORTED_MAGIC:
        if data[offset:offset + len(magic)] == magic:
            return f"unsupported format: {name}"
    head = data[:64].lstrip().lower()
    if b"<svg" in data[:512].lower():
        return "unsupported format: SVG (vector image)"
    if head.startswith((b"<!doctype", b"<html", b"<?xml", b"<")):
        return "not an image: looks like HTML/XML text"
    if head[:1] in (b"{", b"["):
        return "not an image: looks like JSON text"
    try:
        data[:256].decode("utf-8")
        return "not an image: looks like text"
    except UnicodeDecodeError:
        return f"not an image: unrecognised format (first bytes {data[:8].hex()})"


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Deterministic RGB conversion for every mode PIL can hand us."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    if mode != "RGB":
        return image.convert("RGB")
    return image


def grey_thumbnail(rgb: np.ndarray) -> Image.Image:
    """The ``(H, W, 3)`` uint8 image in grey with its longer side at most ``STATS_MAX_SIDE``
    (never upscaled): what the statistics, the dHash and the copy descriptor are computed on.
    Resampled in colour by the model input's kernel (:func:`_downscale_rgb`, bilinear with
    antialiasing, like PIL's to within a level), then made grey by PIL's ITU-R 601-2 luma: a
    third of the cost of PIL's grey resampling at the size most photos decode to."""
    h, w = rgb.shape[:2]
    if max(w, h) > STATS_MAX_SIDE:
        scale = STATS_MAX_SIDE / max(w, h)
        small = np.empty((max(1, round(h * scale)), max(1, round(w * scale)), 3), np.uint8)
        _downscale_rgb(rgb, small)
        rgb = small
    return Image.fromarray(rgb, "RGB").convert("L")


def working_thumbnail(image: Image.Image) -> Image.Image:
    """:func:`grey_thumbnail` of a PIL image of any mode (converted to RGB first)."""
    return grey_thumbnail(np.asarray(image if image.mode == "RGB" else image.convert("RGB")))


class _OneTorchThread:
    """torch on one thread for a decode batch (a decode task holds one CPU; one small image
    gains nothing from more), the caller's setting restored after. Ray's workers start with
    one already (``OMP_NUM_THREADS`` = the task's CPUs); then this changes nothing."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        if self.threads != 1:
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.threads != 1:
            torch.set_num_threads(self.threads)


def pixel_statistics(image: Image.Image) -> tuple[float, float, float, int]:
    """Brightness, contrast, sharpness and dHash of an RGB image (see :func:`grey_statistics`)."""
    return grey_statistics(working_thumbnail(image))


def decode_image(data: bytes, *, image_size: int, max_pixels: int,
                 background: tuple[int, int, int] = (255, 255, 255), pixels_out: np.ndarray | None = None) -> Decoded:
    """Decode encoded image bytes once, at the smallest scale its consumers need (JPEG DCT
    scaling), and derive the model input, statistics and hashes from that one decode; raises
    :class:`RejectedInput` with a specific reason. The model input is written into
    ``pixels_out`` when given. (:class:`DecodeStage` does the same for a batch, with
    :func:`decode_into` and one :class:`ThumbnailFeatures` for all its images.)"""
    pixels = np.empty((image_size, image_size, 3), np.uint8) if pixels_out is None else pixels_out
    width, height, pixel_hash, grey = decode_into(data, image_size=image_size, max_pixels=max_pixels,
                                                  background=background, pixels_out=pixels)
    features = ThumbnailFeatures(1)
    features.add(0, grey)
    values = features.finish()
    return Decoded(pixels=pixels, width=width, height=height,
                   brightness=float(values["brightness"][0]), contrast=float(values["contrast"][0]),
                   sharpness=float(values["sharpness"][0]), shadows=float(values["shadows"][0]),
                   highlights=float(values["highlights"][0]), pixel_hash=pixel_hash,
                   phash=int(values["phash"][0]), copy_vector=values["copy_vector"][0])


def decode_into(data: bytes, *, image_size: int, max_pixels: int, background: tuple[int, int, int],
                pixels_out: np.ndarray, crops: CropJob | None = None) -> tuple[int, int, str, Image.Image]:
    """Decode one image, its model input into ``pixels_out``. Returns its full size (EXIF
    orientation applied), its pixel hash and its grey working thumbnail (for
    :class:`ThumbnailFeatures`). With ``crops``, its boxes are cut from the same decode (made
    at a scale that keeps them large enough, see :mod:`curation.stages.crops`) into
    ``crops.out``. Raises :class:`RejectedInput` with a specific reason."""
    if not data:
        raise RejectedInput("corrupt: empty file (0 bytes)")
    pixels = None
    orientation = 1
    # most inputs: no PIL header parse (and none without simplejpeg: PIL decodes everything then)
    size = _plain_jpeg_size(data) if simplejpeg is not None else None
    if size is not None:
        width, height = size
        _check_size(width, height, max_pixels)
        need = crops.decode_scale(width, height) if crops is not None else 0.0
        pixels = _decode_jpeg_fast(data, width, height, image_size, need)
    if pixels is not None:
        scale = width / pixels.shape[1]
    else:
        image = _open(data)
        width, height = image.size
        _check_size(width, height, max_pixels)
        need = crops.decode_scale(width, height) if crops is not None else 0.0
        rgb, scale, orientation = _decode_with_pil(image, width, image_size, background, need)
        pixels = np.array(rgb)  # writable: the resizes read it without copying it again
    if crops is not None:
        crops.cut(pixels, scale, orientation)
    # The same picture saved twice: a JPEG's coded image (whatever decodes it, see
    # jpeg_image_digest), else the decoded pixels' digest (lossless formats).
    pixel_hash = jpeg_image_digest(data) or pixel_digest(pixels)
    grey = grey_thumbnail(pixels)
    model_input(pixels, image_size, out=pixels_out)
    return round(pixels.shape[1] * scale), round(pixels.shape[0] * scale), pixel_hash, grey


def _open(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise RejectedInput(_describe_non_image(data)) from None
    except Exception as exc:  # PIL raises many types on malformed headers
        raise RejectedInput(f"corrupt: unreadable header ({type(exc).__name__}: {exc})") from None


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise RejectedInput(f"corrupt: invalid size {width}x{height}")
    if width * height > max_pixels:
        raise RejectedInput(f"too many pixels: {width}x{height} exceeds decode.max_pixels={max_pixels}")


def _decode_jpeg_fast(data: bytes, width: int, height: int, image_size: int, need: float = 0.0) -> np.ndarray | None:
    """A plain JPEG (see :func:`_plain_jpeg_size`) decoded by libjpeg-turbo at the smallest DCT
    scale that serves every consumer (``need``: at least this fraction of the full size, for
    box crops); None when simplejpeg refuses it (PIL then says why)."""
    min_width, min_height = _with_need(draft_request(width, height, image_size), width, height, need)
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=min_width, min_height=min_height)
    except (ValueError, RuntimeError, OSError):
        return None


def _with_need(request: tuple[int, int], width: int, height: int, need: float) -> tuple[int, int]:
    """A decode size request raised to ``need`` of the full ``width`` x ``height``."""
    if need <= 0:
        return request
    return (max(request[0], min(width, math.ceil(width * need))), max(request[1], min(height, math.ceil(height * need))))


def _decode_with_pil(image: Image.Image, width: int, image_size: int, background: tuple[int, int, int],
                     need: float = 0.0) -> tuple[Image.Image, float, int]:
    """Every format PIL reads; JPEGs at a reduced DCT scale (at least ``need`` of the full
    size). Returns RGB, the decode scale and the EXIF orientation applied."""
    orientation = 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if image.format == "JPEG":
                # Decode at a reduced DCT scale (1/2, 1/4, 1/8) when that still covers the model
                # input and the statistics: most of a large JPEG's decode cost is never decoded.
                image.draft("RGB", _with_need(draft_request(*image.size, image_size), *image.size, need))
            image.seek(0)  # first frame of animations
            image.load()
            scale = width / image.size[0]  # > 1 when draft mode decoded at reduced size
            if (image.format != "JPEG" or "exif" in image.info) and image.getexif().get(0x0112, 1) != 1:
                orientation = int(image.getexif().get(0x0112, 1))
                image = ImageOps.exif_transpose(image)
            # Formats without reduced-scale decoding (PNG, TIFF, ...) arrive at full size: cut
            # them down once, right away, so no full-size copy is ever made (RGB conversion, the
            # pixel hash): a 90-megapixel PNG then peaks near its decoded size, within the
            # stage's declared memory, instead of three times that.
            factor = max(image.size) // REDUCE_TO
            if need > 0:  # never below what the boxes need
                factor = min(factor, int(1 / need))
            if factor >= 2:
                before = max(image.size)
                try:
                    image = image.reduce(factor)
                    scale *= before / max(image.size)
                except (ValueError, NotImplementedError):  # a mode reduce() does not take
                    pass
            rgb = _to_rgb(image, background)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        text = str(exc)
        if "truncated" in text or isinstance(exc, EOFError):
            raise RejectedInput(f"corrupt: truncated {image.format or 'image'} data") from None
        raise RejectedInput(f"corrupt: {image.format or 'image'} decode failed ({text})") from None
    except Exception as exc:
        raise RejectedInput(f"unsupported format: {image.format} mode {image.mode} ({type(exc).__name__}: {exc})") from None
    return rgb, scale, orientation


class DecodeStage:
    """Read bytes by URI and decode them: a Ray Data batch callable (``batch_format='numpy'``).

    Input batch columns: ``uri``, ``input_error`` and anything else (passed through).
    Output adds: ``status``, ``reason``, ``width``, ``height``, ``brightness``, ``contrast``,
    ``sharpness``, ``shadows``, ``highlights``, ``content_hash``, ``pixel_hash``, ``phash``, ``copy_vector`` (N, COPY_DIM)
    float32 (the copy descriptor; zeros for rejected rows) and ``pixels`` (N, S, S, 3) uint8.

    Args:
        resolver: resolves ``s3://`` and local URIs.
        image_size: square model input size.
        max_pixels: refuse images larger than this before decoding.
        background: RGB for compositing transparency.
        defer_jpegs: leave the files the torch path takes (:func:`~curation.stages.jpeg.torch_decodable`)
            undecoded: their bytes go out in a ``jpeg`` column (empty for every other row) for
            the embedding actor to decode on its device (``decode.path: torch``), with their
            ``pixel_hash`` (read here, where the bytes are). ``pixels`` is then a binary column:
            each decoded row's model input as its ``S*S*3`` bytes, empty for the others, so a
            deferred row carries no placeholder pixels to the actor.
        objects: the boxes' settings in a detection run (``units``, ``margin``,
            ``tolerance_px``, ``min_size_px``): the batch then has ``boxes`` (each row's boxes
            as float64 bytes, ``[x, y, w, h]`` in ``units``), ``box_rows`` (int64 bytes: their
            rows in the run's objects table), ``box_cut`` (uint8 bytes: which of them to cut;
            the rest are stored from an earlier night) and ``box_keys`` (int64 bytes: their crop
            keys, then one per background square to cut), and the output gains ``crops`` (the
            cut boxes' model inputs, ``S*S*3`` bytes each, concatenated), ``crop_rows`` (int64
            bytes: which boxes those are; -1 for the squares of background after them),
            ``crop_keys`` (their keys) and ``orientation`` (EXIF; boxes are in the stored frame).
            An image with boxes is always decoded here, never deferred.
    """

    memory_bytes = DECODE_TASK_MEMORY  # what each decode task declares (sized in curation.sizing)

    def __init__(self, *, resolver: Resolver, image_size: int, max_pixels: int,
                 background: tuple[int, int, int] = (255, 255, 255), defer_jpegs: bool = False,
                 objects: dict | None = None):
        self.defer_jpegs = defer_jpegs
        self.objects = objects
        self.resolver = resolver
        self.image_size = image_size
        self.max_pixels = max_pixels
        self.background = tuple(background)

    def _read(self, uri: str) -> bytes:
        location = self.resolver.resolve(uri)
        try:
            with location.filesystem.open_input_stream(location.path) as fh:
                return fh.read()
        except FileNotFoundError:
            raise RejectedInput("missing: object does not exist") from None
        except OSError as exc:
            text = str(exc)
            if "does not exist" in text or "NoSuchKey" in text or "not found" in text.lower():
                raise RejectedInput("missing: object does not exist") from None
            if "directory" in text.lower():
                raise RejectedInput("not an image: a folder, not a file") from None
            raise RejectedInput(f"unreadable: {text.splitlines()[0][:200]}") from None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["uri"])
        size = self.image_size
        out = {
            "status": np.empty(n, dtype=object), "reason": np.empty(n, dtype=object),
            "width": np.zeros(n, np.int32), "height": np.zeros(n, np.int32),
            "brightness": np.full(n, np.nan, np.float32), "contrast": np.full(n, np.nan, np.float32),
            "sharpness": np.full(n, np.nan, np.float32),
            "shadows": np.full(n, np.nan, np.float32), "highlights": np.full(n, np.nan, np.float32),
            "content_hash": np.empty(n, dtype=object), "pixel_hash": np.empty(n, dtype=object),
            "phash": np.zeros(n, np.int64), "pixels": np.empty((n, size, size, 3), np.uint8),  # every row written
            "copy_vector": np.zeros((n, COPY_DIM), np.float32),
        }
        if self.defer_jpegs:
            out["jpeg"] = np.full(n, b"", dtype=object)
        if self.objects is not None:
            out["crops"] = np.full(n, b"", dtype=object)
            out["crop_rows"] = np.full(n, b"", dtype=object)
            out["crop_keys"] = np.full(n, b"", dtype=object)
            out["orientation"] = np.ones(n, np.int8)
        with _OneTorchThread():
            self._decode_rows(batch, out)
        if self.defer_jpegs:
            deferred = np.fromiter((bool(data) for data in out["jpeg"]), bool, n)
            decoded = is_ok(out["status"]) & ~deferred
            out["pixels"] = np.array([out["pixels"][i].tobytes() if decoded[i] else b"" for i in range(n)], object)
        result = {key: value for key, value in batch.items() if key not in ("input_error", "boxes", "box_rows", "box_cut", "box_keys")}
        result.update(out)
        return result

    def _crop_job(self, batch: dict[str, np.ndarray], i: int) -> CropJob | None:
        """Row ``i``'s boxes as a :class:`CropJob` (None: not a detection run, or no boxes)."""
        if self.objects is None or not batch["boxes"][i]:
            return None
        boxes = np.frombuffer(batch["boxes"][i], np.float64).reshape(-1, 4)
        size = self.image_size
        want = np.frombuffer(batch["box_cut"][i], np.uint8).astype(bool)
        extra = len(batch["box_keys"][i]) // 8 - len(boxes)  # the background squares still to cut
        return CropJob(boxes, units=self.objects["units"], image_size=size, margin=self.objects["margin"],
                       tolerance_px=self.objects["tolerance_px"], min_size_px=self.objects["min_size_px"],
                       out=np.empty((len(boxes) + extra, size, size, 3), np.uint8), backgrounds=extra, want=want)

    def _decode_rows(self, batch: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> None:
        n = len(batch["uri"])
        errors = batch.get("input_error")
        greys: dict[int, Image.Image] = {}
        deferrable = torch_decodable if self.defer_jpegs else None
        for i, uri in enumerate(batch["uri"]):
            try:
                if errors is not None and errors[i]:
                    raise RejectedInput(str(errors[i]))
                data = self._read(str(uri))
                out["content_hash"][i] = _digest(data)
                job = self._crop_job(batch, i)
                if job is None and deferrable is not None and deferrable(data, self.max_pixels):
                    digest = jpeg_image_digest(data)
                    if digest is not None:  # (else decoded here, and its pixels hashed)
                        out["jpeg"][i], out["pixel_hash"][i] = data, digest  # decoded by the embedding actor
                        out["status"][i], out["reason"][i] = STATUS_OK, None
                        continue
                width, height, out["pixel_hash"][i], greys[i] = decode_into(
                    data, image_size=self.image_size, max_pixels=self.max_pixels, background=self.background,
                    pixels_out=out["pixels"][i], crops=job)
                if job is not None:
                    out["orientation"][i] = job.orientation
                if job is not None and (job.cut_mask.any() or job.background_count):  # boxes, then background squares (row -1)
                    cut = np.concatenate([job.cut_mask, np.arange(job.backgrounds) < job.background_count])
                    rows = np.concatenate([np.frombuffer(batch["box_rows"][i], np.int64)[job.cut_mask],
                                           np.full(job.background_count, -1, np.int64)])
                    keys = np.frombuffer(batch["box_keys"][i], np.int64)
                    keys = np.concatenate([keys[:len(job.boxes)][job.cut_mask],
                                           keys[len(job.boxes):][:job.background_count]])
                    out["crops"][i], out["crop_rows"][i] = job.out[cut].tobytes(), rows.tobytes()
                    out["crop_keys"][i] = keys.tobytes()
            except RejectedInput as exc:
                out["pixels"][i] = 0
                out["status"][i] = STATUS_REJECTED
                out["reason"][i] = str(exc)
                continue
            out["status"][i] = STATUS_OK
            out["reason"][i] = None
            out["width"][i], out["height"][i] = width, height
        # The thumbnails' features in a second pass, not inside the first: the codec, the hashes
        # and the resizes stream whole images through the caches, and the many small calls on
        # thumbnails then run warm, back to back (benchmarks/README.md has the measurement).
        features = ThumbnailFeatures(n)
        for i in list(greys):
            features.add(i, greys.pop(i))
        ok = is_ok(out["status"])
        if "jpeg" in out:  # deferred rows get their features in the embedding actor
            ok &= np.fromiter((not data for data in out["jpeg"]), bool, n)
        if ok.any():
            for key, values in features.finish(ok).items():
                out[key][ok] = values
