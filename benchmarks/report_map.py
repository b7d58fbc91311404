"""The report map's layout in a new process, as a run's map task sees it: umap-learn as it was
called before (its own neighbour search, numba functions compiled in every process) beside
the map as the job lays it out now (numba's on-disk cache for umap-learn, exact neighbours from
FAISS passed as ``precomputed_knn``), each with a cold numba cache and again warm.

    .venv/bin/python benchmarks/report_map.py                 # 2,600 and 20,000 points (~3 min)
    .venv/bin/python benchmarks/report_map.py --sizes 2600

Every cell is one fresh Python process (import included) over the same clustered 64-d points;
trustworthiness (sklearn, 10 neighbours) says whether the layouts are as faithful. Prints a
table and writes JSON (benchmarks/results/report_map.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, sys, time, warnings
t = time.perf_counter()
import numpy as np
warnings.simplefilter("ignore")
n, method = int(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(0)
centres = rng.normal(size=(12, 64)) * 2
x = (centres[rng.integers(0, 12, n)] + rng.normal(size=(n, 64))).astype(np.float32)
if method == "now":
    from curation.report.map import embed_2d
    xy, _ = embed_2d(x, "umap")
else:  # the call as it was before issue 34
    from sklearn.decomposition import PCA
    from umap import UMAP
    reduced = PCA(n_components=50, random_state=0).fit_transform(x)
    xy = UMAP(n_neighbors=15, min_dist=0.1, random_state=0, init="pca").fit_transform(reduced)
seconds = time.perf_counter() - t
from sklearn.manifold import trustworthiness
sample = np.random.default_rng(1).choice(n, min(n, 3000), replace=False)
print(json.dumps({"seconds": seconds, "trust": float(trustworthiness(x[sample], xy[sample], n_neighbors=10))}))
"""


def run(n: int, method: str, cache: str) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": cache, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", CHILD, str(n), method], env=env, capture_output=True, text=True,
                         check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2600, 20000])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "report_map.json"))
    args = parser.parse_args()
    results = []
    for n in args.sizes:
        for method in ("before", "now"):
            with tempfile.TemporaryDirectory() as cache:  # numba's cache: empty, then as the first run left it
                cold, warm = run(n, method, cache), run(n, method, cache)
            results.append({"points": n, "method": method, "cold_s": round(cold["seconds"], 1),
                            "warm_s": round(warm["seconds"], 1), "trustworthiness": round(warm["trust"], 3)})
    print(f"{'points':>7}  {'method':<7} {'cold s':>7} {'warm s':>7}  trust")
    for r in results:
        print(f"{r['points']:>7}  {r['method']:<7} {r['cold_s']:>7} {r['warm_s']:>7}  {r['trustworthiness']}")
    for n in args.sizes:
        before, now = [r for r in results if r["points"] == n]
        print(f"{n} points: now / before = {now['cold_s'] / before['cold_s']:.2f} cold, "
              f"{now['warm_s'] / before['warm_s']:.2f} warm")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
