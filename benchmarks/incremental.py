"""Two nights from precomputed embeddings: what night 2 costs when it updates night 1's graph,
beside the same night 2 built whole, in one process.

Night 1: N x d clustered vectors (``_common.write_embeddings``), the sharded IVF path. Night 2:
1% of the items deleted, 1% changed (same uri, a fresh vector from the same clusters), 5% new.
Night 2 runs twice on the same output: with ``knn.incremental: auto`` (the update) and with
``knn.incremental: off`` (a full recompute). Reported: wall time per phase of the three runs,
the update's share of night 1, the kNN graph's neighbour-slot recall of the update against the
full recompute, and how many items get the same flags and the same selections.

    python benchmarks/incremental.py --n 1000000 --out benchmarks/results/incremental-1m.json

``--images N`` runs the same two nights in images mode (the embedding store on, ``thumbnail``
embedder): CIFAR-10 photos of ``../shared/data`` and, past them, the demo's scenes at 64 px;
night 2 deletes 1% of the files, rewrites 1% in place (another picture of the same kind under
the same name) and adds 5% new files, photos and scenes in night 1's proportions (photos held
back from night 1), as a night of the same stream. ``--shifted`` makes every rewritten and new
file a scene instead: a night whose arrivals differ from what the index was trained on.

    python benchmarks/incremental.py --images 100000 --out benchmarks/results/incremental-images-100k.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from benchmarks._common import write_embeddings  # noqa: E402

PHASES = ("read_embeddings", "decode_embed", "copy_stored", "knn", "scores", "drift", "selections", "report_data", "write_outputs", "total")


def night_two(night1: str, night2: str, seed: int = 1) -> None:
    """Night 2's files from night 1's: 1% deleted, 1% changed, 5% new (the same clusters)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    os.makedirs(night2, exist_ok=True)
    files = sorted(glob.glob(os.path.join(night1, "*.parquet")))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    n = table.num_rows
    d = table.schema.field("embedding").type.list_size
    x = table["embedding"].combine_chunks().flatten().to_numpy().reshape(n, d).copy()
    labels = table["label"].to_numpy(zero_copy_only=False)
    uris = table["uri"].to_pylist()
    order = rng.permutation(n)
    deleted, changed = order[: n // 100], order[n // 100: n // 50]

    def fresh(count):  # near another item of the same cluster (its label too)
        src = rng.integers(n, size=count)
        v = x[src] + 0.5 * rng.normal(size=(count, d)).astype(np.float32) / np.sqrt(d)
        return v / np.linalg.norm(v, axis=1, keepdims=True), labels[src]

    x[changed], labels[changed] = fresh(len(changed))
    keep = np.ones(n, bool)
    keep[deleted] = False
    new_x, new_labels = fresh(n // 20)
    x2 = np.concatenate([x[keep], new_x]).astype(np.float32)
    labels2 = np.concatenate([labels[keep], new_labels])
    uris2 = [u for u, k in zip(uris, keep) if k] + [f"new-{i}" for i in range(len(new_x))]
    chunk = 100_000
    for part, start in enumerate(range(0, len(x2), chunk)):
        stop = min(start + chunk, len(x2))
        pq.write_table(pa.table({
            "uri": uris2[start:stop], "label": pa.array(labels2[start:stop]),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x2[start:stop].ravel()), d)}),
            os.path.join(night2, f"part-{part:05d}.parquet"))


def _scene(path: str, seed: int) -> None:
    from curation.demo import CLASSES, render_scene

    names = list(CLASSES)
    rng = np.random.default_rng(seed)
    render_scene(names[seed % len(names)], rng, size=64).save(path, "JPEG", quality=90)


def _scenes(jobs: list[tuple[str, int]]) -> None:
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(os.cpu_count()) as pool:
        pool.starmap(_scene, jobs, chunksize=256)


def image_nights(work: str, n: int, shifted: bool = False) -> tuple[str, str]:
    """Night 1's and night 2's manifests (``uri, label, fingerprint``) over JPEG files in ``work``."""
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from curation.demo import CLASSES

    names = list(CLASSES)
    files = os.path.join(work, "files")
    os.makedirs(files, exist_ok=True)
    data = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "cifar10")
    uris, labels = [], []
    for split in ("train", "test"):
        shutil.rmtree(os.path.join(files, split), ignore_errors=True)  # a run before rewrote some
        with tarfile.open(os.path.join(data, f"{split}.tar.gz")) as tar:
            tar.extractall(files)
        for label in sorted(os.listdir(os.path.join(files, split))):
            for name in sorted(os.listdir(os.path.join(files, split, label))):
                uris.append(os.path.join(files, split, label, name))
                labels.append(label)
    new, changed_count = n // 20, n // 100
    photo_share = 0.0 if shifted else min(len(uris), n) / n
    # Photos night 1 does not see: night 2's new photos, and the pictures rewritten photos get.
    held = int(round((new + changed_count) * photo_share))
    rng = np.random.default_rng(2)
    order = rng.permutation(len(uris))
    night1_photos = np.sort(order[:min(len(uris), n) - held])
    spare = order[min(len(uris), n) - held:min(len(uris), n)]
    new_photos, spare_photos = spare[:int(round(new * photo_share))], list(spare[int(round(new * photo_share)):])
    photo_uris, photo_labels = uris, labels
    uris, labels = [photo_uris[i] for i in night1_photos], [photo_labels[i] for i in night1_photos]
    extra = n - len(uris)
    new_scenes = new - len(new_photos)
    os.makedirs(os.path.join(files, "scenes"), exist_ok=True)
    jobs = [(os.path.join(files, "scenes", f"{i:07d}.jpg"), i) for i in range(extra + new_scenes)]
    _scenes([job for job in jobs if not os.path.exists(job[0])])
    uris += [path for path, _ in jobs[:extra]]
    labels += [names[i % len(names)] for _, i in jobs[:extra]]

    def fingerprints(paths):  # what a manifest carries for the store to see an unchanged file
        return [f"{os.stat(p).st_size}-{os.stat(p).st_mtime_ns}" for p in paths]

    night1 = os.path.join(work, "night1.parquet")
    pq.write_table(pa.table({"uri": uris, "label": labels, "fingerprint": fingerprints(uris)}), night1)
    rng = np.random.default_rng(1)
    order = rng.permutation(n)
    deleted, changed = set(order[: n // 100].tolist()), order[n // 100: n // 50]
    # Rewritten in place: another picture under the same name, of the same kind (a held-back
    # photo for a photo while they last, else a scene), labelled as such.
    for j, i in enumerate(changed):
        if "/scenes/" not in uris[i] and spare_photos:
            source = spare_photos.pop()
            shutil.copyfile(photo_uris[source], uris[i])
            labels[i] = photo_labels[source]
        else:
            seed = 10_000_000 + j
            _scene(uris[i], seed)
            labels[i] = names[seed % len(names)]
    keep = [i for i in range(n) if i not in deleted]
    night2 = os.path.join(work, "night2.parquet")
    uris2 = ([uris[i] for i in keep] + [photo_uris[i] for i in new_photos] + [path for path, _ in jobs[extra:]])
    labels2 = ([labels[i] for i in keep] + [photo_labels[i] for i in new_photos]
               + [names[i % len(names)] for _, i in jobs[extra:]])
    pq.write_table(pa.table({"uri": uris2, "label": labels2, "fingerprint": fingerprints(uris2)}), night2)
    return night1, night2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "curation-bench-incremental"))
    parser.add_argument("--out", default="benchmarks/results/incremental.json")
    parser.add_argument("--images", type=int, default=0, help="images mode at this many files (see above)")
    parser.add_argument("--shifted", action="store_true",
                        help="images mode: night 2's new and rewritten files are all scenes (see above)")
    parser.add_argument("--again", action="store_true",
                        help="keep --work's night 1 and night-2 input; run both night 2s again")
    args = parser.parse_args()

    import pyarrow.parquet as pq

    from curation.config import load_config
    from curation.job import run_job

    if args.images:
        args.work = args.work + "-images"
    data = os.path.join(args.work, "input")
    out = os.path.join(args.work, "out")
    night2_manifest = None
    if args.images:
        shutil.rmtree(out, ignore_errors=True)
        night1_manifest, night2_manifest = image_nights(args.work, args.images, args.shifted)
        data = os.path.join(args.work, "manifest.parquet")
        shutil.copy(night1_manifest, data)
    elif not args.again:
        shutil.rmtree(args.work, ignore_errors=True)
        write_embeddings(os.path.join(args.work, "night1"), args.n, args.d, 200, 20, 0.05, 0.01)
        shutil.copytree(os.path.join(args.work, "night1"), data)

    def run(run_id, incremental):
        source = ({"manifest": data} if args.images else {"embeddings": data})
        config = load_config(data={
            "input": source, "output": {"uri": out, "run_id": run_id},
            **({"embedder": {"model": "thumbnail"}} if args.images else {}),
            "knn": {"incremental": incremental},
            "selections": [{"name": "train", "mode": "representative", "budget": 10_000},
                           {"name": "label_review", "mode": "label_review", "budget": 5000},
                           {"name": "clean", "mode": "clean"}],
            "ray": {"object_store_memory": 2 * 1024**3}})
        t = time.perf_counter()
        result = run_job(config)
        print(f"{run_id}: {time.perf_counter() - t:.0f}s {result.info.knn.incremental}", flush=True)
        return result

    if args.again and not args.images:  # night 1 as it was; `latest` back to it
        from curation.job import RunResult
        from curation.run_info import RunInfo
        from curation.io.filesystem import Resolver

        for name in ("night-2", "night-2-whole"):
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)
        with open(os.path.join(out, "latest"), "w") as fh:
            json.dump({"run_id": "night-1"}, fh)
        location = Resolver().resolve(os.path.join(out, "night-1"))
        first = RunResult("night-1", location.uri, None, RunInfo.read(location))
    else:
        first = run("night-1", "auto")
        if args.images:
            shutil.copy(night2_manifest, data)
        else:
            shutil.rmtree(data)
            night_two(os.path.join(args.work, "night1"), data)
    update = run("night-2", "auto")
    # The same night 2 built whole; `latest` now names night-2, so it is not the previous run
    # the update used, and it does not matter here: nothing is reused with incremental off.
    whole = run("night-2-whole", "off")

    def graph(result):
        table = pq.read_table(os.path.join(result.run_uri, "knn")).sort_by("input_id")
        return table["neighbor_ids"].to_pylist()

    mine, theirs = graph(update), graph(whole)
    slots = sum(len(b) for b in theirs)
    recall = sum(len(set(a) & set(b)) for a, b in zip(mine, theirs)) / max(slots, 1)
    s_mine = pq.read_table(os.path.join(update.run_uri, "samples")).sort_by("input_id")
    s_theirs = pq.read_table(os.path.join(whole.run_uri, "samples")).sort_by("input_id")
    flag_columns = [c for c in s_mine.column_names if c.startswith("is_")]
    same_flags = np.ones(s_mine.num_rows, bool)
    flags_differ = {}
    for c in flag_columns:
        a = s_mine[c].fill_null(False).to_numpy(zero_copy_only=False)
        b = s_theirs[c].fill_null(False).to_numpy(zero_copy_only=False)
        same_flags &= a == b
        flags_differ[c] = {"updated_only": int((a & ~b).sum()), "whole_only": int((~a & b).sum()),
                           "both": int((a & b).sum())}
    selections = {}
    for name in ("train", "label_review", "clean"):
        a = set(pq.read_table(os.path.join(update.run_uri, "selections", f"{name}.parquet"))["uri"].to_pylist())
        b = set(pq.read_table(os.path.join(whole.run_uri, "selections", f"{name}.parquet"))["uri"].to_pylist())
        selections[name] = round(len(a & b) / max(len(b), 1), 4)
    timings = {name: {phase: r.info.timings_s.get(phase) for phase in PHASES}
               for name, r in (("night 1", first), ("night 2, updated", update), ("night 2, whole", whole))}
    row = {"n": args.images or args.n, "d": args.d if not args.images else "thumbnail", "mode": "images" if args.images else "embeddings",
           "timings_s": timings,
           "update_share_of_night_1": round(timings["night 2, updated"]["total"] / timings["night 1"]["total"], 3),
           "update_knn_share_of_night_1_knn": round(timings["night 2, updated"]["knn"] / timings["night 1"]["knn"], 3),
           "knn_slot_recall_vs_whole": round(recall, 4), "same_flags": round(float(same_flags.mean()), 5),
           "flags_differ": flags_differ, "selection_overlap_vs_whole": selections,
           "nprobe": {name: r.info.knn.nprobe for name, r in (("night 1", first), ("night 2, whole", whole))},
           "nprobe_calibration": first.info.knn.to_dict().get("nprobe_calibration"), "incremental": update.info.knn.to_dict().get("incremental"),
           "knn_night_2": {k: update.info.knn.to_dict().get(k) for k in ("method", "add_s", "search_s", "searched")}}
    print(f"\n{'phase':<16}" + "".join(f"{name:>18}" for name in timings))
    for phase in PHASES:
        print(f"{phase:<16}" + "".join(f"{(t.get(phase) or 0):>18.1f}" for t in timings.values()))
    print(f"\nnight 2 updated / night 1: {row['update_share_of_night_1']}; kNN: {row['update_knn_share_of_night_1_knn']}; "
          f"slot recall vs whole: {row['knn_slot_recall_vs_whole']}; same flags: {row['same_flags']}; "
          f"selection overlap: {selections}")
    print("flags that differ:", {c: v for c, v in flags_differ.items() if v["updated_only"] or v["whole_only"]})
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"machine": f"{os.cpu_count()} CPUs, no GPU", **row}, fh, indent=1)


if __name__ == "__main__":
    main()
