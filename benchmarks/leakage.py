"""A validation set without leakage, and the leakage report, on real photos with planted copies.

CIFAR-10 test photos (``../shared/data/cifar10``) as JPEG files in ``train/<class>/`` (80%) and
``val/<class>/`` (20%), labelled. Planted: copies of train photos put into ``val/`` (exact
copies, and each of the four core edits of ``copy_edits.py``: re-encoded, resized, brightness,
cropped), N of each. The job runs in images mode with ``input.split_from_path: true``, the
trained encoder, and two selections: ``val`` (validation, 10%, ``disjoint_from: [train]``) and
``train`` (representative). Reported: recall of the planted cross-split copies in
``leakage.parquet`` per edit, pairs not planted, the validation set's label and cluster TV
distances, leakage between the selections, and what the report's gallery holds.

    python benchmarks/leakage.py --photos 3000 --per-edit 20 --out benchmarks/results/leakage.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
DATA = os.path.join(ROOT, "..", "shared", "data")
ENCODER = os.path.join(ROOT, "benchmarks", "models", "cifar10_cnn.pt")
KINDS = ("exact", "reencoded", "resized", "brightness", "cropped")


def build(folder: str, photos: int, per_edit: int, seed: int) -> dict:
    from PIL import Image

    from copy_edits import EDITS

    rng = np.random.default_rng(seed)
    with tarfile.open(os.path.join(DATA, "cifar10", "test.tar.gz")) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")), key=lambda m: m.name)
        picked = [members[i] for i in np.sort(rng.choice(len(members), photos, replace=False))]
        data = [(m.name.split("/")[-2], tar.extractfile(m).read()) for m in picked]
    split = np.where(rng.random(photos) < 0.8, "train", "val")
    labels, names = [], []
    for i, ((label, raw), s) in enumerate(zip(data, split)):
        name = f"{s}/{label}/{i:05d}.jpg"
        os.makedirs(os.path.join(folder, s, label), exist_ok=True)
        with open(os.path.join(folder, name), "wb") as fh:
            fh.write(raw)
        labels.append((name, label))
        names.append(name)
    train = [i for i in range(photos) if split[i] == "train"]
    sources = rng.choice(train, per_edit * len(KINDS), replace=False)
    planted = []
    for j, src in enumerate(sources):
        kind = KINDS[j // per_edit]
        label = data[src][0]
        name = f"val/{label}/copy-{kind}-{j:04d}.jpg"
        if kind == "exact":
            shutil.copy(os.path.join(folder, names[src]), os.path.join(folder, name))
        else:
            img, quality = EDITS[kind](Image.open(io.BytesIO(data[src][1])).convert("RGB"), rng)
            img.save(os.path.join(folder, name), "JPEG", quality=quality)
        labels.append((name, label))
        planted.append({"copy": name, "of": names[src], "kind": kind})
    with open(os.path.join(folder, "labels.csv"), "w") as fh:
        fh.write("path,label\n" + "".join(f"{n},{lab}\n" for n, lab in labels))
    return {"planted": planted, "train": int((split == "train").sum()), "val": int((split == "val").sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=int, default=3000)
    parser.add_argument("--per-edit", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "leakage.json"))
    args = parser.parse_args()
    if not os.path.isdir(DATA):
        sys.exit(f"reference data not found under {DATA}")
    import pyarrow.parquet as pq

    from curation.config import load_config
    from curation.job import run_job

    work = tempfile.mkdtemp(prefix="leakage-")
    images = os.path.join(work, "images")
    truth = build(images, args.photos, args.per_edit, args.seed)
    config = load_config(data={
        "input": {"images": images, "labels": os.path.join(images, "labels.csv"), "split_from_path": True},
        "output": {"uri": os.path.join(work, "out")}, "store": {"enabled": False},
        "embedder": {"model": "torchscript", "weights": ENCODER, "image_size": 32},
        "report": {"map_method": "pca"}, "ray": {"num_cpus": os.cpu_count()},
        "selections": [{"name": "train", "mode": "representative", "budget": 500},
                       {"name": "val", "mode": "validation", "fraction": 0.1, "disjoint_from": ["train"]}]})
    t = time.perf_counter()
    result = run_job(config)
    seconds = time.perf_counter() - t
    leaks = pq.read_table(os.path.join(result.run_uri, "leakage.parquet")).to_pylist()
    found = {frozenset((r["uri_a"], r["uri_b"])) for r in leaks}
    by_kind = {}
    planted_pairs = set()
    for kind in KINDS:
        pairs = [frozenset((os.path.join(images, p["copy"]), os.path.join(images, p["of"])))
                 for p in truth["planted"] if p["kind"] == kind]
        planted_pairs |= set(pairs)
        by_kind[kind] = round(sum(p in found for p in pairs) / len(pairs), 3)
    val = next(s for s in result.info.selections if s.name == "val")
    html = open(os.path.join(result.run_uri, "report.html"), encoding="utf-8").read()
    report = {
        "photos": args.photos, "train_photos": truth["train"], "val_photos": truth["val"],
        "planted_per_edit": args.per_edit, "recall_by_edit": by_kind,
        "pairs_found": len(leaks), "pairs_not_planted": len(found - planted_pairs),
        "not_planted_examples": [sorted(os.path.relpath(u, images) for u in p) for p in list(found - planted_pairs)[:5]],
        "leakage_summary": result.run_info["leakage"], "validation": {"rows": val.rows, **(val.details or {})},
        "report_gallery": "gallery-leakage" in html, "seconds": round(seconds, 1),
    }
    print(f"\n{args.photos} CIFAR-10 test photos ({truth['train']} train / {truth['val']} val), "
          f"{args.per_edit} planted cross-split copies per edit, {seconds:.0f} s")
    print(f"{'edit':<12} {'recall':>7}")
    for kind, value in by_kind.items():
        print(f"{kind:<12} {value:>7.3f}")
    print(f"pairs found {len(leaks)}, not planted {report['pairs_not_planted']}")
    print(f"validation: {val.rows} rows, label TV {val.details['label_tv']}, cluster TV {val.details['cluster_tv']}, "
          f"leakage into train {val.details['leakage']}")
    print(f"share of each split with a copy elsewhere: {result.run_info['leakage']['share_with_a_copy_elsewhere']}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=2)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
