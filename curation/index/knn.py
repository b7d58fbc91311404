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

    ids: np.ndarray  # (N, k) int32 below 2**31 items (half the bytes), else int64
    sims: np.ndarray  # (N, k) float32
    # The next neighbours past the k-th, kept for the next night's update (knn-margin/).
    margin: "KnnGraph | None" = None

    @property
    def k(self) -> int:
        return self.ids.shape[1]

    def split(self, k: int) -> "KnnGraph":
        """The first ``k`` neighbours, the rest as the ``margin`` (contiguous copies)."""
        if self.k <= k:
            return self
        margin = KnnGraph(np.ascontiguousarray(self.ids[:, k:]), np.ascontiguousarray(self.sims[:, k:]))
        return KnnGraph(np.ascontiguousarray(self.ids[:, :k]), np.ascontiguousarray(self.sims[:, :k]), margin)


def exact_knn(embeddings: np.ndarray, k: int) -> KnnGraph:
    """Exact k nearest neighbours of every row among all rows, self excluded."""
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, d = x.shape
    k_eff = min(k, max(n - 1, 0))
    ids = np.full((n, k), -1, id_dtype(n))
    sims = np.full((n, k), -np.inf, np.float32)
    if k_eff == 0:
        return KnnGraph(ids, sims)
    index = faiss.IndexFlatIP(d)
    index.add(x)
    search_k = min(k_eff + 1, n)
    for start in range(0, n, QUERY_BATCH):
        stop = min(start + QUERY_BATCH, n)
        batch_sims, batch_ids = index.search(x[start:stop], search_k)
        sims[start:stop], ids[start:stop] = drop_self(batch_sims, batch_ids, np.arange(start, stop), k)
    return KnnGraph(ids, sims)


def kth_distance(graph: KnnGraph, *, missing: float = 1.0) -> np.ndarray:
    """Each item's distance (1 - cosine) to its farthest valid neighbour (the k-th, padding
    ``-1`` ids skipped); ``missing`` for an item with none. The local scale the duplicates'
    ratio test uses, and the sparseness score."""
    n = len(graph.ids)
    if graph.k == 0:
        return np.full(n, missing)
    count = (graph.ids >= 0).sum(axis=1)
    sims = graph.sims[np.arange(n), np.maximum(count - 1, 0)].astype(np.float64)
    return np.where(count > 0, 1.0 - sims, missing)


def id_dtype(n: int):
    """The narrowest integer type for neighbour ids among ``n`` items (the graph's driver cost)."""
    return np.int32 if n < 2**31 - 1 else np.int64


def drop_self(sims: np.ndarray, ids: np.ndarray, own: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own id (wherever it landed) and keep k columns; pad with -1/-inf."""
    keep = ids != own[:, None]
    keep[keep.all(axis=1), -1] = False  # self not found: drop the last column instead
    width = ids.shape[1] - 1
    if width <= 0:
        return np.full((len(ids), k), -np.inf, np.float32), np.full((len(ids), k), -1, np.int64)
    out_ids = ids[keep].reshape(-1, width)[:, :k]
    out_sims = sims[keep].reshape(-1, width)[:, :k]
    if out_ids.shape[1] < k:
        pad = k - out_ids.shape[1]
        out_ids = np.pad(out_ids, ((0, 0), (0, pad)), constant_values=-1)
        out_sims = np.pad(out_sims, ((0, 0), (0, pad)), constant_values=-np.inf)
    out_sims = np.where(out_ids >= 0, out_sims, -np.inf).astype(np.float32)
    return out_sims, out_ids
