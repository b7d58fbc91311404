"""A run's drift profile (``profile.json`` and ``profile.parquet`` beside ``run.json``): what a
night keeps of itself so that the next one can compare (see :mod:`curation.drift`)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.io.filesystem import Location, read_bytes, write_bytes
from curation.index.knn import kth_distance
from curation.index.source import as_source, map_vectors
from curation.schema import is_ok, ok_rows_in_vector_order
from curation.scores import boolean_flag_columns
from curation.scores.clusters import assign

log = logging.getLogger(__name__)

SEED = 0  # the profile's sample and the permutation test's draws


PROFILE_JSON = "profile.json"


PROFILE_PARQUET = "profile.parquet"


KTH_PERCENTILE = 1.0  # the profile keeps the 1st percentile of k-th-neighbour similarity


@dataclass
class Profile:
    """What a run keeps of itself so that the next night can compare.

    Attributes:
        model_id: the embedder that made the vectors (profiles of two embedders do not compare).
        items: ok items.
        labelled: ok items with a label.
        label_shares: label -> share of the labelled ok items.
        cluster_shares: share of the ok items in each cluster (by cluster id).
        flag_rates: flag column -> share of the ok items flagged.
        kth_similarity: the 1st percentile of every item's k-th-neighbour similarity.
        nearest_similarity: the median of every item's nearest-neighbour similarity.
        centroids: ``(clusters, d)`` unit vectors: those the clusters score assigned to.
        sample: ``(m, d)`` unit vectors of a uniform sample of ok items; ``sample_uris`` theirs.
        objects: a detection run's boxes (None otherwise).
    """

    model_id: str
    items: int
    labelled: int
    label_shares: dict[str, float]
    cluster_shares: list[float]
    flag_rates: dict[str, float]
    kth_similarity: float
    nearest_similarity: float
    centroids: np.ndarray = field(repr=False)
    sample: np.ndarray = field(repr=False)
    sample_uris: list[str] = field(default_factory=list, repr=False)
    # a detection run's boxes: counts, class and size shares (curation.object_profile.box_profile)
    objects: dict | None = None

    def write(self, run: Location) -> None:
        meta = {k: getattr(self, k) for k in ("model_id", "items", "labelled", "label_shares", "cluster_shares",
                                             "flag_rates", "kth_similarity", "nearest_similarity", "objects")}
        write_bytes(run.child(PROFILE_JSON), json.dumps(meta, indent=1).encode("utf-8"))
        d = self.centroids.shape[1] if self.centroids.size else self.sample.shape[1]
        vectors = np.concatenate([self.centroids, self.sample]).astype(np.float32).reshape(-1, d)
        table = pa.table({
            "kind": ["centroid"] * len(self.centroids) + ["sample"] * len(self.sample),
            "id": pa.array(list(range(len(self.centroids))) + list(range(len(self.sample))), pa.int32()),
            "uri": pa.array([None] * len(self.centroids) + list(self.sample_uris), pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel(), pa.float32()), d),
        })
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        write_bytes(run.child(PROFILE_PARQUET), sink.getvalue().to_pybytes())

    @classmethod
    def read(cls, run: Location) -> "Profile | None":
        """The profile of the run at ``run``; None when it has none (a run of an older version)."""
        try:
            meta = json.loads(read_bytes(run.child(PROFILE_JSON)))
            location = run.child(PROFILE_PARQUET)
            table = pq.read_table(location.path, filesystem=location.filesystem)
        except (OSError, ValueError):
            return None
        kind = np.asarray(table["kind"].to_pylist())
        d = table.schema.field("vector").type.list_size
        vectors = table["vector"].combine_chunks().flatten().to_numpy().reshape(-1, d).astype(np.float32)
        return cls(centroids=vectors[kind == "centroid"], sample=vectors[kind == "sample"],
                   sample_uris=[u for u, k in zip(table["uri"].to_pylist(), kind) if k == "sample"], **meta)


def shares_change(before: dict[str, float], after: dict[str, float]) -> tuple[dict, float]:
    """Each name's share before and after and its change, and the total-variation distance."""
    names = sorted(set(before) | set(after))
    changes = {name: {"before": round(before.get(name, 0.0), 6), "after": round(after.get(name, 0.0), 6),
                      "change": round(after.get(name, 0.0) - before.get(name, 0.0), 6)} for name in names}
    tv = 0.5 * sum(abs(c["change"]) for c in changes.values())
    return changes, round(tv, 6)


def _cluster_pass(ids: np.ndarray, x: np.ndarray, cluster_of: np.ndarray, n_clusters: int,
                  previous_centroids: np.ndarray | None):
    """Per range of vectors: member sums and counts of tonight's clusters, and how many of
    these items yesterday's centroids would take (None on a first night)."""
    labels = cluster_of[ids]
    sums = np.zeros((n_clusters, x.shape[1]), np.float64)
    np.add.at(sums, labels, x)
    counts = np.bincount(labels, minlength=n_clusters)
    previous = None
    if previous_centroids is not None and len(previous_centroids):
        nearest, _ = assign(ids, x, previous_centroids)
        previous = np.bincount(nearest, minlength=len(previous_centroids))
    return sums, counts, previous


def profile_sample_ids(n: int, sample_size: int) -> np.ndarray:
    """The vector ids of the profile's uniform sample (sorted)."""
    if not n:
        return np.zeros(0, np.int64)
    return np.sort(np.random.default_rng(SEED).choice(n, size=min(n, sample_size), replace=False))


def build_profile(samples: pa.Table, vectors, graph, *, model_id: str, sample_size: int,
                  previous_centroids: np.ndarray | None = None,
                  centroids: np.ndarray | None = None) -> tuple[Profile, np.ndarray | None]:
    """Tonight's profile, and the counts of tonight's items on ``previous_centroids`` (one pass
    over the stored vectors, where they are). ``samples`` has the ``cluster`` column;
    ``centroids`` are the ones the clusters score assigned to (kept, so that the next night can
    assign to the very same ones); without them, each cluster's normalised member mean."""
    source = as_source(vectors)
    n = source.n
    ok = is_ok(samples["status"])
    rows = ok_rows_in_vector_order(samples)
    cluster_of = np.maximum(samples["cluster"].to_numpy(zero_copy_only=False)[rows].astype(np.int64), 0)
    n_clusters = max(int(cluster_of.max()) + 1 if n else 0, len(centroids) if centroids is not None else 0)
    d = source.dim if n else 1
    known = centroids is not None and len(centroids) == n_clusters
    # On a night that kept the previous run's clusters, tonight's cluster column already is the
    # assignment to yesterday's centroids: no pass over the vectors.
    same = (known and previous_centroids is not None and previous_centroids.shape == centroids.shape
            and np.array_equal(previous_centroids, centroids))
    on_previous = None
    if n and known and (previous_centroids is None or same):
        counts = np.bincount(cluster_of, minlength=n_clusters)
        on_previous = counts if same else None
    else:
        parts = map_vectors(source, _cluster_pass, cluster_of, n_clusters, previous_centroids) if n else []
        sums = sum((p[0] for p in parts), np.zeros((n_clusters, d)))
        counts = sum((p[1] for p in parts), np.zeros(n_clusters, np.int64))
        if not known:
            centroids = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
        if previous_centroids is not None and parts:
            on_previous = sum((p[2] for p in parts), np.zeros(len(previous_centroids), np.int64))

    labels = samples["label"].filter(pa.array(ok)).drop_null()
    label_shares = ({str(v["values"]): int(v["counts"]) / len(labels) for v in pc.value_counts(labels).to_pylist()}
                    if len(labels) else {})
    flag_rates = {}
    for column in boolean_flag_columns():
        if column in samples.column_names and n:
            flagged = pc.fill_null(samples[column], False).to_numpy(zero_copy_only=False).astype(bool)
            flag_rates[column] = float(flagged[ok].mean())
    kth = 1.0 - kth_distance(graph, missing=np.nan) if graph is not None and n else np.zeros(0)
    kth = kth[np.isfinite(kth)]
    nearest = graph.sims[:, 0] if graph is not None and n and graph.k else np.zeros(0)
    nearest = nearest[np.isfinite(nearest)]
    picked = profile_sample_ids(n, sample_size)
    sample = source.take(picked) if len(picked) else np.zeros((0, d), np.float32)
    uris = samples["uri"].take(pa.array(rows[picked], pa.int64())).to_pylist() if len(picked) else []
    profile = Profile(model_id=model_id, items=n, labelled=len(labels), label_shares=label_shares,
                      cluster_shares=(counts / max(n, 1)).tolist(), flag_rates=flag_rates,
                      kth_similarity=float(np.percentile(kth, KTH_PERCENTILE)) if len(kth) else -1.0,
                      nearest_similarity=float(np.median(nearest)) if len(nearest) else 1.0,
                      centroids=centroids.astype(np.float32), sample=np.asarray(sample, np.float32), sample_uris=uris)
    return profile, on_previous
