"""The per-image features the junk and copy scores use, computed from a grey working thumbnail:
brightness, contrast, sharpness, shadows and highlights, a 64-bit dHash, and the copy
descriptor. Plain numpy and PIL, so the CPU decode path (:mod:`curation.stages.decode`) and the
device path (:mod:`curation.stages.decode_torch`) share the definitions and their identities
(``FEATURES_ID``, ``COPY_DESCRIPTOR_ID``: part of the embedding store's key).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

STATS_MAX_SIDE = 256  # statistics are computed at most at this size; never upscaled


# The copy descriptor (see :func:`copy_descriptor`); its identity is part of the embedding
# store's key, so a change of its definition never mixes old and new descriptors. Bump it when
# a change moves stored descriptors past what `copy_cosine` tolerates (benchmarks/README.md,
# "The decode stage against the codec", says how that was judged last time).
COPY_DESCRIPTOR_ID = "copy-v1"


COPY_GRID = 16  # cells per side of the descriptor grid


COPY_CANON = 32  # the trimmed image is resampled to this square first ...


COPY_BLUR = 1.0  # ... blurred (px at that size: tolerance to shifts, rotation, noise) ...


COPY_INSET = 3  # ... and this many px cut off each side (rotation corners, crops, frames)


COPY_DIM = COPY_GRID * COPY_GRID  # mirror-even half plus mirror-odd magnitude half


BORDER_TOLERANCE = 10  # grey levels: a row or column this close to the frame colour is border


# The stored per-item features' definition (statistics, hashes, copy descriptor): part of the
# embedding store's key, so vectors and features made under another definition are never
# mixed. "features-v2": the copy descriptor "copy-v1" (COPY_DESCRIPTOR_ID), and a JPEG's
# pixel_hash is its coded image's digest (jpeg_image_digest), the same on every decode path.
FEATURES_ID = "features-v2"


def luminance_percentiles(grey: Image.Image, low: float = 0.01, high: float = 0.99) -> tuple[float, float]:
    """The ``low`` and ``high`` quantiles of luminance in [0, 1] (from PIL's histogram, in C):
    the shadows and the highlights. An under-exposed image has no highlights, an over-exposed
    or washed-out one no shadows -- unlike a night shot or a snow scene, which keep both."""
    shadows, highlights = _percentiles(np.asarray(grey.histogram()[:256], np.int64)[np.newaxis], low, high)
    return float(shadows[0]), float(highlights[0])


def grey_statistics(grey: Image.Image) -> tuple[float, float, float, int]:
    """Brightness, contrast, sharpness and a 64-bit difference hash of a grey working thumbnail.

    All four come from that one thumbnail (:func:`working_thumbnail`, at most
    ``STATS_MAX_SIDE`` px, never upscaled, so a sharp small image stays sharp):
    brightness: mean luminance in [0, 1]; contrast: luminance std; sharpness: variance of the
    Laplacian over the variance of the luminance (independent of contrast); phash: dHash on a
    9x8 grey thumbnail (robust to re-encoding, resizing and brightness shifts).
    """
    features = ThumbnailFeatures(1)
    features.add(0, grey, copy=False)
    values = features.finish()
    return (float(values["brightness"][0]), float(values["contrast"][0]), float(values["sharpness"][0]),
            int(values["phash"][0]))


_LEVELS = np.arange(256, dtype=np.int64)


_LEVELS_SQUARED = _LEVELS * _LEVELS


def _percentiles(histograms: np.ndarray, low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``(N, 256)`` histograms, the first level whose cumulative count reaches each
    quantile, in [0, 1] (NaN for an empty histogram)."""
    counts = np.cumsum(histograms, axis=1)
    total = counts[:, -1:].astype(np.float64)
    shadows = np.where(total[:, 0] > 0, (counts < low * total).sum(axis=1) / 255.0, np.nan)
    highlights = np.where(total[:, 0] > 0, (counts < high * total).sum(axis=1) / 255.0, np.nan)
    return shadows, highlights


def _laplacian_variance(lum: np.ndarray) -> float:
    """The variance of the 4-neighbour Laplacian of a grey image, in [0, 1] units (0 below 3x3)."""
    if lum.shape[0] < 3 or lum.shape[1] < 3:
        return 0.0
    lum = lum.astype(np.int16)
    lap = lum[:-2, 1:-1] + lum[2:, 1:-1]  # in place after this: one temporary, not five
    lap += lum[1:-1, :-2]
    lap += lum[1:-1, 2:]
    lap -= 4 * lum[1:-1, 1:-1]
    values = lap.ravel().astype(np.float64)  # integers: the sums below are exact
    mean = values.sum() / values.size
    # einsum, not `values @ values`: BLAS would start threads on a one-CPU decode task.
    return float(np.einsum("i,i->", values, values) / values.size - mean * mean) / (255.0 * 255.0)


class ThumbnailFeatures:
    """The statistics, dHash and copy descriptor of ``n`` grey working thumbnails.

    :meth:`add` does each image's part, all of it in C (PIL's histogram and small resizes, the
    Laplacian); :meth:`finish` does the arithmetic on those for every image at once. A decode
    task spends its time in the codec: per-image interpreter calls for 256-element sums cost
    more there than their arithmetic does.

    Args:
        n: images (rows) to hold.
    """

    def __init__(self, n: int):
        self.histogram = np.zeros((n, 256), np.int64)
        self.laplacian_variance = np.zeros(n, np.float64)
        self.dhash = np.zeros((n, 8, 9), np.uint8)
        self.copy_grid = np.zeros((n, COPY_GRID, COPY_GRID), np.uint8)

    def add(self, row: int, grey: Image.Image, *, copy: bool = True) -> None:
        """Row ``row``'s part from its grey thumbnail (``copy=False``: no copy descriptor)."""
        lum = np.asarray(grey)  # one copy, read by the Laplacian and the copy descriptor
        self.histogram[row] = grey.histogram()[:256]
        self.laplacian_variance[row] = _laplacian_variance(lum)
        self.dhash[row] = np.asarray(grey.resize((9, 8), Image.BILINEAR))
        if copy:
            self.copy_grid[row] = copy_grid(lum)

    def finish(self, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """``brightness``, ``contrast``, ``sharpness``, ``shadows``, ``highlights``, ``phash``
        and ``copy_vector`` of the chosen rows (a boolean mask or indices; all by default)."""
        pick = slice(None) if rows is None else rows
        histogram = self.histogram[pick]
        # Mean and variance from the histogram, as ImageStat computes them (exact integer sums).
        count = histogram.sum(axis=1).astype(np.float64)
        total = (histogram @ _LEVELS).astype(np.float64)
        squares = (histogram @ _LEVELS_SQUARED).astype(np.float64)
        brightness = total / count / 255.0
        contrast = np.sqrt((squares - total**2.0 / count) / count) / 255.0
        shadows, highlights = _percentiles(histogram, 0.01, 0.99)
        dhash = self.dhash[pick].astype(np.int16)
        bits = (dhash[:, :, 1:] > dhash[:, :, :-1]).reshape(len(dhash), 64)
        return {
            "brightness": brightness, "contrast": contrast,
            "sharpness": self.laplacian_variance[pick] / (contrast**2 + 1e-4),
            "shadows": shadows, "highlights": highlights,
            "phash": np.packbits(bits, axis=1).view(">i8")[:, 0].astype(np.int64),
            "copy_vector": copy_vectors(self.copy_grid[pick]),
        }


def trim_border(lum: np.ndarray) -> np.ndarray:
    """``lum`` without a uniform frame: the rows and columns at the edges that stay within
    ``BORDER_TOLERANCE`` of the frame's colour (borders, letterbox and pillarbox bars). An image
    that would lose more than 80% of a side is returned whole (it is mostly flat)."""
    h, w = lum.shape
    ring = np.concatenate([lum[0], lum[-1], lum[:, 0], lum[:, -1]])
    frame = int(np.median(ring))
    low, high = frame - BORDER_TOLERANCE, frame + BORDER_TOLERANCE

    def off(pixels):  # in uint8, without a widened copy (a bound past 0 or 255 excludes nothing)
        if low <= 0:
            return pixels > high
        if high >= 255:
            return pixels < low
        return (pixels < low) | (pixels > high)

    edges = off(ring)
    if edges[:w].any() and edges[w:2 * w].any() and edges[2 * w:2 * w + h].any() and edges[2 * w + h:].any():
        return lum  # every edge line leaves the frame's colour: no frame (most photos)
    mask = off(lum)
    rows, cols = mask.any(axis=1), mask.any(axis=0)
    if rows.sum() < 0.2 * h or cols.sum() < 0.2 * w:
        return lum
    top, bottom = int(np.argmax(rows)), h - int(np.argmax(rows[::-1]))
    left, right = int(np.argmax(cols)), w - int(np.argmax(cols[::-1]))
    return lum[top:bottom, left:right]


def copy_descriptor(grey: Image.Image | np.ndarray) -> np.ndarray:
    """A compact appearance descriptor for copy detection, whatever model embeds the image.

    From the grey working thumbnail: the uniform frame is trimmed (borders, letterboxing), the
    rest resampled to a ``COPY_CANON`` square whatever its aspect (aspect changes), blurred
    (re-encoding, small shifts and rotations), inset by ``COPY_INSET`` px (rotation corners,
    crops) and pooled to ``COPY_GRID`` x ``COPY_GRID``. Grey and mean-removed, so colour and
    brightness edits do not move it; the mirror-even half and the magnitude of the mirror-odd
    half make it identical for an image and its mirror. Unit norm; compared by cosine.
    Measured on CIFAR-10 photos against the alternatives (grid 8/12/16, with and without trim,
    blur, inset, symmetry): see benchmarks/README.md.
    """
    return copy_vectors(copy_grid(np.asarray(grey, dtype=np.uint8))[np.newaxis])[0]


def copy_grid(lum: np.ndarray) -> np.ndarray:
    """The pooled ``COPY_GRID`` square of a grey thumbnail, before :func:`copy_vectors`."""
    canon = Image.fromarray(trim_border(lum)).resize((COPY_CANON, COPY_CANON), Image.BILINEAR, reducing_gap=2.0)
    canon = canon.filter(ImageFilter.GaussianBlur(COPY_BLUR))
    inner = canon.crop((COPY_INSET, COPY_INSET, COPY_CANON - COPY_INSET, COPY_CANON - COPY_INSET))
    return np.asarray(inner.resize((COPY_GRID, COPY_GRID), Image.BILINEAR))


def copy_vectors(grids: np.ndarray) -> np.ndarray:
    """``(N, COPY_GRID, COPY_GRID)`` pooled grids -> ``(N, COPY_DIM)`` float32 unit descriptors:
    mean removed, the mirror-even half and the mirror-odd half's magnitude (zeros when flat)."""
    x = grids.astype(np.float32)
    x -= x.mean(axis=(1, 2), keepdims=True)
    n, half = len(x), COPY_GRID // 2
    left, mirrored = x[:, :, :half], x[:, :, :half - 1:-1]  # each column and its mirror image's
    vectors = np.empty((n, COPY_DIM), np.float32)
    even = vectors[:, :COPY_DIM // 2].reshape(n, COPY_GRID, half)
    odd = vectors[:, COPY_DIM // 2:].reshape(n, COPY_GRID, half)
    np.add(left, mirrored, out=even)
    np.abs(np.subtract(left, mirrored, out=odd), out=odd)
    odd -= odd.mean(axis=(1, 2), keepdims=True)
    odd *= 0.7
    norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors))
    flat = norms <= 1e-6
    vectors /= np.where(flat, 1.0, norms)[:, np.newaxis]
    vectors[flat] = 0.0
    return vectors
