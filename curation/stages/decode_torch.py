"""JPEG decoding, the model input, the working thumbnail and its features as torch ops, on
whichever device holds the batch (``decode.path: torch``, or ``auto`` on a GPU node).

On a GPU node the CPU decode tasks only read the files (:class:`~curation.stages.decode.DecodeStage`
with ``defer_jpegs``): a plain JPEG (:func:`torch_decodable`) travels to the embedding actor as
its bytes, where :class:`TorchDecoder` decodes the whole batch at once
(``torchvision.io.decode_jpeg``: nvJPEG on a GPU, libjpeg-turbo on CPU) and does everything else
on the device, images of one size as one stacked batch: the resamples, the grey thumbnail, its
histogram, Laplacian, dHash and copy-descriptor grid (:class:`TorchThumbnailFeatures`). Only
those small per-image parts come back to the host; the model inputs stay on the device for the
model. Everything else (PNG, CMYK, EXIF-rotated, truncated: no end-of-image marker) is decoded by
those CPU tasks as before, and a JPEG the decoder still refuses is decoded by the CPU path in
the actor, so its ``rejected`` reason is the CPU path's own.

Same answers on either path:

* ``pixel_hash`` of a JPEG is the digest of its coded image (:func:`jpeg_image_digest`: every
  segment but the APPn metadata and comments), not of decoded pixels: two decoders never agree
  to the last bit, and this is the same on every node (the same picture with other metadata
  still matches; a lossless re-encode with other Huffman tables no longer does);
* the full-size decode is first brought to the size and look of the CPU path's DCT-scaled
  decode (:func:`as_cpu_decodes`), and the model input and the working thumbnail are made from
  it as the CPU path makes them;
* the statistics are the CPU path's own arithmetic (:meth:`ThumbnailFeatures.finish`) on a
  histogram and a Laplacian variance that are exact integer sums, so on equal thumbnails they
  are equal; the dHash and the copy grid resample as PIL does (antialiased bilinear, PIL's
  box reduction and its three-pass box blur), to within a level.

``benchmarks/decode_agreement.py`` measures what is left between the paths, on 640x480 and
1600x1200 photos (benchmarks/README.md, "Decoding on the device").
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
import torch.nn.functional as torch_functional

from curation.stages.features import (BORDER_TOLERANCE, COPY_BLUR, COPY_CANON, COPY_GRID, COPY_INSET, STATS_MAX_SIDE,
                                       ThumbnailFeatures, trim_border)
from curation.stages.jpeg import draft_request


# Decoded pixels stacked per resampling call: bounds the float32 working copy (~0.8 GB).
STACK_PIXELS = 64 * 1024 * 1024


def _as_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.round_().clamp_(0, 255).to(torch.uint8)


def resample(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(..., C, H, W)`` uint8 -> ``(..., C, height, width)`` uint8: bilinear, antialiased when
    shrinking (PIL's filter, which the CPU path uses), in float32 on the images' device."""
    lead = images.shape[:-2]
    # Every leading dimension as channels of one image: the filter works plane by plane.
    x = images.reshape(1, -1, *images.shape[-2:]).float()
    shrink = height < images.shape[-2] or width < images.shape[-1]
    x = torch_functional.interpolate(x, size=(height, width), mode="bilinear", antialias=shrink, align_corners=False)
    return _as_uint8(x).reshape(*lead, height, width)


def decode_scale(width: int, height: int, image_size: int) -> int:
    """``M`` of the ``M/8`` scale the CPU path's libjpeg-turbo decodes this JPEG at: the
    smallest whose size still serves every consumer (:func:`~curation.stages.decode.draft_request`)."""
    min_width, min_height = draft_request(width, height, image_size)
    for m in range(1, 8):
        if -(-width * m // 8) >= min_width and -(-height * m // 8) >= min_height:
            return m
    return 8


def as_cpu_decodes(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Full-size decodes (``(3, H, W)`` or a stack ``(B, 3, H, W)`` of one size) brought to
    the size and look of the CPU path's DCT-scaled decode (whose pixels the statistics, the
    thumbnail and the model input all come from): averaged over ``8/M`` pixel squares for the
    scales 1/2, 1/4, 1/8 (what DCT scaling approximates), resampled to the same size for the
    other ones. Without it the Laplacian-based sharpness moves ~13% between the paths; with it,
    under 3% (benchmarks/README.md)."""
    h, w = images.shape[-2:]
    m = decode_scale(w, h, image_size)
    if m == 8:
        return images
    if 8 % m == 0:
        x = images.unsqueeze(0) if images.dim() == 3 else images
        x = torch_functional.avg_pool2d(x.float(), 8 // m, ceil_mode=True, count_include_pad=False)
        return _as_uint8(x).reshape(*images.shape[:-2], *x.shape[-2:])
    return resample(images, -(-h * m // 8), -(-w * m // 8))


def model_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """The centred square resampled to ``size`` x ``size`` (as :func:`curation.stages.decode.model_input`)."""
    h, w = images.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = images[..., top:top + side, left:left + side]
    return square if side == size else resample(square, size, size)


def grey_thumbnail(images: torch.Tensor) -> torch.Tensor:
    """``(..., h, w)`` uint8: the images with their longer side at most ``STATS_MAX_SIDE`` (never
    upscaled), made grey by PIL's integer ITU-R 601-2 luma (as the CPU path's thumbnail)."""
    h, w = images.shape[-2:]
    if max(h, w) > STATS_MAX_SIDE:
        scale = STATS_MAX_SIDE / max(h, w)
        images = resample(images, max(1, round(h * scale)), max(1, round(w * scale)))
    rgb = images.to(torch.int32)
    return ((rgb[..., 0, :, :] * 19595 + rgb[..., 1, :, :] * 38470 + rgb[..., 2, :, :] * 7471 + 0x8000) >> 16
            ).to(torch.uint8)


# PIL's 8-bit resampling and blur are fixed point; emulated here to the bit, as float64 sums
# of integers (exact below 2**53), so a grey thumbnail's dHash and copy grid are the CPU path's.
_PRECISION_BITS = 22  # Pillow's Resample.c: 32 - 8 - 2


@functools.lru_cache(maxsize=256)
def _pil_bilinear_weights(in_size: int, out_size: int, in_end: float) -> np.ndarray:
    """``(out_size, in_size)``: Pillow's fixed-point bilinear coefficients (``precompute_coeffs``
    and ``normalize_coeffs_8bpc``) for the input span ``[0, in_end)`` -- antialiased when
    shrinking, the filter stretched by the scale."""
    scale = in_end / out_size
    filter_scale = max(scale, 1.0)
    support = 1.0 * filter_scale
    weights = np.zeros((out_size, in_size), np.float64)
    for out in range(out_size):
        centre = (out + 0.5) * scale
        low = max(int(centre - support + 0.5), 0)
        high = min(int(centre + support + 0.5), in_size)
        x = np.arange(low, high)
        w = np.maximum(0.0, 1.0 - np.abs((x - centre + 0.5) / filter_scale))
        if w.sum() != 0.0:
            w = w / w.sum()
        weights[out, low:high] = np.floor(0.5 + w * (1 << _PRECISION_BITS))
    return weights


def _fixed_point_pass(x: torch.Tensor) -> torch.Tensor:
    return torch.floor((x + (1 << (_PRECISION_BITS - 1))) / (1 << _PRECISION_BITS)).clamp_(0, 255)


def pil_resize(grey: torch.Tensor, height: int, width: int, *, span: tuple[float, float] | None = None) -> torch.Tensor:
    """``(B, h, w)`` uint8 as PIL's ``resize((width, height), BILINEAR)`` of an ``L`` image, to
    the bit: the rows' pass, rounded to 8 bits, then the columns'. ``span``: the input's
    ``(width, height)`` the result covers, when less than whole pixels (after a reduction)."""
    h, w = grey.shape[-2:]
    span_w, span_h = span or (w, h)
    wx = torch.from_numpy(_pil_bilinear_weights(w, width, float(span_w))).to(grey.device)
    wy = torch.from_numpy(_pil_bilinear_weights(h, height, float(span_h))).to(grey.device)
    x = _fixed_point_pass(grey.double() @ wx.T)
    x = _fixed_point_pass(wy @ x)
    return x.to(torch.uint8)


def _pil_reduce_then_resize(grey: torch.Tensor, height: int, width: int, reducing_gap: float) -> torch.Tensor:
    """``(B, h, w)`` uint8 as PIL's ``resize((width, height), BILINEAR, reducing_gap=...)``:
    box-reduced by whole factors first (``Image.reduce``: a partial box at the edge averages
    what it holds, rounded as Pillow rounds), then resampled over the reduced span."""
    h, w = grey.shape[-2:]
    fy, fx = max(1, int(h / height / reducing_gap)), max(1, int(w / width / reducing_gap))
    if fx == 1 and fy == 1:
        return pil_resize(grey, height, width)
    x = grey.unsqueeze(1).double()
    sums = torch_functional.avg_pool2d(x, (fy, fx), ceil_mode=True, divisor_override=1)
    counts = torch_functional.avg_pool2d(torch.ones_like(x[:1]), (fy, fx), ceil_mode=True, divisor_override=1)
    # Pillow's Reduce.c: (sum + count / 2) * (2**24 // count) >> 24.
    multiplier = torch.floor((1 << 24) / counts)
    reduced = torch.floor((sums + torch.floor(counts / 2)) * multiplier / (1 << 24))[:, 0]
    return pil_resize(reduced.to(torch.uint8), height, width, span=(w / fx, h / fy))


# PIL's GaussianBlur(radius) is three passes of an extended box blur per axis, the rows first,
# whose box radius makes the three match a Gaussian of that sigma; at radius 1.0 the box is 0
# whole px and 0.25 px wide each side. Each pass is rounded to 8 bits, the edges repeated.
_BLUR_PASSES = 3


def _pil_box_blur_weights(radius: float) -> tuple[int, int]:
    """Pillow's ``(ww, fw)`` for a box of less than one whole pixel each side: the centre's
    and each neighbour's weight, in 24-bit fixed point."""
    f32 = np.float32  # Pillow computes these in C floats
    sigma2 = f32(radius) * f32(radius) / f32(_BLUR_PASSES)
    whole = f32(np.floor((f32(np.sqrt(12.0 * float(sigma2) + 1.0)) - 1.0) / 2.0))
    if whole != 0:  # wider boxes than the descriptor's blur would need: not written
        raise ValueError(f"a blur radius of {radius} needs a box wider than 1 px; this emulation covers < 1.5")
    part = f32((2 * whole + 1) * (whole * (whole + 1) - f32(3) * sigma2))
    part = f32(part / f32(f32(6) * (sigma2 - (whole + 1) * (whole + 1))))
    centre = int(f32(1 << 24) / f32(part * f32(2) + f32(1)))
    return centre, ((1 << 24) - centre) // 2


def pil_gaussian_blur(grey: torch.Tensor, radius: float) -> torch.Tensor:
    """``(B, h, w)`` uint8 blurred as PIL's ``ImageFilter.GaussianBlur(radius)``, to the bit."""
    centre, side = _pil_box_blur_weights(radius)
    x = grey.double()
    for dim in (2, 1):
        n = x.shape[dim]
        for _ in range(_BLUR_PASSES):
            padded = torch.cat([x.narrow(dim, 0, 1), x, x.narrow(dim, n - 1, 1)], dim=dim)
            bulk = padded.narrow(dim, 1, n) * centre + (padded.narrow(dim, 0, n) + padded.narrow(dim, 2, n)) * side
            x = torch.floor((bulk + (1 << 23)) / (1 << 24))
    return x.to(torch.uint8)


def _frame_check(lum: torch.Tensor) -> torch.Tensor:
    """``(B, h, w)`` uint8 -> ``(B,)`` bool: whether each image may have a uniform frame to
    trim (:func:`~curation.stages.decode.trim_border`'s first test: some edge line stays
    within ``BORDER_TOLERANCE`` of the median colour of the ring)."""
    ring = torch.cat([lum[:, 0], lum[:, -1], lum[:, :, 0], lum[:, :, -1]], dim=1).to(torch.int32)
    ordered = ring.sort(dim=1).values
    k = ring.shape[1] // 2  # even: numpy's median averages the two middle values, int() floors
    frame = (ordered[:, k - 1] + ordered[:, k]) // 2 if ring.shape[1] % 2 == 0 else ordered[:, k]
    off = (ring < (frame - BORDER_TOLERANCE)[:, None]) | (ring > (frame + BORDER_TOLERANCE)[:, None])
    h, w = lum.shape[1:]
    sides = torch.stack([off[:, :w].any(1), off[:, w:2 * w].any(1), off[:, 2 * w:2 * w + h].any(1),
                         off[:, 2 * w + h:].any(1)], dim=1)
    return ~sides.all(dim=1)


def copy_grids(lum: torch.Tensor) -> torch.Tensor:
    """``(B, h, w)`` uint8 thumbnails -> ``(B, COPY_GRID, COPY_GRID)`` uint8: the copy
    descriptor's pooled grid (:func:`~curation.stages.decode.copy_grid`), on the device. A
    thumbnail with a frame to trim (rare) has it trimmed on the host, as the CPU path does."""

    grids = torch.empty((lum.shape[0], COPY_GRID, COPY_GRID), dtype=torch.uint8, device=lum.device)
    framed = _frame_check(lum).cpu().numpy()
    whole = np.flatnonzero(~framed)
    if len(whole):
        grids[torch.as_tensor(whole, device=lum.device)] = _grid(lum[torch.as_tensor(whole, device=lum.device)])
    for i in np.flatnonzero(framed):
        trimmed = torch.from_numpy(np.ascontiguousarray(trim_border(lum[i].cpu().numpy()))).to(lum.device)
        grids[i] = _grid(trimmed[None])[0]
    return grids


def _grid(lum: torch.Tensor) -> torch.Tensor:

    canon = _pil_reduce_then_resize(lum, COPY_CANON, COPY_CANON, reducing_gap=2.0)
    canon = pil_gaussian_blur(canon, COPY_BLUR)
    inner = canon[:, COPY_INSET:COPY_CANON - COPY_INSET, COPY_INSET:COPY_CANON - COPY_INSET]
    return pil_resize(inner, COPY_GRID, COPY_GRID)


class TorchThumbnailFeatures:
    """Each thumbnail's part of the features on its device, stacks of one size at a time: the
    histogram, the Laplacian variance (both exact integer sums, as the CPU path's), the 9x8
    dHash thumbnail and the copy grid. :meth:`finish` brings those small arrays to the host at
    once and runs the CPU path's own arithmetic on them
    (:meth:`~curation.stages.decode.ThumbnailFeatures.finish`).

    Args:
        n: images (rows) to hold.
        device: where the thumbnails are.
    """

    def __init__(self, n: int, device: str | torch.device = "cpu"):
        self.n = n
        self.rows: list[np.ndarray] = []
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.device = device
        self.on_host: list[torch.Tensor] | None = None
        self.copied = None

    def add(self, rows: np.ndarray, lum: torch.Tensor) -> None:
        """Rows ``rows``' parts from their grey thumbnails, ``(len(rows), h, w)`` uint8."""
        b, h, w = lum.shape
        offsets = torch.arange(b, device=lum.device).mul_(256).view(b, 1)
        histogram = torch.bincount((lum.reshape(b, -1).long() + offsets).reshape(-1), minlength=256 * b)
        if h >= 3 and w >= 3:
            x = lum.to(torch.int32)
            lap = x[:, :-2, 1:-1] + x[:, 2:, 1:-1] + x[:, 1:-1, :-2] + x[:, 1:-1, 2:] - 4 * x[:, 1:-1, 1:-1]
            lap = lap.reshape(b, -1).long()
            size = lap.shape[1]
            # Exact integer sums, as the CPU path's; the division in float64 as it is there.
            total, squares = lap.sum(1).double(), (lap * lap).sum(1).double()
            mean = total / size
            variance = (squares / size - mean * mean) / (255.0 * 255.0)
        else:
            variance = torch.zeros(b, dtype=torch.float64, device=lum.device)
        self.rows.append(np.asarray(rows))
        self.parts.append((histogram.view(b, 256), variance, pil_resize(lum, 8, 9), copy_grids(lum)))

    def send(self) -> None:
        """Start the parts' copy to the host without waiting for it (on a GPU: into pinned
        memory, behind the work already queued, so the model can be queued after it)."""
        if self.on_host is not None or not self.parts:
            return
        stacked = [torch.cat(part) for part in zip(*self.parts)]
        if stacked[0].device.type != "cuda":
            self.on_host = stacked
            return
        self.on_host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in stacked]
        for host, device_part in zip(self.on_host, stacked):
            host.copy_(device_part, non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()

    def finish(self, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The columns of :meth:`ThumbnailFeatures.finish` for the chosen rows (all by default)."""
        features = ThumbnailFeatures(self.n)
        if self.parts:
            self.send()
            if self.copied is not None:
                self.copied.synchronize()  # the decode's work only, not what was queued after it
            index = np.concatenate(self.rows)
            histogram, variance, dhash, grid = (part.numpy() for part in self.on_host)
            features.histogram[index] = histogram
            features.laplacian_variance[index] = variance
            features.dhash[index] = dhash
            features.copy_grid[index] = grid
        return features.finish(rows)


def _stacks(images: list[torch.Tensor | None]) -> list[np.ndarray]:
    """Rows of ``images`` grouped by size, each group cut to at most ``STACK_PIXELS`` pixels."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        if image is not None:
            groups.setdefault(tuple(image.shape), []).append(i)
    out = []
    for shape, rows in groups.items():
        per = max(1, STACK_PIXELS // (shape[1] * shape[2]))
        out.extend(np.array(rows[start:start + per]) for start in range(0, len(rows), per))
    return out


class TorchDecoder:
    """Decodes a batch of JPEG files on ``device`` into model inputs and thumbnail features.

    Args:
        image_size: the model input's side.
        device: ``cpu`` or ``cuda`` (the embedding actor's device).
    """

    def __init__(self, *, image_size: int, device: str = "cpu"):
        self.image_size = image_size
        self.device = device

    def decode(self, files: list[bytes]) -> list[torch.Tensor | None]:
        """Each file decoded to ``(3, H, W)`` uint8 on the device; None where the decoder
        refused it. One batched call (nvJPEG's batched decode on a GPU); when it fails, file by
        file, to tell which ones."""
        from torchvision.io import ImageReadMode, decode_jpeg

        if not files:
            return []
        with warnings.catch_warnings():  # the decoder only reads the files' (immutable) bytes
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            tensors = [torch.frombuffer(data, dtype=torch.uint8) for data in files]
        try:
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            out: list[torch.Tensor | None] = []
            for tensor in tensors:
                try:
                    out.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    out.append(None)
            return out

    def __call__(self, files: list[bytes]) -> tuple[torch.Tensor, dict[str, np.ndarray], np.ndarray]:
        """``(pixels, features, decoded)``: the model inputs, ``(N, 3, S, S)`` uint8 on the
        device (zeros where not decoded); the columns :class:`~curation.stages.decode.DecodeStage`
        writes for an ok row (``width``, ``height``, ``brightness`` ... ``copy_vector``; the
        ``pixel_hash`` is the read task's); and which files were decoded (the rest are left to
        the CPU path)."""
        pixels, decoded, pending = self.start(files)
        return pixels, pending.columns(), decoded

    def start(self, files: list[bytes]) -> tuple[torch.Tensor, np.ndarray, DecodedFeatures]:
        """As :meth:`__call__`, the features still on their way: ``(pixels, decoded,
        pending)``, whose :meth:`DecodedFeatures.columns` waits for them (on a GPU the model
        can be queued in between)."""
        n = len(files)
        size = self.image_size
        images = self.decode(files)
        pixels = torch.zeros((n, 3, size, size), dtype=torch.uint8, device=self.device)
        decoded = np.array([image is not None for image in images], bool)
        features = TorchThumbnailFeatures(n, self.device)
        width, height = np.zeros(n, np.int32), np.zeros(n, np.int32)
        for rows in _stacks(images):
            stack = torch.stack([images[i] for i in rows])
            height[rows], width[rows] = stack.shape[-2:]
            for i in rows:
                images[i] = None  # each full-size decode freed once stacked
            stack = as_cpu_decodes(stack, size)
            index = torch.as_tensor(rows, device=self.device)
            pixels[index] = model_input(stack, size)
            features.add(rows, grey_thumbnail(stack))
        features.send()
        return pixels, decoded, DecodedFeatures(features, decoded, width, height)


class DecodedFeatures:
    """A batch's features on their way to the host (:meth:`TorchDecoder.start`)."""

    def __init__(self, features: TorchThumbnailFeatures, decoded: np.ndarray, width: np.ndarray, height: np.ndarray):
        self.features, self.decoded, self.width, self.height = features, decoded, width, height

    def columns(self) -> dict[str, np.ndarray]:
        """``width``, ``height`` and the statistics, hashes and copy descriptor, a row per
        file (zeros where not decoded)."""
        n = len(self.decoded)
        out: dict[str, np.ndarray] = {"width": self.width, "height": self.height}
        if self.decoded.any():
            for key, column in self.features.finish(self.decoded).items():
                full = np.zeros((n, *column.shape[1:]), column.dtype)
                full[self.decoded] = column
                out[key] = full
        return out
