"""Quality benchmark: our scores and selections beside cleanlab Datalab and CleanVision on the
same data and the same features, in one run.

Part A -- MNIST test split (``../shared/data/mnist``), features = PCA-64 of the pixels
(L2-normalised). 8,000 digits form the pool, 2,000 are a clean held-out split. Planted in the
pool: 6% flipped labels (half random, half look-alike digits 4<->9, 3<->5, 1<->7), 100 exact
duplicates, 100 near duplicates (1-px shift or brightness x0.8), 30 out-of-distribution
items (CIFAR-10 photos turned grey 28x28, random labels). Reported: label-noise AUROC and
out-of-distribution AUROC (ours vs Datalab's label and outlier scores), exact/near duplicate
recall and precision (ours vs Datalab's near_duplicate), and the ``representative``
selection (1,000 items, uniform): share of flips/duplicates/OOD selected, class max/min, and
downstream accuracy of a logistic regression trained on it vs on random same-size subsets
(mean of 5 draws), tested on the held-out split.

Part B -- CIFAR-10 train photos (``../shared/data/cifar10``): 3,000 photos plus 150 dark,
150 bright (over-exposed or washed out) and 150 blurry versions of other photos, as JPEG
files. Reported: precision/recall of our junk flags (from our decoder's statistics) beside
CleanVision's dark / light / blurry issues on the same files.

    python benchmarks/quality.py --out benchmarks/results/quality.json
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import sys
import tarfile
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DATA = os.path.join(ROOT, "..", "shared", "data")
N_OOD = 30  # rare by construction: a hundred look-alike photos would form their own cluster
LOOKALIKE = {4: 9, 9: 4, 3: 5, 5: 3, 1: 7, 7: 1}


def load_mnist():
    images = np.frombuffer(gzip.open(os.path.join(DATA, "mnist", "t10k-images-idx3-ubyte.gz")).read(), np.uint8,
                           offset=16).reshape(-1, 28, 28)
    labels = np.frombuffer(gzip.open(os.path.join(DATA, "mnist", "t10k-labels-idx1-ubyte.gz")).read(), np.uint8, offset=8)
    return images, labels.astype(np.int64)


def load_cifar(split: str, limit: int, seed: int = 0):
    from PIL import Image

    images, labels = [], []
    with tarfile.open(os.path.join(DATA, "cifar10", f"{split}.tar.gz")) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")]
        rng = np.random.default_rng(seed)
        for idx in rng.choice(len(members), min(limit, len(members)), replace=False):
            m = members[idx]
            images.append(np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")))
            labels.append(m.name.split("/")[-2])
    return np.stack(images), labels


def auroc(y, score):
    from sklearn.metrics import roc_auc_score

    return round(float(roc_auc_score(y, score)), 4)


def pr(flagged: np.ndarray, truth: np.ndarray) -> dict:
    tp = int((flagged & truth).sum())
    return {"precision": round(tp / max(1, flagged.sum()), 3), "recall": round(tp / max(1, truth.sum()), 3),
            "flagged": int(flagged.sum()), "planted": int(truth.sum())}


def mnist_set(seed: int) -> dict:
    """The MNIST pool with planted defects, its PCA-64 features and the clean held-out split."""
    from PIL import Image
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(seed)
    images, labels = load_mnist()
    order = rng.permutation(len(images))
    pool, held = order[:8000], order[8000:]
    x = images[pool].astype(np.float32)
    y = labels[pool].copy()
    true_y = y.copy()
    n0 = len(x)
    kind = np.array(["clean"] * n0, dtype=object)
    # flipped labels: 3% random, 3% look-alike
    flip = rng.choice(n0, int(0.06 * n0), replace=False)
    for j, i in enumerate(flip):
        if j % 2 == 0 and true_y[i] in LOOKALIKE:
            y[i] = LOOKALIKE[true_y[i]]
        else:
            y[i] = (true_y[i] + rng.integers(1, 10)) % 10
    kind[flip] = "flip"
    clean_idx = np.setdiff1d(np.arange(n0), flip)
    src_exact = rng.choice(clean_idx, 100, replace=False)
    src_near = rng.choice(np.setdiff1d(clean_idx, src_exact), 100, replace=False)
    near = [np.roll(x[i], 1, axis=1) if j % 2 == 0 else x[i] * 0.8 for j, i in enumerate(src_near)]
    near_kind = ["near_shift_1px" if j % 2 == 0 else "near_dimmed" for j in range(len(src_near))]
    cifar, _ = load_cifar("test", N_OOD, seed)
    ood = np.stack([np.asarray(Image.fromarray(c).convert("L").resize((28, 28), Image.BILINEAR), np.float32) for c in cifar])
    x = np.concatenate([x, x[src_exact], np.stack(near), ood])
    y = np.concatenate([y, y[src_exact], y[src_near], rng.integers(0, 10, N_OOD)])
    kind = np.concatenate([kind, ["exact"] * 100, near_kind, ["ood"] * N_OOD])
    pair_of = np.concatenate([np.full(n0, -1), src_exact, src_near, np.full(N_OOD, -1)])
    n = len(x)
    pca = PCA(64, random_state=0).fit(images[pool].reshape(len(pool), -1).astype(np.float32))
    feats = pca.transform(x.reshape(n, -1))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    held_feats = pca.transform(images[held].reshape(len(held), -1).astype(np.float32))
    held_feats /= np.linalg.norm(held_feats, axis=1, keepdims=True)
    return {"x": x, "y": y, "kind": kind, "flip": flip, "pair_of": pair_of, "feats": feats.astype(np.float32),
            "held_feats": held_feats, "held_labels": labels[held], "rng": rng}


def score_mnist(data: dict):
    """Our scores on the MNIST set, from its pixels (decode statistics, hashes) and features."""
    import hashlib

    import pyarrow as pa
    from PIL import Image

    from curation.config import ScoresConfig
    from curation.index.knn import exact_knn
    from curation.scores import run_scores
    from curation.stages.decode import copy_descriptor, luminance_percentiles, pixel_statistics

    x, y = data["x"], data["y"]
    n = len(x)
    greys = [Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)) for img in x]
    stats = [pixel_statistics(g.convert("RGB")) for g in greys]
    percentiles = np.array([luminance_percentiles(g) for g in greys], np.float32)
    copies = np.stack([copy_descriptor(g) for g in greys])
    pixel_bytes = [np.clip(img, 0, 255).astype(np.uint8).tobytes() for img in x]
    samples = pa.table({
        "input_id": np.arange(n, dtype=np.int64), "uri": [f"mnist/{i:05d}.png" for i in range(n)],
        "label": [str(v) for v in y], "status": ["ok"] * n, "reason": pa.nulls(n, pa.string()),
        "width": np.full(n, 28, np.int32), "height": np.full(n, 28, np.int32),
        "brightness": np.array([s[0] for s in stats], np.float32), "contrast": np.array([s[1] for s in stats], np.float32),
        "sharpness": np.array([s[2] for s in stats], np.float32),
        "shadows": percentiles[:, 0], "highlights": percentiles[:, 1],
        "content_hash": [hashlib.blake2b(b, digest_size=16).hexdigest() for b in pixel_bytes],
        "pixel_hash": [hashlib.blake2b(b, digest_size=16).hexdigest() for b in pixel_bytes],
        "phash": np.array([s[3] for s in stats], np.int64),
    })
    cfg = ScoresConfig()
    scored, _ = run_scores(samples, data["feats"], exact_knn(data["feats"], 10), cfg,
                           copies=copies, copy_knn=exact_knn(copies, 10))
    return scored, cfg


def downstream(data: dict, scored, cfg, budget: int = 1000, draws: int = 5) -> dict:
    """The ``representative`` selection: what it contains, and the held-out accuracy of a
    logistic regression trained on it vs on random same-size subsets of the pool."""
    from sklearn.linear_model import LogisticRegression

    from curation.config import SelectionConfig
    from curation.select import build_selections

    feats, y, kind, rng = data["feats"], data["y"], data["kind"], data["rng"]
    sel = build_selections(scored, cfg, [SelectionConfig(name="train", mode="representative", budget=budget)],
                           feats)[0]
    picked = np.array([int(u.split("/")[1][:5]) for u in sel.table["uri"].to_pylist()])
    counts = np.bincount(y[picked], minlength=10)

    def accuracy(idx):
        model = LogisticRegression(max_iter=2000).fit(feats[idx], y[idx])
        return float((model.predict(data["held_feats"]) == data["held_labels"]).mean())

    rep_acc = accuracy(picked)
    random_accs = [accuracy(rng.choice(len(y), len(picked), replace=False)) for _ in range(draws)]
    return {
        "size": int(len(picked)), "flipped_share": round(float(np.isin(picked, data["flip"]).mean()), 4),
        "duplicate_share": round(float(np.isin(kind[picked], ["exact", "near_shift_1px", "near_dimmed"]).mean()), 4),
        "ood_share": round(float((kind[picked] == "ood").mean()), 4),
        "class_max_min": round(float(counts.max() / max(1, counts.min())), 3),
        "downstream_acc": round(rep_acc, 4), "random_acc_mean": round(float(np.mean(random_accs)), 4),
        "gain_points": round(100 * (rep_acc - float(np.mean(random_accs))), 2),
    }


def part_a(seed: int = 0, splits: int = 5) -> dict:
    data = mnist_set(seed)
    kind, pair_of, y, feats = data["kind"], data["pair_of"], data["y"], data["feats"]
    n = len(y)
    t = time.perf_counter()
    scored, cfg = score_mnist(data)
    ours_s = time.perf_counter() - t
    df = scored.to_pandas()
    labelled = kind != "ood"
    dup_kinds = ("exact", "near_shift_1px", "near_dimmed")
    ours = {
        "label_auroc": auroc((kind == "flip")[labelled], -df.label_quality.to_numpy()[labelled]),
        "ood_auroc": auroc(kind == "ood", df.sparseness.to_numpy()),
        "seconds": round(ours_s, 1),
    }
    for k in dup_kinds:
        ours[f"{k}_recall"] = float(np.mean([df.dup_group[i] == df.dup_group[pair_of[i]] for i in np.flatnonzero(kind == k)]))
    planted = np.flatnonzero(pair_of >= 0)
    planted_dup = np.isin(np.arange(n), np.concatenate([planted, pair_of[planted]]))
    ours["dup_precision"] = pr(df.dup_of.notna().to_numpy(), planted_dup)["precision"]

    # The representative selection on several pool/held-out splits: one split's accuracy moves
    # by about a point with the split alone, more than the effect being measured.
    per_split = [downstream(data, scored, cfg)]
    for extra in range(1, splits):
        other = mnist_set(seed + extra)
        scored_other, _ = score_mnist(other)
        per_split.append(downstream(other, scored_other, cfg))
    selection = {key: round(float(np.mean([s[key] for s in per_split])), 4) for key in per_split[0]}
    selection["per_split_gain_points"] = [s["gain_points"] for s in per_split]
    selection["splits"] = splits

    # cleanlab Datalab on the same features and labels
    datalab = None
    try:
        from cleanlab import Datalab

        t = time.perf_counter()
        lab = Datalab(data={"label": y.astype(str)}, label_name="label", verbosity=0)
        lab.find_issues(features=feats, issue_types={"label": {}, "outlier": {}, "near_duplicate": {}})
        dl_s = time.perf_counter() - t
        li = lab.get_issues("label")
        oi = lab.get_issues("outlier")
        nd = lab.get_issues("near_duplicate")
        nd_sets = nd["near_duplicate_sets"].to_numpy()
        datalab = {
            "label_auroc": auroc((kind == "flip")[labelled], -li["label_score"].to_numpy()[labelled]),
            "ood_auroc": auroc(kind == "ood", -oi["outlier_score"].to_numpy()),
            "dup_precision": pr(nd["is_near_duplicate_issue"].to_numpy(), planted_dup)["precision"],
            "seconds": round(dl_s, 1),
        }
        for k in dup_kinds:
            datalab[f"{k}_recall"] = float(np.mean([pair_of[i] in set(nd_sets[i]) for i in np.flatnonzero(kind == k)]))
    except ImportError as exc:
        datalab = {"skipped": f"cleanlab not installed ({exc})"}
    return {"n": int(n), "features": "PCA-64 of pixels", "ours": ours, "datalab": datalab, "representative": selection}


def score_folder(folder: str, names: list[str], labels: list[str] | None):
    """Our decoder, the thumbnail embedder and every score on image files (no Ray: the stages
    are called directly). Returns (scored samples, embeddings, seconds)."""
    import pyarrow as pa

    from curation.config import ScoresConfig
    from curation.index.knn import exact_knn
    from curation.io.filesystem import Resolver
    from curation.scores import run_scores
    from curation.stages.decode import DecodeStage
    from curation.stages.embed import EmbedStage

    t = time.perf_counter()
    n = len(names)
    decode = DecodeStage(resolver=Resolver(), image_size=32, max_pixels=10**8)
    batch = decode({"uri": np.array([os.path.join(folder, name) for name in names], dtype=object),
                    "input_error": np.array([None] * n, dtype=object)})
    feats = EmbedStage(model="thumbnail", weights="none", image_size=32, device="cpu").embed(batch.pop("pixels"))
    copies = batch.pop("copy_vector")
    samples = pa.table({"input_id": np.arange(n, dtype=np.int64), "uri": names,
                        "label": pa.array(labels, pa.string()) if labels else pa.nulls(n, pa.string()),
                        **{k: v for k, v in batch.items() if k != "uri"}})
    scored, _ = run_scores(samples, feats, exact_knn(feats, 10), ScoresConfig(), copies=copies,
                           copy_knn=exact_knn(copies, 10))
    return scored, feats, time.perf_counter() - t


def part_b(seed: int = 0) -> dict:
    from PIL import Image, ImageEnhance, ImageFilter

    from curation.config import ScoresConfig, SelectionConfig
    from curation.select import Selector

    rng = np.random.default_rng(seed)
    photos, classes = load_cifar("train", 3450, seed)
    folder = tempfile.mkdtemp(prefix="quality-cifar-")
    kinds = []
    for i, arr in enumerate(photos):
        img = Image.fromarray(arr)
        kind = "clean"
        if 3000 <= i < 3150:
            img, kind = ImageEnhance.Brightness(img).enhance(rng.uniform(0.08, 0.2)), "dark"
        elif 3150 <= i < 3300:
            if i % 2:
                img = Image.blend(img, Image.new("RGB", img.size, "white"), rng.uniform(0.8, 0.9))
            else:
                img = Image.blend(ImageEnhance.Contrast(img).enhance(0.25), Image.new("RGB", img.size, "white"), 0.55)
            kind = "bright"
        elif 3300 <= i < 3450:
            img, kind = img.filter(ImageFilter.GaussianBlur(rng.uniform(1.5, 2.5))), "blurry"
        img.save(os.path.join(folder, f"{i:05d}.jpg"), quality=92)
        kinds.append(kind)
    kinds = np.array(kinds)
    names = [f"{i:05d}.jpg" for i in range(len(kinds))]
    scored, feats, seconds = score_folder(folder, names, classes)
    flag = {name: scored[f"is_{name}"].to_numpy(zero_copy_only=False) for name in ("dark", "bright", "blurry")}
    ours = {name: pr(flag[name], kinds == name) for name in flag}
    ours["seconds"] = round(seconds, 1)
    # The representative selection on this labelled, junk-laden set: how much junk gets in.
    train = SelectionConfig(name="train", mode="representative", budget=1000)
    selector = Selector(scored, ScoresConfig(), feats)
    picked = np.array([names.index(u) for u in selector.build(train).table["uri"].to_pylist()])
    counts = np.unique(np.array(classes)[picked], return_counts=True)[1]
    df = scored.to_pandas()
    eligible = selector.eligible(train)
    representative = {"size": int(len(picked)), "junk_share": round(float((kinds[picked] != "clean").mean()), 4),
                      "class_max_min": round(float(counts.max() / counts.min()), 3),
                      "smallest_class_eligible": int(df.label[eligible].value_counts().min()),
                      "suspected_mislabel_share": round(float(df.is_suspected_mislabel.mean()), 3),
                      "doubtful_label_share": round(float((df.label_quality < ScoresConfig().label_quality_threshold).mean()), 3)}
    cleanvision = None
    try:
        from cleanvision import Imagelab

        imagelab = Imagelab(data_path=folder)
        imagelab.find_issues({"dark": {}, "light": {}, "blurry": {}}, verbose=False)
        issues = imagelab.issues.copy()
        issues.index = [os.path.basename(p) for p in issues.index]
        issues = issues.loc[names]
        cleanvision = {
            "dark": pr(issues["is_dark_issue"].to_numpy(), kinds == "dark"),
            "bright": pr(issues["is_light_issue"].to_numpy(), kinds == "bright"),
            "blurry": pr(issues["is_blurry_issue"].to_numpy(), kinds == "blurry"),
        }
    except ImportError as exc:
        cleanvision = {"skipped": f"cleanvision not installed ({exc})"}
    return {"n": int(len(kinds)), "ours": ours, "cleanvision": cleanvision, "representative": representative}

NEAR_KINDS = ("reencoded", "resized", "brightness", "cropped_3pct", "cropped_6pct")


def part_c(seed: int = 0, n_photos: int = 2000, per_kind: int = 50) -> dict:
    """Near duplicates of each kind among real photos, through our decoder and embedder."""
    from PIL import Image, ImageEnhance

    rng = np.random.default_rng(seed)
    photos, _ = load_cifar("train", n_photos, seed + 7)
    folder = tempfile.mkdtemp(prefix="quality-near-")

    def save(img, name, quality=92):
        img.save(os.path.join(folder, name), quality=quality)
        return name

    names = [save(Image.fromarray(arr), f"{i:05d}.jpg") for i, arr in enumerate(photos)]
    kinds = ["clean"] * len(names)
    source = [-1] * len(names)
    sources = rng.choice(len(photos), (len(NEAR_KINDS) + 2) * per_kind, replace=False).reshape(-1, per_kind)
    for src in sources[0]:  # byte-identical copies
        name = f"exact_{src:05d}.jpg"
        with open(os.path.join(folder, names[src]), "rb") as fh, open(os.path.join(folder, name), "wb") as out:
            out.write(fh.read())
        names.append(name), kinds.append("exact_bytes"), source.append(int(src))
    for src in sources[1]:  # the same pixels, another lossless encoding
        decoded = Image.open(os.path.join(folder, names[src])).convert("RGB")
        names.append(save(decoded, f"png_{src:05d}.png")), kinds.append("exact_pixels"), source.append(int(src))
    for kind, group in zip(NEAR_KINDS, sources[2:]):
        for src in group:
            img = Image.open(os.path.join(folder, names[src])).convert("RGB")
            quality = 92
            if kind == "reencoded":
                quality = 40
            elif kind == "resized":
                img = img.resize((24, 24), Image.BICUBIC)
            elif kind == "brightness":
                img = ImageEnhance.Brightness(img).enhance(1.25)
            else:  # cropped: 1 or 2 px off each side of 32 (3% or 6%), resized back
                m = 1 if kind == "cropped_3pct" else 2
                img = img.crop((m, m, 32 - m, 32 - m)).resize((32, 32), Image.BICUBIC)
            names.append(save(img, f"{kind}_{src:05d}.jpg", quality)), kinds.append(kind), source.append(int(src))
    kinds = np.array(kinds)
    source = np.array(source)
    n = len(names)
    per_kind_count = per_kind

    scored, feats, ours_s = score_folder(folder, names, None)
    group = scored["dup_group"].to_numpy(zero_copy_only=False)
    planted = np.flatnonzero(source >= 0)
    in_pair = np.zeros(n, bool)
    in_pair[planted] = True
    in_pair[source[planted]] = True
    found = np.array([group[i] == group[source[i]] and group[i] == group[i] for i in range(n)])
    flagged = scored["dup_of"].is_valid().to_numpy(zero_copy_only=False)

    def per_kind(hit):
        return {kind: round(float(hit[kinds == kind].mean()), 3) for kind in ("exact_bytes", "exact_pixels", *NEAR_KINDS)}

    ours = {"recall": per_kind(found), "precision": pr(flagged, in_pair)["precision"],
            "flagged": int(flagged.sum()), "seconds": round(ours_s, 1)}

    datalab = None
    try:
        from cleanlab import Datalab

        t = time.perf_counter()
        lab = Datalab(data={"uri": names}, verbosity=0)
        lab.find_issues(features=feats, issue_types={"near_duplicate": {}})
        nd = lab.get_issues("near_duplicate")
        sets = nd["near_duplicate_sets"].to_numpy()
        hit = np.array([source[i] >= 0 and source[i] in set(sets[i]) for i in range(n)])
        datalab = {"recall": per_kind(hit), "seconds": round(time.perf_counter() - t, 1),
                   "precision": pr(nd["is_near_duplicate_issue"].to_numpy(), in_pair)["precision"],
                   "flagged": int(nd["is_near_duplicate_issue"].sum())}
    except ImportError as exc:
        datalab = {"skipped": f"cleanlab not installed ({exc})"}

    cleanvision = None
    try:
        from cleanvision import Imagelab

        t = time.perf_counter()
        imagelab = Imagelab(data_path=folder)
        imagelab.find_issues({"exact_duplicates": {}, "near_duplicates": {}}, verbose=False)
        partner_sets = {}
        for key in ("exact_duplicates", "near_duplicates"):
            for members in imagelab.info[key]["sets"]:
                base = {os.path.basename(m) for m in members}
                for m in base:
                    partner_sets.setdefault(m, set()).update(base)
        hit = np.array([source[i] >= 0 and names[source[i]] in partner_sets.get(names[i], set()) for i in range(n)])
        flagged_cv = np.array([name in partner_sets for name in names])
        cleanvision = {"recall": per_kind(hit), "precision": pr(flagged_cv, in_pair)["precision"],
                       "flagged": int(flagged_cv.sum()), "seconds": round(time.perf_counter() - t, 1)}
    except ImportError as exc:
        cleanvision = {"skipped": f"cleanvision not installed ({exc})"}
    return {"n": int(n), "features": "thumbnail embedder (our default) + decoder hashes", "planted_per_kind": per_kind_count,
            "ours": ours, "datalab": datalab, "cleanvision": cleanvision}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/quality.json")
    parser.add_argument("--splits", type=int, default=5, help="MNIST pool/held-out splits for downstream accuracy")
    parser.add_argument("--parts", default="abd", help="which parts to run (letters; c is superseded by d)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides for part d's job runs, e.g. scores.label_probe_weight=0.7")
    args = parser.parse_args()
    if not os.path.isdir(os.path.join(DATA, "mnist")):
        sys.exit(f"reference data not found under {DATA}")
    results = {"machine": f"{os.cpu_count()} CPUs"}
    if "a" in args.parts:
        a = results["mnist"] = part_a(splits=args.splits)
        print("\nPart A: MNIST pool of", a["n"], "items, features", a["features"])
        print(f"{'metric':<24}{'ours':>10}{'datalab':>10}")
        for key in ("label_auroc", "ood_auroc", "exact_recall", "near_shift_1px_recall", "near_dimmed_recall",
                    "dup_precision", "seconds"):
            print(f"{key:<24}{a['ours'].get(key, ''):>10}{str(a['datalab'].get(key, '-')):>10}")
        print(f"\nrepresentative (1000, uniform), mean of {a['representative']['splits']} splits:",
              json.dumps(a["representative"]))
    if "b" in args.parts:
        b = results["cifar_junk"] = part_b()
        print("\nPart B: CIFAR-10 junk,", b["n"], "files")
        print(f"{'flag':<8}{'ours P/R':>14}{'cleanvision P/R':>18}")
        for key in ("dark", "bright", "blurry"):
            o = b["ours"][key]
            cv = b["cleanvision"].get(key) if isinstance(b["cleanvision"], dict) else None
            cv_text = f"{cv['precision']}/{cv['recall']}" if cv else "-"
            print(f"{key:<8}{o['precision']:>7}/{o['recall']:<6}{cv_text:>18}")
        print("representative (1000, uniform):", json.dumps(b["representative"]))
    if "c" in args.parts:
        c = results["cifar_near_duplicates"] = part_c()
        print("\nPart C: near duplicates among CIFAR-10 photos,", c["n"], "files,", c["planted_per_kind"], "per kind")
        tools = ("ours", "datalab", "cleanvision")
        print(f"{'kind (recall)':<16}" + "".join(f"{t:>13}" for t in tools))
        for key in c["ours"]["recall"]:
            print(f"{key:<16}" + "".join(f"{str(c[t].get('recall', {}).get(key, '-')):>13}" for t in tools))
        print(f"{'precision':<16}" + "".join(f"{str(c[t].get('precision', '-')):>13}" for t in tools))
    if "d" in args.parts:
        import quality_semantic

        d = results["semantic_job"] = quality_semantic.part_d(overrides=args.set)
        quality_semantic.print_part_d(d)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
