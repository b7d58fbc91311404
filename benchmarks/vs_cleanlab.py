"""Our job vs cleanlab Datalab (label, outlier and near-duplicate issues) on the same
embeddings and labels: wall time, peak memory and label-issue AUROC, side by side.

N x d clustered embeddings (200 clusters -> 20 classes, 5% flipped labels, 1% near copies) are
written once; each tool then runs in its own subprocess (so peak RSS is its own): ours is the
whole job from ``input.embeddings`` (kNN graph, every score, the default selections, all
outputs); Datalab is ``find_issues(features=..., issue_types={label, outlier, near_duplicate})``.

    python benchmarks/vs_cleanlab.py --n 100000 --out benchmarks/results/vs-cleanlab.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def run_ours(data: str, work: str) -> dict:
    from curation.config import load_config
    from curation.job import run_job

    config = load_config(data={"input": {"embeddings": data}, "output": {"uri": os.path.join(work, "out")},
                               "selections": [{"name": "train", "mode": "representative", "budget": 1000},
                                              {"name": "label_review", "mode": "label_review", "budget": 1000}]})
    result = run_job(config)
    quality = result.samples["label_quality"].to_numpy(zero_copy_only=False).astype(np.float64)
    return {"label_score": np.nan_to_num(quality, nan=1.0).tolist(),
            "near_dup": result.samples["dup_of"].is_valid().to_numpy(zero_copy_only=False).tolist()}


def run_datalab(data: str, work: str) -> dict:
    import pyarrow.parquet as pq
    from cleanlab import Datalab

    table = pq.read_table(data)
    x = np.asarray(table["embedding"].combine_chunks().flatten().to_numpy(), np.float32).reshape(table.num_rows, -1)
    lab = Datalab(data={"label": table["label"].to_pylist()}, label_name="label", verbosity=0)
    lab.find_issues(features=x, issue_types={"label": {}, "outlier": {}, "near_duplicate": {}})
    return {"label_score": lab.get_issues("label")["label_score"].tolist(),
            "near_dup": lab.get_issues("near_duplicate")["is_near_duplicate_issue"].tolist()}


def child(tool: str, data: str, work: str, out: str) -> None:
    from benchmarks._common import PeakSampler

    with PeakSampler() as sampler:
        t = time.perf_counter()
        result = (run_ours if tool == "ours" else run_datalab)(data, work)
        result["seconds"] = time.perf_counter() - t
    result["peak_rss_gb"] = sampler.peak / 1e9
    with open(out, "w") as fh:
        json.dump(result, fh)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "curation-vs-cleanlab"))
    parser.add_argument("--out", default="benchmarks/results/vs-cleanlab.json")
    parser.add_argument("--child", nargs=3, metavar=("TOOL", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.work, args.child[2])
        return

    from sklearn.metrics import roc_auc_score

    from benchmarks._common import write_embeddings

    folder = os.path.join(args.work, f"emb-{args.n}")
    flipped, dup_src, dup_items = write_embeddings(folder, args.n, args.d, 200, 20, 0.05, 0.01)
    import pyarrow.parquet as pq

    single = os.path.join(args.work, f"emb-{args.n}.parquet")
    pq.write_table(pq.read_table(folder), single)
    planted_dup = np.zeros(args.n, bool)
    planted_dup[dup_items] = True
    rows = {}
    for tool in ("ours", "datalab"):
        out = os.path.join(args.work, f"{tool}.json")
        subprocess.run([sys.executable, __file__, "--work", args.work, "--child", tool, single, out], check=True)
        result = json.load(open(out))
        flagged = np.array(result["near_dup"], bool)
        rows[tool] = {
            "seconds": round(result["seconds"], 1), "peak_rss_gb": round(result["peak_rss_gb"], 2),
            "label_auroc": round(float(roc_auc_score(flipped, -np.array(result["label_score"]))), 4),
            "near_dup_flagged": int(flagged.sum()),
            "near_dup_recall": round(float((flagged & planted_dup).sum() / planted_dup.sum()), 4),
        }
        print(tool, json.dumps(rows[tool]), flush=True)
    ratio = {"speedup": round(rows["datalab"]["seconds"] / rows["ours"]["seconds"], 2),
             "memory_ratio": round(rows["ours"]["peak_rss_gb"] / max(rows["datalab"]["peak_rss_gb"], 1e-9), 2)}
    print(f"\n{'tool':<10}{'seconds':>10}{'peak GB':>10}{'label AUROC':>13}{'dup recall':>12}")
    for tool, r in rows.items():
        print(f"{tool:<10}{r['seconds']:>10}{r['peak_rss_gb']:>10}{r['label_auroc']:>13}{r['near_dup_recall']:>12}")
    print(f"ours is {ratio['speedup']}x faster; memory ours/datalab = {ratio['memory_ratio']}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"machine": f"{os.cpu_count()} CPUs", "n": args.n, "d": args.d, **rows, **ratio}, fh, indent=1)


if __name__ == "__main__":
    main()
