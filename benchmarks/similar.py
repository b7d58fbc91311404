"""`curation similar` against a large published run: load time and per-query latency, from local
disk and from the test S3 server, beside exact brute-force search over the same vectors.

Night 1 is a real run of the job (``input.embeddings``, N x d clustered vectors, the sharded IVF
path with its index saved), made once under ``--work`` and reused. Then, side by side in one
process:

* ``RunSearch`` opened from local disk, and from S3 (the run's files and the input vectors
  uploaded to a SeaweedFS server on 127.0.0.1, ``run.json``'s locations pointed there);
* single-item queries (``--uri``, k = 20): median and p95 latency, and the recall@10 of the
  hits against exact search;
* the same with a ``--where`` that leaves one class (searched exactly over its members);
* exact brute-force search over all N vectors in memory (the baseline).

    python benchmarks/similar.py --n 1000000 --out benchmarks/results/similar-1m.json
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

from benchmarks._common import write_embeddings  # noqa: E402


def make_run(work: str, n: int, d: int) -> str:
    from curation.config import load_config
    from curation.job import run_job

    out = os.path.join(work, "out")
    if os.path.exists(os.path.join(out, "latest")):
        print(f"reusing the run under {out}", flush=True)
        return out
    data = os.path.join(work, f"emb-{n}-{d}")
    t = time.perf_counter()
    write_embeddings(data, n, d, clusters=200, classes=20, flip=0.05, dups=0.01)
    print(f"wrote {n} x {d} embeddings in {time.perf_counter() - t:.0f}s", flush=True)
    config = load_config(data={"input": {"embeddings": data}, "output": {"uri": out},
                               "selections": [{"name": "label_review", "mode": "label_review", "budget": 100}],
                               "report": {"map_method": "pca"}, "ray": {"object_store_memory": 2 * 1024**3}})
    t = time.perf_counter()
    run_job(config)
    print(f"night 1 (the job) took {time.perf_counter() - t:.0f}s", flush=True)
    return out


def measure(search, queries: list[str], truth_ids: np.ndarray | None, where: str | None = None) -> dict:
    latencies, hits_all = [], []
    for uri in queries:
        t = time.perf_counter()
        hits = search.by_uri([uri], k=20, where=where)
        latencies.append(time.perf_counter() - t)
        hits_all.append(hits["uri"].to_pylist())
    out = {"median_ms": round(1000 * float(np.median(latencies)), 2),
           "p95_ms": round(1000 * float(np.percentile(latencies, 95)), 2)}
    if truth_ids is not None:
        uris = search.samples["uri"]
        recall = [len(set(h[:10]) & {uris[int(i)].as_py() for i in t[:10]}) / 10 for h, t in zip(hits_all, truth_ids)]
        out["recall_at_10_vs_exact"] = round(float(np.mean(recall)), 4)
    return out


def upload(s3, local_out: str, run_id: str, info: dict) -> str:
    """The run (run.json, samples, index) and its input vectors into a bucket; returns the output URI."""
    fs = s3.pyarrow_fs()
    fs.create_dir("bench")
    files = []
    for folder, _, names in os.walk(os.path.join(local_out, run_id)):
        if os.path.basename(folder) in ("knn", "selections", "diff", "index-copies"):
            continue
        files += [os.path.join(folder, name) for name in names if not name.endswith(".html")]
    for path in files:
        key = "bench/out/" + os.path.relpath(path, local_out)
        with open(path, "rb") as src, fs.open_output_stream(key) as dst:
            while chunk := src.read(64 << 20):
                dst.write(chunk)
    vectors = []
    for path in info["knn"]["vectors"]["files"]:
        key = "bench/input/" + os.path.basename(path)
        with open(path, "rb") as src, fs.open_output_stream(key) as dst:
            while chunk := src.read(64 << 20):
                dst.write(chunk)
        vectors.append("s3://" + key)
    info = dict(info, knn=dict(info["knn"], vectors=dict(info["knn"]["vectors"], files=vectors),
                               saved_to=f"s3://bench/out/{run_id}/index"))
    with fs.open_output_stream(f"bench/out/{run_id}/run.json") as fh:
        fh.write(json.dumps(info).encode())
    with fs.open_output_stream("bench/out/latest") as fh:
        fh.write(json.dumps({"run_id": run_id}).encode())
    return "s3://bench/out"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 side")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "curation-bench-similar"))
    parser.add_argument("--out", default="benchmarks/results/similar.json")
    args = parser.parse_args()

    import faiss

    from curation.similar import RunSearch

    out = make_run(args.work, args.n, args.d)
    rows = {}
    t = time.perf_counter()
    local = RunSearch(out)
    rows["local"] = {"load_s": round(time.perf_counter() - t, 2), "method": local.method}
    rng = np.random.default_rng(0)
    picks = np.sort(rng.choice(local.n, args.queries, replace=False))
    queries = local.samples["uri"].take(picks).to_pylist()

    # The baseline: exact search over every vector in memory (read once, not timed as load).
    _, x = local.vectors.read_all(0, local.n)
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    truth, latencies = [], []
    for i in picks:
        t = time.perf_counter()
        _, ids = exact.search(x[i:i + 1], 21)
        latencies.append(time.perf_counter() - t)
        truth.append([j for j in ids[0] if j != i][:20])
    rows["exact brute force (in memory)"] = {"median_ms": round(1000 * float(np.median(latencies)), 2),
                                             "p95_ms": round(1000 * float(np.percentile(latencies, 95)), 2)}
    del exact, x
    rows["local"].update(measure(local, queries, np.array(truth)))
    label = local.samples["label"][int(picks[0])].as_py()
    rows["local, --where one class"] = measure(local, queries[:20], None, where=f"label == '{label}'")
    info = local.info.to_dict()
    run_id = local.info.run_id
    del local

    if not args.no_s3:
        from curation.config import StorageConfig
        from curation.io.filesystem import Resolver
        from testkit.s3server import S3Server

        with S3Server() as s3:
            t = time.perf_counter()
            uri = upload(s3, out, run_id, info)
            print(f"uploaded to S3 in {time.perf_counter() - t:.0f}s", flush=True)
            resolver = Resolver(StorageConfig(**s3.storage()))
            t = time.perf_counter()
            remote = RunSearch(uri, resolver=resolver)
            rows["S3"] = {"load_s": round(time.perf_counter() - t, 2), "method": remote.method}
            rows["S3"].update(measure(remote, queries, np.array(truth)))

    print(f"\n{'where':<32} {'load_s':>7} {'median_ms':>10} {'p95_ms':>8} {'recall@10':>10}")
    for name, row in rows.items():
        print(f"{name:<32} {row.get('load_s', '-'):>7} {row['median_ms']:>10} {row['p95_ms']:>8} "
              f"{row.get('recall_at_10_vs_exact', '-'):>10}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"machine": f"{os.cpu_count()} CPUs, no GPU", "n": args.n, "d": args.d, "queries": args.queries,
                   "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
