"""Clusters: spherical k-means in embedding space.

``n_clusters`` from ``scores.n_clusters`` or, when 0, ``clamp(round(sqrt(N / 2)), 2, 256)``
and no more than the largest ``representative`` budget (a cluster the budget cannot reach
says nothing useful about the selection); never more than N. The centroids are trained on a
uniform sample of at most 256 points per centroid (fetched from the vector store), with cuML's
k-means when it is installed (``pip install .[gpu]``) and a GPU is present, FAISS's otherwise;
then every ok item is assigned where its vector is stored (Ray tasks over the Parquet).
``cluster_similarity`` is the cosine to the item's centroid (used to pick central items).
Rejected items get cluster -1.
"""

from __future__ import annotations

import logging
import math
import importlib

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.index.source import as_source, map_vectors
from curation.scores.base import ScoreContext, masked
from curation.session import run_tasks
from curation.sizing import TRAIN_THREADS, training_request
from curation.item_key import match_items
from curation.schema import ok_rows_in_vector_order

log = logging.getLogger(__name__)

SEED = 1234
N_RESTARTS = 5
POINTS_PER_CENTROID = 256


def choose_n_clusters(n: int, requested: int = 0, budget: int | None = None) -> int:
    """k for ``n`` items: ``requested`` when set, else from N, capped by the selection budget."""
    if n <= 1:
        return 1
    k = requested or min(256, max(2, round(math.sqrt(n / 2))))
    if not requested and budget:
        k = min(k, max(2, budget))
    return max(1, min(k, n))


def kmeans_backend() -> str:
    """``cuml`` when cuML imports and a GPU is visible, else ``faiss``."""
    try:
        importlib.import_module("cuml")  # only whether it imports
        import torch
    except Exception:  # cuML missing or broken: the CPU path is always there
        return "faiss"
    return "cuml" if torch.cuda.is_available() else "faiss"


def train_centroids(sample: np.ndarray, k: int, *, backend: str | None = None) -> np.ndarray:
    """(k, d) unit centroids of spherical k-means on the rows of L2-normalised ``sample``."""
    x = np.ascontiguousarray(sample, dtype=np.float32)
    if k <= 1 or len(x) <= 1:
        centroid = x.mean(axis=0, keepdims=True)
        return centroid / max(float(np.linalg.norm(centroid)), 1e-12)
    if (backend or kmeans_backend()) == "cuml":
        from cuml.cluster import KMeans

        centroids = KMeans(n_clusters=k, n_init=N_RESTARTS, random_state=SEED).fit(x).cluster_centers_
        centroids = np.asarray(getattr(centroids, "get", lambda: centroids)(), np.float32)
    else:
        # Random initialisation can put two centroids in one blob; a few restarts (on at most 256
        # points per centroid, so cheap) keep the best objective.
        km = faiss.Kmeans(x.shape[1], k, niter=20, nredo=N_RESTARTS, seed=SEED, spherical=True,
                          max_points_per_centroid=POINTS_PER_CENTROID, verbose=False)
        km.train(x)
        centroids = km.centroids
    return centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)


def assign(ids: np.ndarray, x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (by cosine) of each row of ``x``: (labels int32, similarity float32)."""
    if len(x) == 0:
        return np.empty(0, np.int32), np.empty(0, np.float32)
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    sims, labels = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return labels.ravel().astype(np.int32), sims.ravel().astype(np.float32)


def cluster_vectors(vectors, k: int, *, seed: int = SEED) -> tuple[np.ndarray, np.ndarray, str, np.ndarray]:
    """Train on a sample of ``vectors`` (a source or a matrix), assign every vector where it is
    stored. Returns labels, cosine to the centroid, the training backend and the centroids."""
    source = as_source(vectors)
    n = source.n
    rng = np.random.default_rng(seed)
    size = min(n, max(1, k) * POINTS_PER_CENTROID)
    sample_ids = np.sort(rng.choice(n, size=size, replace=False)) if size < n else np.arange(n)
    # Trained in a task (on a GPU worker when the cluster has one, where cuML can run); only the
    # centroids come back.
    request = training_request("the k-means training task", TRAIN_THREADS)
    centroids, backend = run_tasks(_train_on_sample, [(source, sample_ids, k, request.threads)],
                                   request=request)[0]
    parts = map_vectors(source, assign, centroids)
    labels = np.concatenate([p[0] for p in parts]) if parts else np.empty(0, np.int32)
    sims = np.concatenate([p[1] for p in parts]) if parts else np.empty(0, np.float32)
    return labels, sims, backend, centroids


def _train_on_sample(source, sample_ids: np.ndarray, k: int, threads: int = 1) -> tuple[np.ndarray, str]:
    faiss.omp_set_num_threads(threads)  # Ray sets one OpenMP thread per reserved CPU
    backend = kmeans_backend() if k > 1 else "mean"
    return train_centroids(source.take(sample_ids), k, backend=backend), backend


class ClustersScore:
    name = "clusters"
    flags = ()
    columns = ("cluster", "cluster_similarity")
    needs = ()

    def compute(self, ctx: ScoreContext) -> pa.Table:
        n_ok = ctx.vectors.n
        k = choose_n_clusters(n_ok, ctx.config.n_clusters, ctx.budget)
        previous, assignment = ctx.previous.get(self.name) or (None, None)
        if n_ok and previous is not None and len(previous) >= 2 and not ctx.config.n_clusters:
            # An incremental night: the previous run's clusters, so cluster ids mean the same
            # thing night after night (retrained when the graph is built whole).
            centroids = np.asarray(previous, np.float32)
            if assignment is not None:
                # Unchanged items keep yesterday's assignment (the same centroids give the same
                # answer); only the new and changed ones are read and assigned.
                labels, sims = (np.array(a, copy=True) for a in assignment)
                labels, sims = labels.astype(np.int32), sims.astype(np.float32)
                todo = np.flatnonzero(labels < 0)
                if len(todo):
                    labels[todo], sims[todo] = assign(todo, ctx.vectors.take(todo), centroids)
            else:
                parts = map_vectors(ctx.vectors, assign, centroids)
                labels = np.concatenate([p[0] for p in parts]) if parts else np.empty(0, np.int32)
                sims = np.concatenate([p[1] for p in parts]) if parts else np.empty(0, np.float32)
            k, backend = len(previous), "previous run's centroids"
        elif n_ok:
            labels, sims, backend, centroids = cluster_vectors(ctx.vectors, k)
        else:
            labels, sims, backend = np.empty(0, np.int32), np.empty(0, np.float32), "none"
            centroids = np.zeros((0, 1), np.float32)
        log.info("clusters: k=%d (%s)", k, backend)
        table = pa.table({
            "cluster": pa.array(ctx.scatter(labels, -1, np.int32), pa.int32()),
            "cluster_similarity": masked(ctx.scatter(sims, np.nan, np.float32), ctx.ok, pa.float32()),
        })
        # The backend the training task used (on a GPU worker it may be cuML while the driver
        # has no GPU): the summary reports it from here, not by asking the driver again.
        centroids = np.ascontiguousarray(centroids, np.float32)
        return table.replace_schema_metadata({"kmeans_backend": backend, "centroids": centroids.tobytes(),
                                              "centroid_dim": str(centroids.shape[1] if centroids.ndim == 2 else 1)})

    def load_previous(self, previous, samples: pa.Table):
        """The previous run's centroids (its drift profile) and, per vector id, the cluster and
        cosine it gave the same unchanged item (cluster -1: new or changed); None when it kept
        fewer than two centroids."""
        profile = previous.profile()
        if profile is None or len(profile.centroids) < 2:
            return None
        return profile.centroids, _previous_assignment(previous, samples)

    def artifacts(self, table: pa.Table) -> dict:
        """The centroids the items were assigned to (kept in the run's profile, so the next
        night can assign to the same ones)."""
        meta = table.schema.metadata or {}
        if b"centroids" not in meta:
            return {}
        dim = int(meta.get(b"centroid_dim", b"1"))
        return {"centroids": np.frombuffer(meta[b"centroids"], np.float32).reshape(-1, dim)}

    def summary(self, table: pa.Table) -> dict:
        clusters = pc.filter(table["cluster"], pc.greater_equal(table["cluster"], 0))
        backend = (table.schema.metadata or {}).get(b"kmeans_backend", b"none").decode()
        return {"clusters": len(pc.unique(clusters)), "kmeans_backend": backend}


def _previous_assignment(previous, samples: pa.Table):
    """Per vector id, the cluster and cosine ``previous`` gave the same unchanged item (cluster
    -1 for new and changed items); None when its samples cannot be read."""
    old = previous.items(["cluster", "cluster_similarity"])
    if old is None or "cluster" not in old.column_names or "cluster_similarity" not in old.column_names:
        return None
    at = match_items(samples.take(pa.array(ok_rows_in_vector_order(samples), pa.int64())), old)
    found = at >= 0
    at = np.maximum(at, 0)
    cluster = old["cluster"].fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32)
    similarity = old["cluster_similarity"].fill_null(np.nan).to_numpy(zero_copy_only=False).astype(np.float32)
    return np.where(found, cluster[at], -1).astype(np.int32), np.where(found, similarity[at], np.nan).astype(np.float32)
