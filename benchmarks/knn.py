"""kNN benchmark: our sharded index vs exact FAISS all-pairs on the same synthetic embeddings.

Synthetic clustered embeddings (Gaussian clusters, L2-normalised). For each N: exact
``IndexFlatIP`` all-pairs kNN (timed on all queries, or on a query sample and extrapolated
when ``--exact-sample`` is set), then our ``knn_graph`` (training + adding + searching over Ray
shard actors) side by side, recall@k against exact, and the speed ratio. Also a 1/2/4-shard
sweep with time and peak memory per shard. Prints a table and writes JSON.

    python benchmarks/knn.py --n 200000 --shards 1 2 4 --out benchmarks/results/knn.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def clustered(n: int, d: int, clusters: int, seed: int = 0, spread: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, d)).astype(np.float32)
    x = centers[rng.integers(clusters, size=n)]
    x += spread * rng.normal(size=(n, d)).astype(np.float32) * np.float32(1.0)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def exact_graph(x: np.ndarray, k: int, sample: int | None):
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    queries = np.arange(len(x)) if not sample else np.sort(np.random.default_rng(1).choice(len(x), sample, replace=False))
    t = time.perf_counter()
    ids = np.empty((len(queries), k + 1), np.int64)
    sims = np.empty((len(queries), k + 1), np.float32)
    for start in range(0, len(queries), 8192):
        sims[start:start + 8192], ids[start:start + 8192] = index.search(x[queries[start:start + 8192]], k + 1)
    elapsed = time.perf_counter() - t
    return ids, elapsed * len(x) / len(queries), queries, sims


def compare_scores(x: np.ndarray, exact_ids: np.ndarray, exact_sims: np.ndarray, graph, k: int) -> dict:
    """Run every score on the exact graph and on ours (labels: cluster-derived, 5% flipped) and
    report how much the scores move."""
    import pyarrow as pa
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    from curation.config import ScoresConfig
    from curation.index.knn import KnnGraph
    from curation.index.knn import drop_self
    from curation.scores import run_scores
    from curation.scores.clusters import cluster_vectors

    n = len(x)
    rng = np.random.default_rng(7)
    labels, _, _, _ = cluster_vectors(x, 20)  # classes = 20 coarse regions of the embedding space
    flipped = rng.random(n) < 0.05
    labels = labels.astype(np.int64)
    labels[flipped] = (labels[flipped] + rng.integers(1, 20, flipped.sum())) % 20
    sims, ids = drop_self(exact_sims, exact_ids, np.arange(n), k)
    exact = KnnGraph(ids, sims)
    samples = pa.table({
        "input_id": np.arange(n, dtype=np.int64), "uri": [str(i) for i in range(n)], "label": [str(v) for v in labels],
        "status": ["ok"] * n, "reason": pa.nulls(n, pa.string()), "width": np.ones(n, np.int32), "height": np.ones(n, np.int32),
        "brightness": np.full(n, np.nan, np.float32), "contrast": np.full(n, np.nan, np.float32),
        "sharpness": np.full(n, np.nan, np.float32), "content_hash": pa.nulls(n, pa.string()),
        "pixel_hash": pa.nulls(n, pa.string()), "phash": np.zeros(n, np.int64)})
    a = run_scores(samples, x, exact, ScoresConfig())[0].to_pandas()
    b = run_scores(samples, x, graph, ScoresConfig())[0].to_pandas()
    sus_a, sus_b = set(np.flatnonzero(a.is_suspected_mislabel)), set(np.flatnonzero(b.is_suspected_mislabel))
    return {
        "sparseness_spearman": round(float(spearmanr(a.sparseness, b.sparseness).statistic), 5),
        "label_quality_mean_abs_diff": round(float(np.abs(a.label_quality - b.label_quality).mean()), 5),
        "label_auroc_exact": round(float(roc_auc_score(flipped, -a.label_quality)), 4),
        "label_auroc_ours": round(float(roc_auc_score(flipped, -b.label_quality)), 4),
        "suspected_mislabel_jaccard": round(len(sus_a & sus_b) / max(1, len(sus_a | sus_b)), 4),
        "duplicates_not_kept_exact": int(a.dup_of.notna().sum()), "duplicates_not_kept_ours": int(b.dup_of.notna().sum()),
    }


TEMP_FOLDERS: list[str] = []


def to_parquet(x: np.ndarray):
    """Write the vectors as the job writes the run's embeddings, so shards stream them from disk."""
    import tempfile

    import pyarrow as pa

    from curation.index.source import VectorParts, parquet_parts
    from curation.io.filesystem import resolve
    from testkit.vectors import write_embeddings

    folder = resolve(tempfile.mkdtemp(prefix="knn-bench-"))
    TEMP_FOLDERS.append(folder.path)
    n, d = x.shape
    samples = pa.table({"uri": pa.array([str(i) for i in range(n)]), "status": pa.array(["ok"] * n),
                        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), d)})
    return VectorParts(parquet_parts(write_embeddings(folder, samples, model_id="bench", store_dtype="float32")))


def idle_shard_rss(d: int) -> int:
    """Peak RSS of a shard actor holding an empty index: the Ray worker, Python, FAISS and numpy,
    which every shard pays whatever its partition (so per-shard memory is this + a share)."""
    import faiss
    import ray

    from curation.index.shard import IndexShard

    blob = faiss.serialize_index(faiss.IndexFlatIP(d))
    actor = ray.remote(num_cpus=1)(IndexShard).remote(blob)
    rss = ray.get(actor.memory_bytes.remote())
    ray.kill(actor)
    return rss


def recall_at_k(graph_ids: np.ndarray, exact_ids: np.ndarray, queries: np.ndarray, k: int) -> float:
    hits = 0
    for row, q in enumerate(queries):
        truth = [i for i in exact_ids[row] if i != q][:k]
        hits += len(set(truth) & set(graph_ids[q][:k].tolist()))
    return hits / (len(queries) * k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[200_000])
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--nprobe", type=int, default=0)
    parser.add_argument("--exact-sample", type=int, default=0, help="time exact search on this many queries and extrapolate")
    parser.add_argument("--codec", default="auto", help="knn.codec: auto | flat | sq8 | pq-fastscan")
    parser.add_argument("--query-batch", type=int, default=16384, help="knn.query_batch: queries per fan-out")
    parser.add_argument("--spread", type=float, default=1.0,
                        help="within-cluster noise (larger = harder for IVF: neighbours spill across lists)")
    parser.add_argument("--driver-vectors", action="store_true",
                        help="send vectors from the driver instead of letting shards stream them from Parquet")
    parser.add_argument("--compare-scores", action="store_true",
                        help="also run every score on the exact and on our graph and compare them")
    parser.add_argument("--out", default="benchmarks/results/knn.json")
    args = parser.parse_args()

    import ray

    from curation.config import KnnConfig
    from curation.index.sharded import knn_graph

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    baseline = idle_shard_rss(args.d)
    rows = []
    for n in args.n:
        x = clustered(n, args.d, args.clusters, spread=args.spread)
        source = None if args.driver_vectors else to_parquet(x)
        exact_ids, exact_s, queries, exact_sims = exact_graph(x, args.k, args.exact_sample or None)
        for shards in args.shards:
            t = time.perf_counter()
            graph, info = knn_graph(x, KnnConfig(k=args.k, index="ivf", shards=shards, nprobe=args.nprobe,
                                                      query_batch=args.query_batch, codec=args.codec),
                                    source=source)
            ours_s = time.perf_counter() - t
            rec = recall_at_k(graph.ids, exact_ids, queries, args.k)
            rss = info.get("shard_peak_rss_bytes") or [0]
            rows.append({"n": n, "d": args.d, "shards": shards, "index": f"IVF{info['nlist']},{info['codec']}",
                         "nprobe": info["nprobe"], "exact_s": round(exact_s, 1), "ours_s": round(ours_s, 1),
                         "speedup": round(exact_s / ours_s, 2), "recall@k": round(rec, 4),
                         "train_s": info["train_s"], "add_s": info["add_s"], "search_s": info["search_s"],
                         "peak_rss_per_shard_gb": round(max(rss) / 1e9, 2),
                         "above_idle_shard_gb": round((max(rss) - baseline) / 1e9, 2),
                         "private_per_shard_gb": round(max(info.get("shard_private_bytes") or [0]) / 1e9, 2),
                         "vectors_from": info.get("add_from", ""), "spread": args.spread,
                         "exact_extrapolated": bool(args.exact_sample)})
            if args.compare_scores and not args.exact_sample:
                rows[-1]["scores_vs_exact"] = compare_scores(x, exact_ids, exact_sims, graph, args.k)
            print(json.dumps(rows[-1]), flush=True)
    ray.shutdown()
    import shutil

    for folder in TEMP_FOLDERS:  # hundreds of MB each
        shutil.rmtree(folder, ignore_errors=True)
    cols = ["n", "shards", "index", "nprobe", "exact_s", "ours_s", "speedup", "recall@k", "peak_rss_per_shard_gb",
            "above_idle_shard_gb", "private_per_shard_gb"]
    print("\n" + "  ".join(f"{c:>12}" for c in cols))
    for r in rows:
        print("  ".join(f"{str(r[c]):>12}" for c in cols))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"machine": f"{os.cpu_count()} CPUs", "idle_shard_rss_gb": round(baseline / 1e9, 3), "rows": rows},
                  fh, indent=1)


if __name__ == "__main__":
    main()
