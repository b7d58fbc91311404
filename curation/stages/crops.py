"""Box crops cut in the decode pass (issue 37): each annotated box of an image becomes a model
input of its own, from the same decode as the whole image -- no second read of any file.

Boxes are given in the stored image's pixel frame (the file's own pixels, before any EXIF
rotation; ``fraction`` units scale by the stored size), placed exactly as the driver places
them (:func:`curation.annotations.place_boxes`, so both agree on which boxes are cut), moved
into the decoded (upright) frame, and cut as a square around the box's centre: the box's
longer side plus ``margin`` of it on each side (context), the part outside the image filled
with grey. The square is resampled to the model's input size like a whole image.

The decode scale becomes box-aware (:meth:`CropJob.decode_scale`): a JPEG is decoded at the
smallest DCT scale that keeps every box's square at least the model input's size (a 32-px box
in a 1920-px photo then decodes at full size, where a whole image alone would decode at 1/8).
The cost is that of the larger decode, only for images with small boxes; the memory is one
decoded image (bounded by ``decode.max_pixels``) plus ``k`` model inputs.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import numpy as np

from curation.annotations import place_boxes
from curation.stages.resize import model_input

PAD_GREY = 124  # the area of a square outside the image (near the datasets' mean grey)
BACKGROUND_TRIES = 12  # places drawn per background square before giving up (a crowded image has none)
BACKGROUND_OVERLAP = 0.25  # a background square may have at most this share of its area under a box


def stored_size(width: int, height: int, orientation: int) -> tuple[int, int]:
    """The file's own pixel size from the upright (decoded) size and its EXIF orientation."""
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def upright_boxes(boxes: np.ndarray, width: int, height: int, orientation: int) -> np.ndarray:
    """Pixel boxes ``(k, 4)`` ``[x, y, w, h]`` in the stored frame (``width`` x ``height``, the
    stored size) moved to the frame EXIF ``orientation`` displays (what the decoder returns)."""
    x, y, w, h = (boxes[:, i] for i in range(4))
    W, H = float(width), float(height)
    if orientation == 2:
        return np.stack([W - x - w, y, w, h], 1)
    if orientation == 3:
        return np.stack([W - x - w, H - y - h, w, h], 1)
    if orientation == 4:
        return np.stack([x, H - y - h, w, h], 1)
    if orientation == 5:
        return np.stack([y, x, h, w], 1)
    if orientation == 6:  # turned 90 degrees clockwise for display
        return np.stack([H - y - h, x, h, w], 1)
    if orientation == 7:
        return np.stack([H - y - h, W - x - w, h, w], 1)
    if orientation == 8:  # turned 90 degrees counter-clockwise
        return np.stack([y, W - x - w, h, w], 1)
    return boxes.copy()


@dataclass
class CropJob:
    """The boxes of one image and where their crops go.

    Args:
        boxes: ``(k, 4)`` as the annotations give them (``units``).
        units: ``pixels`` or ``fraction``.
        image_size: the model input's side.
        margin: context around the box, as a fraction of its longer side, on each side.
        tolerance_px, min_size_px: the placement rule's (``objects.*``).
        backgrounds: how many background squares to cut too (see :meth:`cut`).
        want: which boxes to cut (default all): the others still shape the decode scale and
            keep the background squares off them, so a night that cuts only a changed box
            cuts exactly what a whole decode would.
        out: ``(k + backgrounds, S, S, 3)`` uint8: each cut box at its own row, then the
            background squares.

    After :meth:`cut`, ``cut_mask`` marks the boxes whose crop is in ``out``,
    ``background_count`` says how many background squares follow them and ``orientation`` is
    the image's EXIF orientation (the driver places boxes in the stored frame).
    """

    boxes: np.ndarray
    units: str
    image_size: int
    margin: float
    tolerance_px: float
    min_size_px: float
    out: np.ndarray
    backgrounds: int = 0
    want: np.ndarray | None = None
    cut_mask: np.ndarray = field(init=False)
    background_count: int = field(default=0, init=False)
    orientation: int = field(default=1, init=False)  # the image's EXIF orientation, once cut

    def __post_init__(self):
        self.boxes = np.asarray(self.boxes, np.float64).reshape(-1, 4)
        self.cut_mask = np.zeros(len(self.boxes), bool)

    def placed(self, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """Pixel boxes on the stored ``width`` x ``height`` image, and which of them are cut."""
        if not len(self.boxes):
            return np.zeros((0, 4)), np.zeros(0, bool)
        boxes, problems = place_boxes(self.boxes, units=self.units, width=width, height=height,
                                      tolerance_px=self.tolerance_px, min_size_px=self.min_size_px)
        return boxes, problems.is_null().to_numpy(zero_copy_only=False)

    def square_sides(self, width: int, height: int) -> np.ndarray:
        boxes, ok = self.placed(width, height)
        return np.maximum(boxes[ok, 2], boxes[ok, 3]) * (1 + 2 * self.margin)

    def decode_scale(self, width: int, height: int) -> float:
        """The smallest fraction of the full (stored ``width`` x ``height``) size to decode at
        so every box's square is at least the model input (1: full size)."""
        sides = self.square_sides(width, height)
        if not len(sides):
            return 0.0
        return float(min(1.0, self.image_size / max(float(sides.min()), 1e-9)))

    def cut(self, pixels: np.ndarray, scale: float, orientation: int) -> None:
        """Cut every placeable box from ``pixels`` (the decoded, upright image at ``1/scale`` of
        its full size) into ``out``."""
        self.orientation = orientation
        full_w, full_h = round(pixels.shape[1] * scale), round(pixels.shape[0] * scale)
        width, height = stored_size(full_w, full_h, orientation)
        boxes, ok = self.placed(width, height)
        if not ok.any():
            return
        up = upright_boxes(boxes, width, height, orientation) / scale
        wanted = ok if self.want is None else ok & np.asarray(self.want, bool)
        for i in np.flatnonzero(wanted):
            x, y, w, h = up[i]
            side = max(w, h) * (1 + 2 * self.margin)
            self._cut_square(pixels, x + w / 2 - side / 2, y + h / 2 - side / 2, side, self.out[i])
            self.cut_mask[i] = True
        if self.backgrounds:
            self._cut_backgrounds(pixels, up[ok])

    def _cut_square(self, pixels: np.ndarray, left: float, top: float, side: float, out: np.ndarray) -> None:
        side_px = max(1, int(math.ceil(side)))
        left, top = int(math.floor(left)), int(math.floor(top))
        h_img, w_img = pixels.shape[:2]
        square = np.full((side_px, side_px, 3), PAD_GREY, np.uint8)
        x0, y0 = max(left, 0), max(top, 0)
        x1, y1 = min(left + side_px, w_img), min(top + side_px, h_img)
        if x1 > x0 and y1 > y0:
            square[y0 - top:y1 - top, x0 - left:x1 - left] = pixels[y0:y1, x0:x1]
        model_input(square, self.image_size, out=out)

    def _cut_backgrounds(self, pixels: np.ndarray, boxes: np.ndarray) -> None:
        """Squares of the image where no box is (at most a quarter of a square under any box),
        as large as its boxes' squares, at places drawn from a generator seeded by the boxes
        (the same image and boxes give the same squares every night): what this image's
        background looks like to the embedder, the evidence against a box drawn on it."""
        h_img, w_img = pixels.shape[:2]
        sides = np.minimum(np.maximum(boxes[:, 2], boxes[:, 3]) * (1 + 2 * self.margin), min(h_img, w_img))
        rng = np.random.default_rng(zlib.crc32(np.ascontiguousarray(boxes).tobytes()))
        first = len(self.boxes)
        for attempt in range(BACKGROUND_TRIES * self.backgrounds):
            if self.background_count == self.backgrounds:
                break
            side = float(sides[attempt % len(sides)])
            left, top = rng.uniform(0, w_img - side), rng.uniform(0, h_img - side)
            ix = np.clip(np.minimum(left + side, boxes[:, 0] + boxes[:, 2]) - np.maximum(left, boxes[:, 0]), 0, None)
            iy = np.clip(np.minimum(top + side, boxes[:, 1] + boxes[:, 3]) - np.maximum(top, boxes[:, 1]), 0, None)
            if (ix * iy).max() > BACKGROUND_OVERLAP * side * side:
                continue
            self._cut_square(pixels, left, top, side, self.out[first + self.background_count])
            self.background_count += 1
