"""The decode stage against the bare codec, in one process (the unit a decode task gets: 1 CPU).

Measures, on generated JPEGs at 640x480 and 1600x1200 (noisy photos, quality 90):
- PIL's bare decode with ``draft()`` to 224 (what ``../shared/tools/decode-ratio`` compares
  against) and the decode stage (read, both hashes, statistics, copy descriptor, model input),
  as images/s and their ratio, over several rounds (the box's speed wanders: median and range);
- the same stage with the statistics thumbnail made as before issue 14 (PIL's grey bilinear
  resize), side by side: what keeping stored statistics bit-identical would cost;
- where a 640x480 image's time goes, in context (each step timed inside the stage);
- how far the statistics, dHash and copy descriptor of one image move between the two
  thumbnails (what a stored row and a new row of the same image can disagree by), on CIFAR-10
  photos upscaled to 640x480 when ``../shared/data`` has them, else on the generated JPEGs.

Usage: ``.venv/bin/python benchmarks/decode.py [--rounds 5] [--out benchmarks/results/decode.json]``
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import statistics
import sys
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import curation.stages.decode as decode  # noqa: E402
from curation.io.filesystem import Resolver  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def photos(folder: str, width: int, height: int, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        base = Image.fromarray((rng.random((height // 8, width // 8, 3)) * 255).astype(np.uint8))
        pixels = np.asarray(base.resize((width, height), Image.BICUBIC)).astype(np.int16)
        pixels += rng.integers(-20, 20, pixels.shape).astype(np.int16)
        path = os.path.join(folder, f"{width}_{i:04d}.jpg")
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def pil_grey_thumbnail(rgb: np.ndarray) -> Image.Image:
    """The statistics thumbnail as it was made before issue 14: grey first, PIL's bilinear."""
    grey = Image.fromarray(rgb, "RGB").convert("L")
    w, h = grey.size
    if max(w, h) <= decode.STATS_MAX_SIDE:
        return grey
    scale = decode.STATS_MAX_SIDE / max(w, h)
    return grey.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR, reducing_gap=2.0)


def bare_seconds(paths: list[str]) -> float:
    start = time.perf_counter()
    for path in paths:
        image = Image.open(path)
        image.draft("RGB", (224, 224))
        image.convert("RGB").load()
    return time.perf_counter() - start


def stage_seconds(stage: decode.DecodeStage, batch: dict) -> float:
    start = time.perf_counter()
    stage(batch)
    return time.perf_counter() - start


def ratios(paths: list[str], rounds: int) -> dict:
    """Per round and per thumbnail: best of 3 stage runs against best of 3 bare decodes, the
    two thumbnails alternating so both see the same machine."""
    stage = decode.DecodeStage(resolver=Resolver(), image_size=224, max_pixels=100_000_000)
    batch = {"uri": np.array(paths, dtype=object), "input_id": np.arange(len(paths))}
    current = decode.grey_thumbnail
    out = {"current": [], "pil_grey_thumbnail": []}
    rates = {"bare": [], "current": [], "pil_grey_thumbnail": []}
    try:
        stage(batch)
        for _ in range(rounds):
            for name, thumbnail in (("current", current), ("pil_grey_thumbnail", pil_grey_thumbnail)):
                decode.grey_thumbnail = thumbnail
                seconds = min(stage_seconds(stage, batch) for _ in range(3))
                bare = min(bare_seconds(paths) for _ in range(3))
                out[name].append(bare / seconds)
                rates[name].append(len(paths) / seconds)
                rates["bare"].append(len(paths) / bare)
    finally:
        decode.grey_thumbnail = current
    summary = {}
    for name, values in out.items():
        summary[name] = {"ratio_median": round(statistics.median(values), 3), "ratio_min": round(min(values), 3),
                         "ratio_max": round(max(values), 3),
                         "img_per_s_median": round(statistics.median(rates[name]), 1)}
    summary["bare_img_per_s_median"] = round(statistics.median(rates["bare"]), 1)
    return summary


def breakdown(paths: list[str]) -> dict:
    """Milliseconds per image of each step, timed inside the stage (wrappers add ~1 us each)."""
    spent = collections.Counter()
    originals = {}

    def timed(name):
        function = getattr(decode, name)
        originals[name] = function

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start
        setattr(decode, name, wrapper)

    steps = ["_decode_jpeg_fast", "_plain_jpeg_size", "pixel_digest", "grey_thumbnail", "_laplacian_variance",
             "copy_grid", "model_input", "_digest"]
    for name in steps:
        timed(name)
    methods = {}
    for name in ("add", "finish"):
        method = getattr(decode.ThumbnailFeatures, name)
        methods[name] = method

        def wrapper(self, *args, _method=method, _name=name, **kwargs):
            start = time.perf_counter()
            try:
                return _method(self, *args, **kwargs)
            finally:
                spent["features." + _name] += time.perf_counter() - start
        setattr(decode.ThumbnailFeatures, name, wrapper)
    stage = decode.DecodeStage(resolver=Resolver(), image_size=224, max_pixels=100_000_000)
    read = stage._read

    def timed_read(uri):
        start = time.perf_counter()
        try:
            return read(uri)
        finally:
            spent["read"] += time.perf_counter() - start
    stage._read = timed_read
    batch = {"uri": np.array(paths, dtype=object), "input_id": np.arange(len(paths))}
    try:
        stage(batch)
        spent.clear()
        rounds = 5
        start = time.perf_counter()
        for _ in range(rounds):
            stage(batch)
        total = time.perf_counter() - start
    finally:
        for name, function in originals.items():
            setattr(decode, name, function)
        for name, method in methods.items():
            setattr(decode.ThumbnailFeatures, name, method)
    images = rounds * len(paths)
    names = {"_decode_jpeg_fast": "JPEG decode (simplejpeg, DCT-scaled)", "_plain_jpeg_size": "JPEG header + EXIF",
             "pixel_digest": "pixel SHA-1", "_digest": "file SHA-1", "grey_thumbnail": "grey thumbnail",
             "features.add": "thumbnail features (per image, in all)", "_laplacian_variance": "  of which Laplacian",
             "copy_grid": "  of which copy grid (trim, resizes, blur)",
             "features.finish": "statistics + copy vectors (per batch)", "model_input": "model input", "read": "read"}
    result = {names[k]: round(v / images * 1e3, 3) for k, v in spent.most_common()}
    nested = sum(v for k, v in result.items() if k.startswith("  "))
    result["everything else"] = round(total / images * 1e3 - sum(result.values()) + nested, 3)
    result["stage in all"] = round(total / images * 1e3, 3)
    return result


def drift_sample(n: int, folder: str) -> tuple[str, list[bytes]]:
    archive = os.path.join(ROOT, "..", "shared", "data", "cifar10", "test.tar.gz")
    if os.path.exists(archive):
        items = []
        with tarfile.open(archive) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".jpg"):
                    small = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                    buffer = io.BytesIO()
                    small.resize((640, 480), Image.BICUBIC).save(buffer, "JPEG", quality=90)
                    items.append(buffer.getvalue())
                    if len(items) >= n:
                        break
        return f"{len(items)} CIFAR-10 test photos upscaled to 640x480 (bicubic, JPEG q90)", items
    paths = photos(folder, 640, 480, n, seed=7)
    return f"{n} generated 640x480 JPEGs (../shared/data absent)", [open(p, "rb").read() for p in paths]


def drift(items: list[bytes], blurry: float) -> dict:
    """Current thumbnail vs PIL's grey one, on the same decoded pixels."""
    current = decode.grey_thumbnail
    try:
        new = [decode.decode_image(x, image_size=224, max_pixels=10**9) for x in items]
        decode.grey_thumbnail = pil_grey_thumbnail
        old = [decode.decode_image(x, image_size=224, max_pixels=10**9) for x in items]
    finally:
        decode.grey_thumbnail = current

    def values(rows, key):
        return np.array([getattr(r, key) for r in rows], np.float64)
    sharp_old, sharp_new = values(old, "sharpness"), values(new, "sharpness")
    relative = np.abs(sharp_new - sharp_old) / np.maximum(sharp_old, 1e-12)
    bits = np.array([bin((a.phash ^ b.phash) & (2**64 - 1)).count("1") for a, b in zip(old, new)])
    cosine = np.array([float(a.copy_vector @ b.copy_vector) for a, b in zip(old, new)])
    return {
        "brightness_max_abs": float(np.abs(values(old, "brightness") - values(new, "brightness")).max()),
        "contrast_max_abs": float(np.abs(values(old, "contrast") - values(new, "contrast")).max()),
        "shadows_highlights_max_abs": float(max(np.abs(values(old, k) - values(new, k)).max()
                                                for k in ("shadows", "highlights"))),
        "sharpness_rel_median": round(float(np.median(relative)), 4),
        "sharpness_rel_max": round(float(relative.max()), 4),
        "blurry_flag_changes": int(((sharp_old < blurry) != (sharp_new < blurry)).sum()),
        "dhash_bits_mean": round(float(bits.mean()), 3), "dhash_bits_max": int(bits.max()),
        "copy_cosine_mean": round(float(cosine.mean()), 5), "copy_cosine_min": round(float(cosine.min()), 4),
        "pixel_hash_equal": int(sum(a.pixel_hash == b.pixel_hash for a, b in zip(old, new))),
        "model_input_equal": int(sum(np.array_equal(a.pixels, b.pixels) for a, b in zip(old, new))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--drift-images", type=int, default=300)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "decode.json"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # as in a decode task (the stage sets it per batch too)
    from curation.config import ScoresConfig

    folder = tempfile.mkdtemp(prefix="decode-bench-")
    small, large = photos(folder, 640, 480, 160), photos(folder, 1600, 1200, 40)
    report = {"machine": f"{os.cpu_count()} CPUs", "rounds": args.rounds,
              "640x480": ratios(small, args.rounds), "1600x1200": ratios(large, args.rounds),
              "breakdown_640x480_ms": breakdown(small)}
    described, items = drift_sample(args.drift_images, folder)
    report["drift"] = {"sample": described, **drift(items, ScoresConfig().blurry_sharpness)}

    print(f"{'size':<11} {'thumbnail':<20} {'stage img/s':>11} {'ratio median':>12} {'range':>12}")
    for size in ("640x480", "1600x1200"):
        for name in ("current", "pil_grey_thumbnail"):
            row = report[size][name]
            print(f"{size:<11} {name:<20} {row['img_per_s_median']:>11} {row['ratio_median']:>12} "
                  f"{row['ratio_min']:>5}-{row['ratio_max']:<6}")
        print(f"{size:<11} {'(bare draft decode)':<20} {report[size]['bare_img_per_s_median']:>11}")
    print("\nper 640x480 image, ms (in context):")
    for name, ms in report["breakdown_640x480_ms"].items():
        print(f"  {name:<38} {ms:>6}")
    print(f"\nstored vs new features of one image ({described}):")
    for key, value in report["drift"].items():
        if key != "sample":
            print(f"  {key:<28} {value}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
