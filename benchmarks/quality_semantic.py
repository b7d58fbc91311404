"""Part D of the quality benchmark: the whole job, in images mode, the way a user runs it, on a
CIFAR-10 set with planted defects -- once with the weight-free ``thumbnail`` descriptor and once
with a trained encoder (``benchmarks/models/cifar10_cnn.pt``, a TorchScript program trained on
the CIFAR-10 *train* split; this set comes from the *test* split) -- beside cleanlab Datalab
(on the same features) and CleanVision (on the same files).

The set: 8,000 test photos form the pool (2,000 others are the held-out split), with
* 6% flipped labels (half look-alike classes: cat/dog, automobile/truck, deer/horse,
  airplane/ship; half random);
* copies of clean pool photos: byte copies, lossless re-encodes (same pixels), and
  ``PER_KIND`` copies for each edit of ``copy_edits.EDITS`` (the issue's four kinds and the
  edits found in the wild), each labelled like its source;
* ``N_OOD`` MNIST digits (foreign items) with random labels.

Reported: near-duplicate recall per kind and precision; label-noise AUROC, precision@n and how
often the suggested label is the true one; the representative selection (1,000, uniform):
downstream accuracy of a logistic regression on the embedder's features vs random same-size
subsets of the pool (5 draws), flipped share, class max/min; the out-of-distribution share of
``edge_cases`` and the sparseness AUROC for the foreign items.
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
import time

import numpy as np

import copy_edits
from quality import DATA, ROOT, auroc, load_mnist, pr

PER_KIND = 30
N_OOD = 40
FLIP_RATE = 0.06
LOOKALIKE = {"cat": "dog", "dog": "cat", "automobile": "truck", "truck": "automobile", "deer": "horse",
             "horse": "deer", "airplane": "ship", "ship": "airplane"}
ENCODER = os.path.join(ROOT, "benchmarks", "models", "cifar10_cnn.pt")


def build_set(folder: str, seed: int = 0) -> dict:
    """Write the pool's files and labels CSV; return the ground truth."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    files, classes = [], []
    with tarfile.open(os.path.join(DATA, "cifar10", "test.tar.gz")) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".jpg"):
                files.append(tar.extractfile(member).read())
                classes.append(member.name.split("/")[-2])
    classes = np.array(classes)
    order = rng.permutation(len(files))
    pool, held = order[:8000], order[8000:]
    class_names = sorted(set(classes))
    names, true_label, label, kind, source = [], [], [], [], []

    def add(name, data, truth, given, what, src):
        with open(os.path.join(folder, name), "wb") as fh:
            fh.write(data)
        names.append(name), true_label.append(truth), label.append(given), kind.append(what), source.append(src)

    flip = set(rng.choice(len(pool), int(FLIP_RATE * len(pool)), replace=False).tolist())
    flipped = 0
    for j, i in enumerate(pool):
        truth = classes[i]
        given = truth
        if j in flip:
            flipped += 1
            if flipped % 2 == 0 and truth in LOOKALIKE:
                given = LOOKALIKE[truth]
            else:
                given = rng.choice([c for c in class_names if c != truth])
        add(f"{j:05d}.jpg", files[i], truth, given, "flip" if j in flip else "clean", -1)
    clean = np.array([j for j in range(len(pool)) if j not in flip])
    sources = rng.choice(clean, (len(copy_edits.EDITS) + 2) * PER_KIND, replace=False).reshape(-1, PER_KIND)
    for src in sources[0]:
        add(f"exact_{src:05d}.jpg", files[pool[src]], classes[pool[src]], classes[pool[src]], "exact_bytes", int(src))
    for src in sources[1]:
        buf = io.BytesIO()
        Image.open(io.BytesIO(files[pool[src]])).convert("RGB").save(buf, "PNG")
        add(f"png_{src:05d}.png", buf.getvalue(), classes[pool[src]], classes[pool[src]], "exact_pixels", int(src))
    for (edit, fn), group in zip(copy_edits.EDITS.items(), sources[2:]):
        for src in group:
            img, quality = fn(Image.open(io.BytesIO(files[pool[src]])).convert("RGB"), rng)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=quality)
            add(f"{edit}_{src:05d}.jpg", buf.getvalue(), classes[pool[src]], classes[pool[src]], edit, int(src))
    digits, _ = load_mnist()
    for j, i in enumerate(rng.choice(len(digits), N_OOD, replace=False)):
        buf = io.BytesIO()
        Image.fromarray(digits[i]).convert("RGB").resize((32, 32), Image.BILINEAR).save(buf, "PNG")
        add(f"ood_{j:03d}.png", buf.getvalue(), "digit", rng.choice(class_names), "ood", -1)
    with open(os.path.join(folder, "labels.csv"), "w") as fh:
        fh.write("path,label\n")
        fh.writelines(f"{n},{lab}\n" for n, lab in zip(names, label))
    held_images = np.stack([np.asarray(Image.open(io.BytesIO(files[i])).convert("RGB")) for i in held])
    return {"names": names, "true_label": np.array(true_label), "label": np.array(label), "kind": np.array(kind),
            "source": np.array(source), "held_images": held_images, "held_labels": classes[held]}


def features(images: np.ndarray, embedder: str) -> np.ndarray:
    from curation.stages.embed import EmbedStage

    model, weights = ("thumbnail", "none") if embedder == "thumbnail" else ("torchscript", ENCODER)
    return EmbedStage(model=model, weights=weights, image_size=32, device="cpu").embed(images)


def decoded_pixels(folder: str, names: list[str]) -> np.ndarray:
    """Each file through our decoder, as the job sees it (32 px model input)."""
    from curation.io.filesystem import Resolver
    from curation.stages.decode import DecodeStage

    stage = DecodeStage(resolver=Resolver(), image_size=32, max_pixels=10**8)
    out = stage({"uri": np.array([os.path.join(folder, n) for n in names], dtype=object),
                 "input_error": np.array([None] * len(names), dtype=object)})
    return out["pixels"]


def run_job(folder: str, embedder: str, out: str, overrides: list[str] | None = None):
    from curation.config import load_config
    from curation.job import run_job as job

    model = {"model": "thumbnail"} if embedder == "thumbnail" else {"model": "torchscript", "weights": ENCODER}
    config = load_config(data={
        "input": {"images": folder, "labels": os.path.join(folder, "labels.csv")},
        "output": {"uri": out},
        "embedder": {**model, "image_size": 32},
        "store": {"enabled": False},
        "ray": {"num_cpus": os.cpu_count()},
    }, overrides=overrides)
    t = time.perf_counter()
    result = job(config)
    return result, time.perf_counter() - t


def evaluate(truth: dict, samples, selections: dict, feats: np.ndarray, held_feats: np.ndarray) -> dict:
    from sklearn.linear_model import LogisticRegression

    names, kind, source = truth["names"], truth["kind"], truth["source"]
    n = len(names)
    df = samples.to_pandas()
    df["name"] = [os.path.basename(u) for u in df.uri]
    df = df.set_index("name").loc[names]
    group = df.dup_group.to_numpy()
    planted = np.flatnonzero(source >= 0)
    in_pair = np.zeros(n, bool)
    in_pair[planted] = True
    in_pair[source[planted]] = True
    found = np.array([source[i] >= 0 and group[i] == group[source[i]] and group[i] == group[i] for i in range(n)])
    copy_kinds = ["exact_bytes", "exact_pixels", *copy_edits.EDITS]
    duplicates = {"recall": {k: round(float(found[kind == k].mean()), 3) for k in copy_kinds},
                  "precision": pr(df.dup_of.notna().to_numpy(), in_pair)["precision"],
                  "flagged": int(df.dup_of.notna().sum())}

    judged = np.isin(kind, ["clean", "flip"])
    is_flip = kind == "flip"
    quality = df.label_quality.to_numpy(np.float64)
    worst = np.argsort(np.where(judged, quality, np.inf))[: int(is_flip.sum())]
    suggested = df.suggested_label.to_numpy()
    flagged = df.is_suspected_mislabel.to_numpy(bool)
    labels = {"auroc": auroc(is_flip[judged], -quality[judged]),
              "precision_at_n": round(float(is_flip[worst].mean()), 3),
              "suggested_right_on_flips": round(float((suggested[is_flip] == truth["true_label"][is_flip]).mean()), 3),
              "suggested_right_on_flagged_flips": round(float(
                  (suggested[is_flip & flagged] == truth["true_label"][is_flip & flagged]).mean()), 3),
              "flagged": pr(flagged & judged, is_flip)}

    position = {name: i for i, name in enumerate(names)}
    picked = np.array([position[os.path.basename(u)] for u in selections["train"]["uri"].to_pylist()])
    y = truth["label"]

    def accuracy(idx):
        model = LogisticRegression(max_iter=2000).fit(feats[idx], y[idx])
        return float((model.predict(held_feats) == truth["held_labels"]).mean())

    rng = np.random.default_rng(0)
    random_accs = [accuracy(rng.choice(n, len(picked), replace=False)) for _ in range(5)]
    counts = np.unique(y[picked], return_counts=True)[1]
    rep_acc = accuracy(picked)
    representative = {"size": int(len(picked)), "downstream_acc": round(rep_acc, 4),
                      "random_acc_mean": round(float(np.mean(random_accs)), 4),
                      "gain_points": round(100 * (rep_acc - float(np.mean(random_accs))), 2),
                      "flipped_share": round(float((kind[picked] == "flip").mean()), 4),
                      "duplicate_share": round(float((source[picked] >= 0).mean()), 4),
                      "ood_share": round(float((kind[picked] == "ood").mean()), 4),
                      "class_max_min": round(float(counts.max() / counts.min()), 3)}
    edge = np.array([position[os.path.basename(u)] for u in selections["edge_cases"]["uri"].to_pylist()])
    ood = kind == "ood"
    edge_cases = {"size": int(len(edge)), "ood_share": round(float(ood[edge].mean()), 3) if len(edge) else 0.0,
                  "ood_recall": round(float(np.isin(np.flatnonzero(ood), edge).mean()), 3),
                  "sparseness_auroc": auroc(ood, df.sparseness.to_numpy(np.float64))}
    return {"duplicates": duplicates, "labels": labels, "representative": representative, "edge_cases": edge_cases}


def datalab(truth: dict, feats: np.ndarray) -> dict:
    try:
        from cleanlab import Datalab
    except ImportError as exc:
        return {"skipped": f"cleanlab not installed ({exc})"}
    kind, source, label = truth["kind"], truth["source"], truth["label"]
    n = len(kind)
    t = time.perf_counter()
    lab = Datalab(data={"label": label}, label_name="label", verbosity=0)
    lab.find_issues(features=feats, issue_types={"label": {}, "outlier": {}, "near_duplicate": {}})
    li, oi, nd = lab.get_issues("label"), lab.get_issues("outlier"), lab.get_issues("near_duplicate")
    judged = np.isin(kind, ["clean", "flip"])
    is_flip = kind == "flip"
    score = li["label_score"].to_numpy()
    worst = np.argsort(np.where(judged, score, np.inf))[: int(is_flip.sum())]
    sets = nd["near_duplicate_sets"].to_numpy()
    hit = np.array([source[i] >= 0 and source[i] in set(sets[i]) for i in range(n)])
    planted = np.flatnonzero(source >= 0)
    in_pair = np.zeros(n, bool)
    in_pair[planted] = True
    in_pair[source[planted]] = True
    predicted = li["predicted_label"].to_numpy()
    return {"duplicates": {"recall": {k: round(float(hit[kind == k].mean()), 3)
                                      for k in ["exact_bytes", "exact_pixels", *copy_edits.EDITS]},
                           "precision": pr(nd["is_near_duplicate_issue"].to_numpy(), in_pair)["precision"]},
            "labels": {"auroc": auroc(is_flip[judged], -score[judged]),
                       "precision_at_n": round(float(is_flip[worst].mean()), 3),
                       "suggested_right_on_flips": round(float((predicted[is_flip] == truth["true_label"][is_flip]).mean()), 3)},
            "edge_cases": {"outlier_auroc": auroc(kind == "ood", -oi["outlier_score"].to_numpy())},
            "seconds": round(time.perf_counter() - t, 1)}


def cleanvision(folder: str, truth: dict) -> dict:
    try:
        from cleanvision import Imagelab
    except ImportError as exc:
        return {"skipped": f"cleanvision not installed ({exc})"}
    names, kind, source = truth["names"], truth["kind"], truth["source"]
    imagelab = Imagelab(data_path=folder)
    imagelab.find_issues({"exact_duplicates": {}, "near_duplicates": {}}, verbose=False)
    partners: dict[str, set] = {}
    for key in ("exact_duplicates", "near_duplicates"):
        for members in imagelab.info[key]["sets"]:
            base = {os.path.basename(m) for m in members}
            for m in base:
                partners.setdefault(m, set()).update(base)
    n = len(names)
    hit = np.array([source[i] >= 0 and names[source[i]] in partners.get(names[i], set()) for i in range(n)])
    planted = np.flatnonzero(source >= 0)
    in_pair = np.zeros(n, bool)
    in_pair[planted] = True
    in_pair[source[planted]] = True
    flagged = np.array([name in partners for name in names])
    return {"duplicates": {"recall": {k: round(float(hit[kind == k].mean()), 3)
                                      for k in ["exact_bytes", "exact_pixels", *copy_edits.EDITS]},
                           "precision": pr(flagged, in_pair)["precision"]}}


def part_d(embedders=("thumbnail", "encoder"), seed: int = 0, overrides: list[str] | None = None) -> dict:
    folder = tempfile.mkdtemp(prefix="quality-semantic-")
    truth = build_set(folder, seed)
    pixels = decoded_pixels(folder, truth["names"])
    results = {"n": len(truth["names"]), "per_kind": PER_KIND, "ood": N_OOD, "overrides": overrides or [],
               "cleanvision": cleanvision(folder, truth)}
    for embedder in embedders:
        feats = features(pixels, embedder)
        held_feats = features(truth["held_images"], embedder)
        result, seconds = run_job(folder, embedder, tempfile.mkdtemp(prefix=f"quality-out-{embedder}-"), overrides)
        selections = {s["name"]: None for s in result.run_info["selections"]}
        import pyarrow.parquet as pq

        for name in selections:
            selections[name] = pq.read_table(os.path.join(result.run_uri, "selections", f"{name}.parquet"))
        ours = evaluate(truth, result.samples, selections, feats, held_feats)
        ours["seconds"] = round(seconds, 1)
        ours["probe"] = result.run_info["scores"]["label_quality"].get("probe")
        results[embedder] = {"ours": ours, "datalab": datalab(truth, feats)}
    return results


def print_part_d(d: dict) -> None:
    print(f"\nPart D: the job in images mode on CIFAR-10 test photos with planted defects ({d['n']} files, "
          f"{d['per_kind']} copies per kind, {d['ood']} MNIST digits)")
    embedders = [e for e in ("thumbnail", "encoder") if e in d]
    cols = [(e, t) for e in embedders for t in ("ours", "datalab")]
    header = f"{'':<34}" + "".join(f"{e[:5] + ' ' + t:>15}" for e, t in cols) + f"{'cleanvision':>13}"
    print(header)

    def cell(e, t, *path):
        value = d[e][t]
        for key in path:
            value = value.get(key, "-") if isinstance(value, dict) else "-"
        return value

    kinds = list(d[embedders[0]]["ours"]["duplicates"]["recall"])
    for k in kinds:
        cv = d["cleanvision"].get("duplicates", {}).get("recall", {}).get(k, "-")
        print(f"{'copy recall: ' + k:<34}" + "".join(f"{str(cell(e, t, 'duplicates', 'recall', k)):>15}" for e, t in cols)
              + f"{str(cv):>13}")
    cv = d["cleanvision"].get("duplicates", {}).get("precision", "-")
    print(f"{'copy precision':<34}" + "".join(f"{str(cell(e, t, 'duplicates', 'precision')):>15}" for e, t in cols)
          + f"{str(cv):>13}")
    for key in ("auroc", "precision_at_n", "suggested_right_on_flips"):
        print(f"{'labels: ' + key:<34}" + "".join(f"{str(cell(e, t, 'labels', key)):>15}" for e, t in cols))
    print(f"{'foreign items: sparseness/outlier AUROC':<34}" + "".join(
        f"{str(cell(e, t, 'edge_cases', 'sparseness_auroc' if t == 'ours' else 'outlier_auroc')):>15}" for e, t in cols))
    for e in embedders:
        print(f"{e}: representative", d[e]["ours"]["representative"])
        print(f"{e}: edge_cases", d[e]["ours"]["edge_cases"], "| suggested right on flagged flips",
              d[e]["ours"]["labels"]["suggested_right_on_flagged_flips"], "| flagged", d[e]["ours"]["labels"]["flagged"],
              "| job", d[e]["ours"]["seconds"], "s")
