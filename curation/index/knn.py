"""All-items k-nearest-neighbour graph with FAISS.

The exact path: ``IndexFlatIP`` on L2-normalised embeddings (inner product = cosine), queried
in batches so memory stays bounded. Self matches are removed by id, not by position, so
exact-duplicate vectors (whose order among ties is arbitrary) are handled.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

QUERY_BATCH = 8192


@dataclass
class KnnGraph:
    """``ids[i]`` are the row indices of item i's neighbours (``-1`` padding when fewer than k
    exist), ``sims[i]`` their cosine similarities, both sorted by decreasing similarity."""

    ids: np.ndarray  # (N, k) int64
    sims: np.ndarray  # (N, k) float32

    @property
    def k(self) -> int:
        return self.ids.shape[1]


def exact_knn(embeddings: np.ndarray, k: int) -> KnnGraph:
    """Exact k nearest neighbours of every row among all rows, self excluded."""
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, d = x.shape
    k_eff = min(k, max(n - 1, 0))
    ids = np.full((n, k), -1, np.int64)
    sims = np.full((n, k), -np.inf, np.float32)
    if k_eff == 0:
        return KnnGraph(ids, sims)
    index = faiss.IndexFlatIP(d)
    index.add(x)
    search_k = min(k_eff + 1, n)
    for start in range(0, n, QUERY_BATCH):
        stop = min(start + QUERY_BATCH, n)
        batch_sims, batch_ids = index.search(x[start:stop], search_k)
        own = np.arange(start, stop)[:, None]
        keep = batch_ids != own
        # Self is normally among the results; when ties pushed it out, drop the last column.
        keep[keep.all(axis=1), -1] = False
        ids[start:stop, :k_eff] = batch_ids[keep].reshape(-1, k_eff)
        sims[start:stop, :k_eff] = batch_sims[keep].reshape(-1, k_eff)
    return KnnGraph(ids, sims)
