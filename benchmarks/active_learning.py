"""What to label next: every ``to_label`` rule side by side, on real data, paired over seeds.

For each set and seed: 2,000 held-out items; the rest is the pool; 10 labelled items per class
to start. Each rule (``curation.labelling.RULES``) picks a budget of 100, 500 or 2,000 from the
unlabelled pool; a logistic probe trained on labelled + picked (true labels) is scored on the
held-out items. Typicality is what the job uses (1 - the kNN outlier score, k = 10,
rank-normalised); uncertainty is 1 - the top probability of a logistic probe fitted on the
labelled items (the job's `suggested_confidence` also mixes in the neighbour vote).

Sets: CIFAR-10 test photos with the trained encoder (``models/cifar10_cnn.pt``, 128-d; ``cifar``)
and with the offline ``thumbnail`` embedder (``cifar-thumbnail``), and MNIST test digits (PCA-64
of the pixels; ``mnist``). Reported: mean accuracy per rule and budget, and the
paired difference from random with a 95% t-interval.

    python benchmarks/active_learning.py --seeds 20 --out benchmarks/results/active_learning.json
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import sys
import tarfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DATA = os.path.join(ROOT, "..", "shared", "data")
BUDGETS = (100, 500, 2000)
HELD_OUT = 2000
START_PER_CLASS = 10


def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def mnist_features():
    from sklearn.decomposition import PCA

    images = np.frombuffer(gzip.open(os.path.join(DATA, "mnist", "t10k-images-idx3-ubyte.gz")).read(), np.uint8,
                           offset=16).reshape(-1, 784).astype(np.float32) / 255.0
    labels = np.frombuffer(gzip.open(os.path.join(DATA, "mnist", "t10k-labels-idx1-ubyte.gz")).read(), np.uint8,
                           offset=8).astype(np.int64)
    return unit(PCA(64, random_state=0).fit_transform(images)), labels


def cifar_images():
    from PIL import Image

    images, labels = [], []
    with tarfile.open(os.path.join(DATA, "cifar10", "test.tar.gz")) as tar:
        for m in sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")), key=lambda m: m.name):
            images.append(np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")))
            labels.append(m.name.split("/")[-2])
    classes = sorted(set(labels))
    return images, np.array([classes.index(c) for c in labels], np.int64)


def cifar_thumbnail_features():
    """The offline default embedder (`thumbnail`: layout and colour, no semantics) on the same photos."""
    from curation.stages.embed import EmbedStage

    images, y = cifar_images()
    return unit(EmbedStage(model="thumbnail", weights="none", image_size=32, device="cpu").embed(np.stack(images))), y


def cifar_features():
    import torch

    images, y = cifar_images()
    model = torch.jit.load(os.path.join(ROOT, "benchmarks", "models", "cifar10_cnn.pt"), map_location="cpu")
    model.eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    out = []
    with torch.no_grad():
        for lo in range(0, len(images), 500):
            batch = torch.from_numpy(np.stack(images[lo:lo + 500])).permute(0, 3, 1, 2).float() / 255.0
            out.append(model((batch - mean) / std).numpy())
    return unit(np.concatenate(out)), y


def typicality_of(x: np.ndarray, k: int = 10) -> np.ndarray:
    import faiss

    from curation.scores.sparseness import rank_normalise

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    sims, _ = index.search(x, k + 1)
    return 1.0 - rank_normalise(1.0 - sims[:, k].astype(np.float64)).astype(np.float64)


def probe(x, y, n_classes):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x)
    model = LogisticRegression(C=1.0, max_iter=2000).fit(scaler.transform(x), y)
    return lambda z: model.predict_proba(scaler.transform(z)), model.classes_


def accuracy(x_train, y_train, x_test, y_test, n_classes) -> float:
    predict, classes = probe(x_train, y_train, n_classes)
    return float((classes[np.argmax(predict(x_test), axis=1)] == y_test).mean())


def one_seed(x, y, seed: int, rules) -> dict:
    from curation.labelling import rank_for_labelling

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    held, pool = order[:HELD_OUT], order[HELD_OUT:]
    xp, yp = x[pool], y[pool]
    n_classes = int(y.max()) + 1
    labelled = np.zeros(len(pool), bool)
    for c in range(n_classes):
        labelled[rng.choice(np.flatnonzero(yp == c), START_PER_CLASS, replace=False)] = True
    typicality = typicality_of(xp)
    predict, classes = probe(xp[labelled], yp[labelled], n_classes)
    p = predict(xp)
    uncertainty = 1.0 - p.max(axis=1)
    out = {}
    for rule in rules:
        for budget in BUDGETS:
            t = time.perf_counter()
            rows, _, _ = rank_for_labelling(xp, labelled, budget, typicality=typicality, uncertainty=uncertainty,
                                            rule=rule, seed=seed)
            seconds = time.perf_counter() - t
            assert not labelled[rows].any() and len(set(rows.tolist())) == len(rows) == budget
            train = labelled.copy()
            train[rows] = True
            out[(rule, budget)] = (accuracy(xp[train], yp[train], x[held], y[held], n_classes), seconds)
    return out


def summarise(results: list[dict], rules) -> list[dict]:
    from scipy import stats

    rows = []
    for budget in BUDGETS:
        base = np.array([r[("random", budget)][0] for r in results])
        for rule in rules:
            acc = np.array([r[(rule, budget)][0] for r in results])
            diff = (acc - base) * 100
            half = (stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
                    if len(diff) > 1 else float("nan"))
            rows.append({"budget": budget, "rule": rule, "accuracy": round(float(acc.mean()) * 100, 2),
                         "vs_random_points": round(float(diff.mean()), 2),
                         "ci95": [round(float(diff.mean() - half), 2), round(float(diff.mean() + half), 2)],
                         "select_s": round(float(np.mean([r[(rule, budget)][1] for r in results])), 3)})
    return rows


def main() -> None:
    from curation.labelling import RULES

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--sets", default="cifar,mnist")
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "active_learning.json"))
    args = parser.parse_args()
    rules = args.rules.split(",")
    if "random" not in rules:
        rules.append("random")
    if not os.path.isdir(DATA):
        sys.exit(f"reference data not found under {DATA}")
    report = {}
    for name in args.sets.split(","):
        t = time.perf_counter()
        x, y = {"cifar": cifar_features, "cifar-thumbnail": cifar_thumbnail_features, "mnist": mnist_features}[name]()
        results = [one_seed(x, y, seed, rules) for seed in range(args.seeds)]
        table = summarise(results, rules)
        report[name] = {"items": len(x), "seeds": args.seeds, "rows": table, "seconds": round(time.perf_counter() - t, 1)}
        print(f"\n{name}: {len(x)} items, {args.seeds} seeds, start {START_PER_CLASS}/class, held-out {HELD_OUT}")
        print(f"{'budget':>6} {'rule':<12} {'acc %':>7} {'vs random':>10} {'95% CI':>16} {'select s':>9}")
        for row in table:
            print(f"{row['budget']:>6} {row['rule']:<12} {row['accuracy']:>7.2f} {row['vs_random_points']:>+10.2f} "
                  f"{str(row['ci95']):>16} {row['select_s']:>9.3f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
