"""End to end from precomputed embeddings: index + scores + selections + outputs at scale.

Writes N x d clustered, L2-normalised embeddings with labels (clusters map to classes; a
share of labels flipped; a share of near-duplicate vectors) as Parquet, runs the job with
``input.embeddings`` (the sharded IVF path above ``knn.exact_below``), and reports wall time,
stage timings from run.json, peak RSS of the whole process tree, and how well the planted
label flips and near duplicates were found. Prints a table and writes JSON.

    python benchmarks/e2e_embeddings.py --n 1000000 --out benchmarks/results/e2e-1m.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from benchmarks._common import PeakSampler, write_embeddings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=200)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--flip", type=float, default=0.05)
    parser.add_argument("--dups", type=float, default=0.01)
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "curation-bench-e2e"))
    parser.add_argument("--out", default="benchmarks/results/e2e-embeddings.json")
    args = parser.parse_args()

    from sklearn.metrics import roc_auc_score

    from curation.config import load_config
    from curation.job import run_job

    data = os.path.join(args.work, f"emb-{args.n}-{args.d}")
    t = time.perf_counter()
    flipped, dup_src, dup_items = write_embeddings(data, args.n, args.d, args.clusters, args.classes, args.flip, args.dups)
    print(f"wrote {args.n} x {args.d} embeddings in {time.perf_counter() - t:.0f}s", flush=True)
    config = load_config(data={
        "input": {"embeddings": data},
        "selections": [{"name": "train", "mode": "representative", "budget": 10_000},
                       {"name": "edge_cases", "mode": "edge_cases", "budget": 1000},
                       {"name": "label_review", "mode": "label_review", "budget": 5000},
                       {"name": "clean", "mode": "clean"}],
        "output": {"uri": os.path.join(args.work, "out")},
        "ray": {"object_store_memory": 2 * 1024**3},
    })
    with PeakSampler() as sampler:
        t = time.perf_counter()
        result = run_job(config)
        wall = time.perf_counter() - t
    samples = result.samples
    quality = np.nan_to_num(samples["label_quality"].to_numpy(zero_copy_only=False).astype(np.float64), nan=1.0)
    auroc = roc_auc_score(flipped, -quality)
    groups = samples["dup_group"].to_numpy(zero_copy_only=False)
    found = np.mean([groups[a] == groups[b] and groups[a] == groups[a] for a, b in zip(dup_src, dup_items)])
    row = {"n": args.n, "d": args.d, "wall_s": round(wall, 1), "peak_rss_gb": round(sampler.peak / 1e9, 2),
           "knn": result.run_info["knn"].get("method"), "timings_s": result.run_info["timings_s"],
           "label_flip_auroc": round(float(auroc), 4), "near_duplicate_recall": round(float(found), 4),
           "suspected_mislabels": result.run_info["flags"]["is_suspected_mislabel"], "planted_flips": int(flipped.sum())}
    print(json.dumps(row, indent=1))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"machine": f"{os.cpu_count()} CPUs, no GPU", **row}, fh, indent=1)
    print(f"\n{'n':>10} {'wall_s':>8} {'peak_rss_gb':>12} {'flip_auroc':>11} {'dup_recall':>11}")
    print(f"{args.n:>10} {row['wall_s']:>8} {row['peak_rss_gb']:>12} {row['label_flip_auroc']:>11} {row['near_duplicate_recall']:>11}")


if __name__ == "__main__":
    main()
