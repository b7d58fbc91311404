"""Clusters: spherical k-means in embedding space (FAISS on CPU).

``n_clusters`` from ``scores.n_clusters`` or, when 0, ``clamp(round(sqrt(N / 2)), 2, 256)``
and no more than the largest ``representative`` budget (a cluster the budget cannot reach
says nothing useful about the selection); never more than N. Trained on at most 256 points
per centroid (FAISS's own sampling), then every ok item is assigned. ``cluster_similarity`` is the cosine to the item's centroid
(used to pick central items). Rejected items get cluster -1.
"""

from __future__ import annotations

import math

import faiss
import numpy as np
import pyarrow as pa

from curation.scores.base import ScoreContext, masked

SEED = 1234
N_RESTARTS = 5


def choose_n_clusters(n: int, requested: int = 0, budget: int | None = None) -> int:
    """k for ``n`` items: ``requested`` when set, else from N, capped by the selection budget."""
    if n <= 1:
        return 1
    k = requested or min(256, max(2, round(math.sqrt(n / 2))))
    if not requested and budget:
        k = min(k, max(2, budget))
    return max(1, min(k, n))


def kmeans_assign(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and cosine-to-centroid for each row of L2-normalised ``x``."""
    n, d = x.shape
    if k <= 1 or n <= 1:
        centroid = x.mean(axis=0, keepdims=True)
        centroid /= max(np.linalg.norm(centroid), 1e-12)
        return np.zeros(n, np.int32), (x @ centroid.T).ravel().astype(np.float32)
    # Random initialisation can put two centroids in one blob; a few restarts (on at most 256
    # points per centroid, so cheap) keep the best objective.
    km = faiss.Kmeans(d, k, niter=20, nredo=N_RESTARTS, seed=SEED, spherical=True,
                      max_points_per_centroid=256, verbose=False)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    sims, labels = km.index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return labels.ravel().astype(np.int32), sims.ravel().astype(np.float32)


class ClustersScore:
    name = "clusters"
    columns = ("cluster", "cluster_similarity")

    def compute(self, ctx: ScoreContext) -> pa.Table:
        x = ctx.embeddings_ok
        k = choose_n_clusters(len(x), ctx.config.n_clusters, ctx.budget)
        if len(x):
            labels, sims = kmeans_assign(x, k)
        else:
            labels, sims = np.empty(0, np.int32), np.empty(0, np.float32)
        return pa.table({
            "cluster": pa.array(ctx.scatter(labels, -1, np.int32), pa.int32()),
            "cluster_similarity": masked(ctx.scatter(sims, np.nan, np.float32), ctx.ok, pa.float32()),
        })
