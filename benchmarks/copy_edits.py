"""The edits copies of an image go through in the wild, for the copy-detection benchmark.

Each function takes an RGB ``PIL.Image`` and a numpy ``Generator`` and returns the edited
image plus the JPEG quality to save it with. The first four kinds are the ones the issue
names (re-encode q40-70, resize, brightness x0.8-1.25, crop 1-6% per side); the rest follow
the transformations copy-detection benchmarks such as DISC21 apply (borders, letterboxing,
mirroring, greyscale, small rotations, stamps and watermarks, aspect changes, heavy
down-scaling).
"""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageEnhance, ImageOps


def reencoded(img, rng):
    return img, int(rng.integers(40, 71))


def resized(img, rng):
    scale = float(rng.choice([0.75, 1.5, 2.0]))
    w, h = img.size
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC), 90


def brightness(img, rng):
    factor = float(rng.uniform(0.8, 0.95) if rng.random() < 0.5 else rng.uniform(1.05, 1.25))
    return ImageEnhance.Brightness(img).enhance(factor), 90


def cropped(img, rng):
    w, h = img.size
    left, top, right, bottom = (max(1, round(s * rng.uniform(0.01, 0.06))) for s in (w, h, w, h))
    return img.crop((left, top, w - right, h - bottom)), 90


def bordered(img, rng):
    w, h = img.size
    pad = max(2, round(min(w, h) * rng.uniform(0.06, 0.15)))
    colour = (0, 0, 0) if rng.random() < 0.5 else (255, 255, 255)
    return ImageOps.expand(img, border=pad, fill=colour), 90


def letterboxed(img, rng):
    w, h = img.size
    canvas = Image.new("RGB", (round(h * 16 / 9), h), (0, 0, 0))
    canvas.paste(img, ((canvas.size[0] - w) // 2, 0))
    return canvas, 90


def mirrored(img, rng):
    return ImageOps.mirror(img), 90


def greyscale(img, rng):
    return ImageOps.grayscale(img).convert("RGB"), 90


def rotated(img, rng):
    angle = float(rng.uniform(3, 8)) * (1 if rng.random() < 0.5 else -1)
    return img.rotate(angle, resample=Image.BILINEAR, fillcolor=(0, 0, 0)), 90


def stamped(img, rng):
    """A solid logo box in a corner (about 6% of the area) or a translucent text watermark."""
    w, h = img.size
    out = img.copy()
    if rng.random() < 0.5:
        bw, bh = max(2, round(w * 0.25)), max(2, round(h * 0.25))
        x = 0 if rng.random() < 0.5 else w - bw
        y = 0 if rng.random() < 0.5 else h - bh
        ImageDraw.Draw(out).rectangle((x, y, x + bw - 1, y + bh - 1), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        return out, 90
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for row in range(0, h, max(4, h // 4)):
        draw.text((1, row), "(c) stock", fill=(255, 255, 255, 110))
    return Image.alpha_composite(out.convert("RGBA"), layer).convert("RGB"), 90


def aspect(img, rng):
    w, h = img.size
    stretch = float(rng.uniform(1.2, 1.5))
    size = (round(w * stretch), h) if rng.random() < 0.5 else (w, round(h * stretch))
    return img.resize(size, Image.BICUBIC), 90


def downscaled(img, rng):
    w, h = img.size
    scale = float(rng.uniform(0.3, 0.45))
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS), 90


# The four kinds first, then the edits found in the wild.
EDITS = {
    "reencoded": reencoded, "resized": resized, "brightness": brightness, "cropped": cropped,
    "bordered": bordered, "letterboxed": letterboxed, "mirrored": mirrored, "greyscale": greyscale,
    "rotated": rotated, "stamped": stamped, "aspect": aspect, "downscaled": downscaled,
}
CORE_KINDS = ("reencoded", "resized", "brightness", "cropped")
