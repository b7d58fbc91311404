"""JPEG decoding and the model input and working thumbnail as torch ops, on whichever device
holds the batch (``decode.path: torch``, or ``auto`` on a GPU node).

On a GPU node the CPU decode tasks only read the files (:class:`~curation.stages.decode.DecodeStage`
with ``defer_jpegs``): a plain JPEG (:func:`torch_decodable`) travels to the embedding actor as
its bytes, where :class:`TorchDecoder` decodes the whole batch at once
(``torchvision.io.decode_jpeg``: nvJPEG on a GPU, libjpeg-turbo on CPU) and resamples on the
device. Everything else (PNG, CMYK, EXIF-rotated, truncated: no end-of-image marker) is decoded
by those CPU tasks as before, and a JPEG the decoder still refuses is decoded by the CPU path
in the actor, so its ``rejected`` reason is the CPU path's own.

Same answers on either path:

* ``pixel_hash`` of a JPEG is the digest of its coded image (:func:`jpeg_image_digest`: every
  segment but the APPn metadata and comments), not of decoded pixels: two decoders never agree
  to the last bit, and this is the same on every node (the same picture with other metadata
  still matches; a lossless re-encode with other Huffman tables no longer does);
* the full-size decode is first brought to the size and look of the CPU path's DCT-scaled
  decode (:func:`as_cpu_decodes`), and the model input and the working thumbnail are made from
  it as the CPU path makes them; the statistics, the dHash and the copy descriptor then come
  from that thumbnail through the very same :class:`~curation.stages.decode.ThumbnailFeatures`
  code. ``benchmarks/decode_agreement.py`` measures what is left between the paths, on
  640x480 and 1600x1200 photos (benchmarks/README.md, "Decoding on the device").
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as torch_functional

from curation.stages.decode import (STATS_MAX_SIDE, ThumbnailFeatures, _plain_jpeg_size, draft_request,
                                     jpeg_image_digest)

def torch_decodable(data: bytes, max_pixels: int) -> bool:
    """A file the torch path decodes: a JPEG libjpeg-turbo decodes to RGB as it stands (YCbCr,
    RGB or grey; not CMYK), upright (no EXIF rotation to apply), complete (it ends with the
    end-of-image marker: a truncated file takes the CPU path and gets its reason there) and
    within ``decode.max_pixels``."""
    size = _plain_jpeg_size(data)
    if size is None or size[0] * size[1] > max_pixels or size[0] <= 0 or size[1] <= 0:
        return False
    return data.rstrip(b"\x00\r\n ")[-2:] == b"\xff\xd9"


def resample(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(3, H, W)`` uint8 -> ``(3, height, width)`` uint8: bilinear, antialiased when shrinking
    (the filter the CPU path's resampling uses), in float32 on the image's device."""
    x = image.unsqueeze(0).float()
    shrink = height < image.shape[1] or width < image.shape[2]
    x = torch_functional.interpolate(x, size=(height, width), mode="bilinear", antialias=shrink, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)[0]


def decode_scale(width: int, height: int, image_size: int) -> int:
    """``M`` of the ``M/8`` scale the CPU path's libjpeg-turbo decodes this JPEG at: the
    smallest whose size still serves every consumer (:func:`~curation.stages.decode.draft_request`)."""
    min_width, min_height = draft_request(width, height, image_size)
    for m in range(1, 8):
        if -(-width * m // 8) >= min_width and -(-height * m // 8) >= min_height:
            return m
    return 8


def as_cpu_decodes(image: torch.Tensor, image_size: int) -> torch.Tensor:
    """A full-size decode brought to the size and look of the CPU path's DCT-scaled decode
    (whose pixels the statistics, the thumbnail and the model input all come from): averaged
    over ``8/M`` pixel squares for the scales 1/2, 1/4, 1/8 (what DCT scaling approximates),
    resampled to the same size for the other ones. Without it the Laplacian-based sharpness
    moves ~13% between the paths; with it, under 2% (benchmarks/README.md)."""
    h, w = image.shape[1:]
    m = decode_scale(w, h, image_size)
    if m == 8:
        return image
    if 8 % m == 0:
        x = torch_functional.avg_pool2d(image.unsqueeze(0).float(), 8 // m, ceil_mode=True, count_include_pad=False)
        return x.round_().clamp_(0, 255).to(torch.uint8)[0]
    return resample(image, -(-h * m // 8), -(-w * m // 8))


def model_input(image: torch.Tensor, size: int) -> torch.Tensor:
    """The centred square resampled to ``size`` x ``size`` (as :func:`curation.stages.decode.model_input`)."""
    h, w = image.shape[1:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[:, top:top + side, left:left + side]
    return square if side == size else resample(square, size, size)


def grey_thumbnail(image: torch.Tensor) -> torch.Tensor:
    """``(h, w)`` uint8: the image with its longer side at most ``STATS_MAX_SIDE`` (never
    upscaled), made grey by PIL's integer ITU-R 601-2 luma (as the CPU path's thumbnail)."""
    h, w = image.shape[1:]
    if max(h, w) > STATS_MAX_SIDE:
        scale = STATS_MAX_SIDE / max(h, w)
        image = resample(image, max(1, round(h * scale)), max(1, round(w * scale)))
    rgb = image.to(torch.int32)
    return ((rgb[0] * 19595 + rgb[1] * 38470 + rgb[2] * 7471 + 0x8000) >> 16).to(torch.uint8)


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

        tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in files]
        if not tensors:
            return []
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

    def __call__(self, files: list[bytes]) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        """``(pixels (N, S, S, 3) uint8, features, decoded)``: the model inputs, the columns
        :class:`~curation.stages.decode.DecodeStage` writes for an ok row (``width``,
        ``height``, ``brightness`` ... ``copy_vector``; ``pixel_hash`` from the coded image),
        and which files were decoded (the rest are left to the CPU path)."""
        from PIL import Image

        n = len(files)
        size = self.image_size
        pixels = torch.zeros((n, 3, size, size), dtype=torch.uint8, device=self.device)
        images = self.decode(files)
        decoded = np.array([image is not None for image in images], bool)
        features = ThumbnailFeatures(n)
        width, height = np.zeros(n, np.int32), np.zeros(n, np.int32)
        for i, image in enumerate(images):
            if image is None:
                continue
            height[i], width[i] = image.shape[1:]
            image = as_cpu_decodes(image, size)
            pixels[i] = model_input(image, size)
            features.add(i, Image.fromarray(grey_thumbnail(image).cpu().numpy(), "L"))
        values = features.finish(decoded) if decoded.any() else {}
        out: dict[str, np.ndarray] = {"width": width, "height": height,
                                      "pixel_hash": np.array([jpeg_image_digest(f) or "" for f in files], object)}
        for key, column in values.items():
            full = np.zeros((n, *column.shape[1:]), column.dtype)
            full[decoded] = column
            out[key] = full
        return pixels.permute(0, 2, 3, 1).cpu().numpy(), out, decoded
