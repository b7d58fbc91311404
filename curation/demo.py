"""``curation demo``: a labelled demo set with planted, recorded defects, curated offline.

Six visual classes of synthetic scenes (each a colour palette and a kind of shape over a
gradient and fine texture), written as JPEG files under ``<out>/data/images/<class>/`` with
``<out>/data/labels.csv``, plus planted defects recorded in ``<out>/data/truth.json``:
exact duplicates (byte copies), near duplicates (re-encoded, resized, brightness-shifted,
cropped), dark, bright (over-exposed and washed-out), blurry, flipped labels, corrupt files
(truncated, empty, HTML saved as .jpg), labels rows whose file is missing, and
out-of-distribution images. The job then runs on it with the weight-free ``thumbnail``
embedder (no network) and the demo prints what it found against what was planted.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter
import pyarrow.parquet as pq

from curation.schema import STATUS_REJECTED
from curation.scores import declared_flags
from curation.scores.label_quality import SUSPECTED
from curation.config import load_config
from curation.job import run_job

log = logging.getLogger(__name__)

CLASSES = {
    # name: (palette of RGB colours, shape kind)
    "tomato": ([(200, 40, 30), (240, 90, 60), (150, 20, 20), (250, 160, 120)], "circle"),
    "leaf": ([(40, 140, 50), (90, 190, 70), (20, 90, 30), (160, 210, 110)], "triangle"),
    "sky": ([(40, 90, 200), (100, 160, 240), (20, 50, 140), (170, 210, 250)], "stripes"),
    "sand": ([(220, 180, 80), (240, 210, 130), (180, 130, 50), (250, 230, 170)], "rect"),
    "grape": ([(120, 50, 160), (170, 100, 210), (80, 30, 110), (210, 160, 230)], "ring"),
    "slate": ([(70, 110, 120), (120, 160, 170), (40, 70, 80), (170, 200, 200)], "lines"),
}
SIZE = 96
NEAR_KINDS = ("reencoded", "resized", "brightness", "cropped")


def _jitter(color, rng, amount=25):
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in color)


def render_scene(cls: str, rng: np.random.Generator, size: int = SIZE) -> Image.Image:
    """One image of class ``cls``: a softly graded background in one palette colour, 4-8
    shapes of the class's kind in the other palette colours, and fine sensor-like noise."""
    palette, shape = CLASSES[cls]
    bg_index = int(rng.integers(2))
    base = np.array(_jitter(palette[bg_index], rng), np.float32)
    ramp = np.linspace(-18, 18, size, dtype=np.float32)
    ramp = ramp[:, None] if rng.random() < 0.5 else ramp[None, :]
    bg = base[None, None, :] + np.broadcast_to(ramp, (size, size))[..., None]
    image = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    others = [c for j, c in enumerate(palette) if j != bg_index]
    for _ in range(rng.integers(4, 9)):
        color = _jitter(others[rng.integers(len(others))], rng, 30)
        x, y = (int(v) for v in rng.integers(0, size, 2))
        r = int(rng.integers(size // 10, size // 3))
        if shape == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=color)
        elif shape == "triangle":
            pts = [(int(x + r * np.cos(th)), int(y + r * np.sin(th))) for th in rng.uniform(0, 2 * np.pi, 3)]
            draw.polygon(pts, fill=color)
        elif shape == "stripes":
            draw.rectangle([0, y, size, y + r // 3 + 3], fill=color)
        elif shape == "rect":
            draw.rectangle([x - r, y - r // 2, x + r, y + r // 2], fill=color)
        elif shape == "ring":
            draw.ellipse([x - r, y - r, x + r, y + r], outline=color, width=max(3, r // 4))
        else:
            draw.line([(x, y), (int(rng.integers(size)), int(rng.integers(size)))], fill=color, width=5)
    arr = np.asarray(image, dtype=np.float32) + rng.normal(0, 8, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def render_ood(rng: np.random.Generator, size: int = SIZE) -> Image.Image:
    """An out-of-distribution image: a saturated multi-colour checkerboard with noise."""
    cells = int(rng.integers(3, 9))
    grid = rng.integers(0, 256, (cells, cells, 3)).astype(np.uint8)
    image = Image.fromarray(grid, "RGB").resize((size, size), Image.NEAREST)
    arr = np.asarray(image, dtype=np.float32) + rng.normal(0, 30, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _jpeg(image: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_demo_dataset(root: str, *, n: int = 2400, seed: int = 0, defect_scale: float = 1.0) -> dict:
    """Write the demo set under ``root`` (``images/``, ``labels.csv``, ``truth.json``).

    Args:
        root: local folder (created; an existing ``images/`` is replaced).
        n: clean images, spread evenly over the classes.
        seed: random seed; the same seed gives the same files.
        defect_scale: multiplies every planted-defect count (the test suite uses smaller sets).

    Returns:
        The truth record: for each defect kind, the planted items (paths relative to images/).
    """
    rng = np.random.default_rng(seed)
    images = os.path.join(root, "images")
    shutil.rmtree(images, ignore_errors=True)
    names = list(CLASSES)
    for name in names:
        os.makedirs(os.path.join(images, name), exist_ok=True)
    labels: dict[str, str] = {}
    originals: list[str] = []

    def put(rel: str, data: bytes, label: str | None) -> str:
        with open(os.path.join(images, rel), "wb") as fh:
            fh.write(data)
        if label is not None:
            labels[rel] = label
        return rel

    for i in range(n):
        cls = names[i % len(names)]
        originals.append(put(f"{cls}/{i:05d}.jpg", _jpeg(render_scene(cls, rng)), cls))

    def count(base: int) -> int:
        return max(1, int(round(base * defect_scale)))

    order = rng.permutation(len(originals))
    pool = [originals[j] for j in order]  # originals used as sources, each for one defect at most
    take = lambda k: [pool.pop() for _ in range(k)]  # noqa: E731
    truth: dict = {"classes": names, "clean_images": n}

    exact = []
    for src in take(count(40)):
        cls = labels[src]
        rel = put(f"{cls}/copy_{os.path.basename(src)}", open(os.path.join(images, src), "rb").read(), cls)
        exact.append({"item": rel, "of": src})
    truth["exact_duplicate"] = exact

    near = []
    for j, src in enumerate(take(count(40))):
        cls = labels[src]
        kind = NEAR_KINDS[j % len(NEAR_KINDS)]
        img = Image.open(os.path.join(images, src)).convert("RGB")
        if kind == "reencoded":
            data = _jpeg(img, quality=55)
        elif kind == "resized":
            data = _jpeg(img.resize((SIZE * 3 // 4, SIZE * 3 // 4), Image.BICUBIC))
        elif kind == "brightness":
            data = _jpeg(ImageEnhance.Brightness(img).enhance(1.15))
        else:
            m = max(1, SIZE * 3 // 100)  # 'slightly cropped': 3% off each side, resized back
            data = _jpeg(img.crop((m, m, SIZE - m, SIZE - m)).resize((SIZE, SIZE), Image.BICUBIC))
        rel = put(f"{cls}/near_{kind}_{os.path.basename(src)}", data, cls)
        near.append({"item": rel, "of": src, "kind": kind})
    truth["near_duplicate"] = near

    def fresh(prefix: str, k: int, transform) -> list[str]:
        out = []
        for j in range(k):
            cls = names[j % len(names)]
            out.append(put(f"{cls}/{prefix}_{j:03d}.jpg", _jpeg(transform(render_scene(cls, rng))), cls))
        return out

    truth["dark"] = fresh("dark", count(30), lambda im: ImageEnhance.Brightness(im).enhance(0.12))
    truth["bright"] = fresh("overexposed", count(15), lambda im: Image.blend(im, Image.new("RGB", im.size, "white"), 0.85)) \
        + fresh("washedout", count(15), lambda im: Image.blend(
            ImageEnhance.Contrast(im).enhance(0.25), Image.new("RGB", im.size, "white"), 0.55))
    truth["blurry"] = fresh("blurry", count(30), lambda im: im.filter(ImageFilter.GaussianBlur(4)))

    ood = []
    for j in range(count(20)):
        cls = names[j % len(names)]
        ood.append(put(f"{cls}/odd_{j:03d}.jpg", _jpeg(render_ood(rng)), cls))
    truth["out_of_distribution"] = ood

    corrupt = []
    for j, src in enumerate(take(count(2))):
        data = open(os.path.join(images, src), "rb").read()
        corrupt.append(put(f"{labels[src]}/truncated_{j}.jpg", data[: len(data) // 2], labels[src]))
    for j in range(count(2)):
        corrupt.append(put(f"{names[j]}/empty_{j}.jpg", b"", names[j]))
    for j in range(count(2)):
        corrupt.append(put(f"{names[j]}/page_{j}.jpg", b"<!DOCTYPE html><html><body>404</body></html>", names[j]))
    truth["corrupt"] = corrupt
    missing = [f"{names[j]}/missing_{j}.jpg" for j in range(count(2))]
    for rel in missing:
        labels[rel] = rel.split("/")[0]
    truth["missing"] = missing

    flipped = []
    for src in take(count(120)):
        true = labels[src]
        wrong = names[(names.index(true) + 1 + int(rng.integers(len(names) - 1))) % len(names)]
        labels[src] = wrong
        flipped.append({"item": src, "true": true, "given": wrong})
    truth["flipped_label"] = flipped

    with open(os.path.join(root, "labels.csv"), "w", encoding="utf-8") as fh:
        fh.write("path,label\n")
        for rel in sorted(labels):
            fh.write(f"{rel},{labels[rel]}\n")
    truth["inputs"] = sum(len(files) for _, _, files in os.walk(images)) + len(missing)
    with open(os.path.join(root, "truth.json"), "w", encoding="utf-8") as fh:
        json.dump(truth, fh, indent=1)
    return truth


def demo_config(data_root: str, output_uri: str, *, budget: int = 600) -> dict:
    """The demo's job config (a plain mapping for :func:`curation.config.load_config`)."""
    return {
        "input": {"images": os.path.join(data_root, "images"), "labels": os.path.join(data_root, "labels.csv")},
        "embedder": {"model": "thumbnail", "weights": "none", "image_size": 64, "batch_size": 128},
        "selections": [
            {"name": "train", "mode": "representative", "budget": budget, "class_balance": "uniform"},
            {"name": "edge_cases", "mode": "edge_cases", "budget": 40},
            {"name": "label_review", "mode": "label_review", "budget": 200},
            {"name": "clean", "mode": "clean"},
        ],
        "output": {"uri": output_uri},
    }


def evaluate(truth: dict, samples, selections: dict, images_uri: str) -> list[dict]:
    """Planted vs found for each defect kind. ``samples`` is a pandas DataFrame."""
    def uri(rel: str) -> str:
        return images_uri.rstrip("/") + "/" + rel

    by_uri = samples.set_index("uri")

    def same_group(a: str, b: str) -> bool:
        ga, gb = by_uri.at[uri(a), "dup_group"], by_uri.at[uri(b), "dup_group"]
        return ga == ga and ga == gb  # ga == ga: not NaN

    rows = []

    def row(kind, planted, found, flagged=None, planted_set=None, flagged_set=None):
        entry = {"defect": kind, "planted": planted, "found": found,
                 "recall": round(found / planted, 3) if planted else None}
        if flagged_set is not None:
            true_pos = len(flagged_set & planted_set)
            entry["flagged"] = len(flagged_set)
            entry["precision"] = round(true_pos / len(flagged_set), 3) if flagged_set else None
        rows.append(entry)

    for kind in ("exact_duplicate", "near_duplicate"):
        found = sum(same_group(p["item"], p["of"]) for p in truth[kind])
        row(kind.replace("_", " "), len(truth[kind]), found)
    planted_dups = {uri(p["item"]) for k in ("exact_duplicate", "near_duplicate") for p in truth[k]} | {
        uri(p["of"]) for k in ("exact_duplicate", "near_duplicate") for p in truth[k]}
    flagged_dups = set(samples.loc[samples["dup_of"].notna(), "uri"])
    rows[-1]["flagged"] = len(flagged_dups)
    rows[-1]["precision"] = round(len(flagged_dups & planted_dups) / len(flagged_dups), 3) if flagged_dups else None
    for declared in declared_flags("junk"):  # each junk flag the demo planted defects for
        if declared.key not in truth or declared.column not in samples.columns:
            continue
        planted = {uri(p) for p in truth[declared.key]}
        flagged = set(samples.loc[samples[declared.column].fillna(False).astype(bool), "uri"])
        row(declared.key, len(planted), len(planted & flagged), planted_set=planted, flagged_set=flagged)
    planted = {uri(p["item"]) for p in truth["flipped_label"]}
    flagged = set(samples.loc[samples[SUSPECTED.column].fillna(False).astype(bool), "uri"])
    row("flipped label", len(planted), len(planted & flagged), planted_set=planted, flagged_set=flagged)
    review = selections.get("label_review")
    if review is not None:
        in_review = set(review["uri"])
        rows.append({"defect": "flipped label in label_review", "planted": len(planted),
                     "found": len(planted & in_review), "recall": round(len(planted & in_review) / len(planted), 3),
                     "flagged": len(in_review),
                     "precision": round(len(planted & in_review) / len(in_review), 3) if in_review else None})
    planted = {uri(p) for p in truth["out_of_distribution"]}
    edge = selections.get("edge_cases")
    flagged = set(edge["uri"]) if edge is not None else set()
    row("out of distribution (in edge_cases)", len(planted), len(planted & flagged), planted_set=planted, flagged_set=flagged)
    for kind in ("corrupt", "missing"):
        planted = {uri(p) for p in truth[kind]}
        rejected = set(samples.loc[samples["status"] == STATUS_REJECTED, "uri"])
        row(f"{kind} (rejected)", len(planted), len(planted & rejected))
    return rows


def format_table(rows: list[dict], columns: list[str]) -> str:
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def run_demo(*, out: str = "./demo-output", n: int = 2400) -> int:
    """Generate, curate, and print planted-vs-found. Returns the process exit status."""
    out = os.path.abspath(out)
    data_root = os.path.join(out, "data")
    os.makedirs(data_root, exist_ok=True)
    log.info("generating the demo data set under %s", data_root)
    truth = make_demo_dataset(data_root, n=n)
    config = load_config(data=demo_config(data_root, os.path.join(out, "runs")))
    result = run_job(config)
    samples = result.samples.to_pandas()
    selections = {s.name: pq.read_table(os.path.join(result.run_uri, "selections", f"{s.name}.parquet")).to_pandas()
                  for s in result.info.selections}
    rows = evaluate(truth, samples, selections, os.path.join(data_root, "images"))
    counts = result.info.counts
    print()
    print(f"Demo: {counts.inputs} inputs ({truth['inputs']} planted), {counts.ok} ok, {counts.rejected} rejected")
    print(f"Embedder: {result.info.model_id} -- {result.info.embedder.get('warning') or ''}")
    print()
    print("Planted vs found")
    print(format_table(rows, ["defect", "planted", "found", "recall", "flagged", "precision"]))
    print()
    print("Selections")
    print(format_table([vars(s) for s in result.info.selections], ["name", "mode", "rows", "eligible", "note"]))
    print()
    print("Outputs")
    for name in ("samples", "selections", "embeddings", "report.html", "run.json", "_SUCCESS"):
        print(f"  {os.path.join(result.run_uri, name)}")
    print(f"  {os.path.join(out, 'runs', 'latest')}")
    sys.stdout.flush()
    return 0
