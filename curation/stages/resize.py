"""Resampling a decoded ``(H, W, 3)`` uint8 image: the model input's square (a whole image's
centre, or a box's crop) and the working thumbnail's downscale, with torch's antialiased
bilinear uint8 kernel (PIL's filter, about five times its speed here)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as torch_functional
from PIL import Image

# The operator behind F.interpolate(mode="bilinear", antialias=True), in its form that writes into
# a given tensor (see _downscale_rgb); F.interpolate itself when a torch lacks it.
_RESAMPLE_INTO = getattr(getattr(torch.ops.aten, "_upsample_bilinear2d_aa", None), "out", None)


def model_input(rgb: np.ndarray, size: int, *, out: np.ndarray | None = None) -> np.ndarray:
    """The centred square of an ``(H, W, 3)`` uint8 image, resampled to ``size`` x ``size``
    (the shorter side scaled to ``size``, the longer one centre-cropped), bilinear with
    antialiasing, written into ``out`` (``(size, size, 3)`` uint8: the batch's own row) when
    given. Downscaling runs torch's uint8 antialiased bilinear kernel (vectorised, about 5x PIL's
    here, the same filter: pixels within a few levels of PIL's); upscaling (small images, cheap)
    stays with PIL."""
    if out is None:
        out = np.empty((size, size, 3), np.uint8)
    h, w = rgb.shape[:2]
    side = min(w, h)
    if side < size:
        image = Image.fromarray(rgb, "RGB")
        left, top = (w - side) / 2, (h - side) / 2
        out[...] = np.asarray(image.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side)))
        return out
    left, top = (w - side) // 2, (h - side) // 2
    square = rgb[top:top + side, left:left + side]
    if side == size:
        out[...] = square
    else:
        _downscale_rgb(square, out)
    return out


def _downscale_rgb(rgb: np.ndarray, out: np.ndarray) -> None:
    """``(H, W, 3)`` uint8 (a view is fine) resampled into ``out`` (``(h, w, 3)`` uint8,
    C-contiguous) with torch's antialiased bilinear uint8 kernel: PIL's bilinear filter at about
    five times its speed here (pixels within a few levels of PIL's, from fixed-point rounding
    and the crop's edge). Both are handed over as NCHW views of HWC memory (channels-last
    strides): the layout that kernel computes in, so it writes the result straight into ``out``
    (asked for a new tensor it returns planar NCHW, and the transposition back to HWC costs as
    much as the resampling)."""
    if not rgb.flags.writeable:  # PIL's arrays are read-only and torch takes writable memory;
        rgb = rgb.copy()  # copied before the transposition, so the copy stays channels-last
    # The NCHW views are made in numpy: one torch call per tensor instead of three.
    source = torch.from_numpy(rgb.transpose(2, 0, 1)[np.newaxis])
    target = torch.from_numpy(out.transpose(2, 0, 1)[np.newaxis])
    if _RESAMPLE_INTO is not None:
        try:
            _RESAMPLE_INTO(source, list(out.shape[:2]), False, None, None, out=target)
            return
        except (RuntimeError, TypeError):  # another torch's signature for this internal operator
            pass
    target.copy_(torch_functional.interpolate(source, size=out.shape[:2], mode="bilinear", antialias=True,
                                              align_corners=False))
