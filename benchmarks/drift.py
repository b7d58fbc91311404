"""Drift between nights on real photos: false alarms and detections with the default rules.

For each set and seed: night 1 is 6,000 items of nine classes (the tenth held out); night 2
keeps 95% of them and adds 300 new items, in one of four scenarios:

* ``same``: the new items come from the same nine classes (no alarm is right);
* ``unseen 5%``: all 300 new items are of the held-out class;
* ``unseen 1%``: 60 of them are (the other 240 as in ``same``);
* ``shifted mix``: 900 new items, all of one of the nine classes (its share grows ~10 points).

Each pair runs what the job runs (:mod:`curation.drift`: ``build_profile``,
``find_new_regions``, ``compare`` with ``DriftConfig()`` defaults; clusters and the exact kNN
graph as the job makes them below ``knn.exact_below``). Reported per set and scenario: the
share of nights alarmed, which rules fired, and for the unseen class the share of its items
that land in a new region of at least ``alarm_region_items`` items (recall) and the share of
those regions' items that are of it (precision).

    python benchmarks/drift.py --seeds 10 --out benchmarks/results/drift.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import active_learning as al  # noqa: E402

SCENARIOS = ("same", "unseen 5%", "unseen 1%", "shifted mix")
NIGHT = 6000
NEW = 300


def night_samples(x, labels, uris, centroids):
    from curation.index.knn import exact_knn
    from curation.scores.clusters import assign

    cluster, _ = assign(None, x, centroids)
    samples = pa.table({"uri": uris, "label": [str(v) for v in labels], "status": ["ok"] * len(x),
                        "vector_id": pa.array(np.arange(len(x)), pa.int64()),
                        "cluster": pa.array(cluster, pa.int32())})
    return samples, exact_knn(x, 10)


def one_pair(x, y, seed: int, scenario: str) -> dict:
    from curation.config import DriftConfig
    from curation.drift import build_profile, compare, find_new_regions
    from curation.scores.clusters import choose_n_clusters, train_centroids

    config = DriftConfig()
    rng = np.random.default_rng(seed)
    held = seed % (int(y.max()) + 1)
    known = rng.permutation(np.flatnonzero(y != held))
    unseen = rng.permutation(np.flatnonzero(y == held))
    first_ids, pool = known[:NIGHT], known[NIGHT:]
    centroids = train_centroids(x[first_ids], choose_n_clusters(NIGHT))
    s1, g1 = night_samples(x[first_ids], y[first_ids], [f"i{i}" for i in first_ids], centroids)
    first, _ = build_profile(s1, x[first_ids], g1, model_id="m", sample_size=config.sample_size)
    kept = np.sort(rng.choice(first_ids, int(0.95 * NIGHT), replace=False))
    if scenario == "same":
        new = pool[:NEW]
    elif scenario == "unseen 5%":
        new = unseen[:NEW]
    elif scenario == "unseen 1%":
        new = np.concatenate([unseen[:60], pool[:NEW - 60]])
    else:
        grow = y[first_ids[0]]
        new = pool[y[pool] == grow][:NEW * 3]
    ids = np.concatenate([kept, new])
    s2, g2 = night_samples(x[ids], y[ids], [f"i{i}" for i in ids], centroids)
    second, on_previous = build_profile(s2, x[ids], g2, model_id="m", sample_size=config.sample_size,
                                        previous_centroids=first.centroids)
    is_new = np.r_[np.zeros(len(kept), bool), np.ones(len(new), bool)]
    regions, members, region, _ = find_new_regions(g2, is_new, first.kth_similarity, x[ids],
                                                  nearest_similarity=first.nearest_similarity,
                                               previous_centroids=first.centroids)
    new_x = x[ids][is_new][: config.sample_size]
    drift = compare(first, second, config, on_previous=on_previous, regions=regions, new_sample=new_x)
    sizes = np.bincount(region) if len(region) else np.zeros(0, np.int64)
    in_big = members[np.isin(region, np.flatnonzero(sizes >= config.alarm_region_items))]
    planted = set(np.flatnonzero(np.isin(ids, unseen)).tolist())
    out = {"alarm": drift["alarm"], "rules": [r.split(":")[0].split(" (")[0] for r in drift["rules_fired"]],
           "mmd_p": drift["mmd"]["p_value"], "mmd_new_p": (drift.get("mmd_new_items") or {}).get("p_value"),
           "far": regions.get("far_items", 0), "crowded": regions.get("crowded_items", 0)}
    if planted:
        out["region_recall"] = len(planted & set(in_big.tolist())) / len(planted)
        out["region_precision"] = (len(planted & set(in_big.tolist())) / len(in_big)) if len(in_big) else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--sets", default="cifar,cifar-thumbnail,mnist")
    parser.add_argument("--out", default="benchmarks/results/drift.json")
    args = parser.parse_args()
    loaders = {"cifar": al.cifar_features, "cifar-thumbnail": al.cifar_thumbnail_features, "mnist": al.mnist_features}
    results = {}
    print(f"{'set':<16} {'scenario':<12} {'alarmed':>8} {'region recall':>14} {'precision':>10}  rules fired")
    for name in args.sets.split(","):
        t = time.perf_counter()
        x, y = loaders[name]()
        for scenario in SCENARIOS:
            rows = [one_pair(x, y, seed, scenario) for seed in range(args.seeds)]
            rules = Counter(rule for r in rows for rule in r["rules"])
            recall = [r["region_recall"] for r in rows if "region_recall" in r]
            precision = [r["region_precision"] for r in rows if r.get("region_precision") is not None]
            summary = {"alarmed": sum(r["alarm"] for r in rows) / len(rows),
                       "region_recall": round(float(np.mean(recall)), 3) if recall else None,
                       "region_precision": round(float(np.mean(precision)), 3) if precision else None,
                       "rules_fired": dict(rules), "mmd_new_p_median": float(np.median(
                           [r["mmd_new_p"] for r in rows if r["mmd_new_p"] is not None])), "nights": rows}
            results[f"{name} / {scenario}"] = summary
            print(f"{name:<16} {scenario:<12} {summary['alarmed']:>8.2f} {str(summary['region_recall']):>14} "
                  f"{str(summary['region_precision']):>10}  {dict(rules)}", flush=True)
        print(f"  ({name}: {time.perf_counter() - t:.0f}s)", flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"machine": f"{os.cpu_count()} CPUs, no GPU", "seeds": args.seeds, "night": NIGHT, "new": NEW,
                   "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
