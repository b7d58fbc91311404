"""Exact and near duplicates -> connected groups with one kept item each.

Edges between ok items:

* exact: equal content hash of the bytes, or equal hash of the decoded pixels (the same image
  saved twice with different lossless encodings);
* near (embedding): a kNN pair with cosine >= ``scores.near_duplicate_cosine`` whose distance
  (1 - cosine) is at most ``scores.near_duplicate_ratio`` times the local scale (the distance
  to the k-th neighbour of the sparser of the two) -- a ratio test, so a dense region of
  distinct look-alikes is not one big group; cosine >= 0.998 always counts;
* near (perceptual): 64-bit dHash Hamming distance <= ``scores.near_duplicate_hamming`` with an
  embedding cosine of at least ``PHASH_MIN_COSINE`` and the same ratio test (``PHASH_RATIO``)
  as guards against hash collisions; hashes with fewer than ``PHASH_MIN_BITS`` set or unset
  bits (large flat areas) are not used.
  Semantic embeddings pull same-class photos as close as true copies, so the low-level hash
  is what finds re-encoded, resized and brightness-shifted copies. Flat (low-information)
  images are left out of hash matching: their hashes are noise.

Groups are the connected components (union-find). Kept item per group, in order: not junk,
then the most pixels, then the smallest ``uri``. ``dup_group`` is the smallest ``input_id`` in
the group; ``dup_of`` is the kept item's ``uri`` for every other member.
"""

from __future__ import annotations

import faiss
import numpy as np
import pyarrow as pa

from curation.scores.base import REASON_COLUMN, ScoreContext, masked
from curation.scores.junk import is_junk

PHASH_MIN_COSINE = 0.85
PHASH_MIN_BITS = 12
PHASH_RATIO = 0.25
CERTAIN_DISTANCE = 0.002  # cosine >= 0.998: a duplicate whatever the neighbourhood
PHASH_QUERY_BATCH = 16384


class UnionFind:
    """Disjoint sets over 0..n-1 with path halving and union by size."""

    def __init__(self, n: int):
        self.parent = np.arange(n)
        self.size = np.ones(n, np.int64)

    def find(self, a: int) -> int:
        parent = self.parent
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))])


def _union_equal_keys(uf: UnionFind, keys: np.ndarray, valid: np.ndarray) -> None:
    first: dict = {}
    for i in np.flatnonzero(valid):
        key = keys[i]
        if key in first:
            uf.union(first[key], i)
        else:
            first[key] = i


def phash_pairs(hashes: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i < j) with Hamming(hashes[i], hashes[j]) <= radius, via a FAISS binary index."""
    n = len(hashes)
    if n < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    codes = np.ascontiguousarray(hashes.astype(">i8").view(np.uint8).reshape(n, 8))
    index = faiss.IndexBinaryFlat(64)
    index.add(codes)
    left, right = [], []
    for start in range(0, n, PHASH_QUERY_BATCH):
        stop = min(start + PHASH_QUERY_BATCH, n)
        lims, _dist, ids = index.range_search(codes[start:stop], radius + 1)  # strict '<'
        rows = np.repeat(np.arange(start, stop), np.diff(lims).astype(np.int64))
        ids = ids.astype(np.int64)
        keep = rows < ids
        left.append(rows[keep])
        right.append(ids[keep])
    return np.concatenate(left), np.concatenate(right)


def _neighbourhood_distance(graph) -> np.ndarray:
    """Each item's distance (1 - cosine) to its k-th neighbour: the local scale of "close"."""
    if graph.k == 0:
        return np.ones(len(graph.ids))
    valid = graph.ids >= 0
    last = np.where(valid.any(axis=1), valid.sum(axis=1) - 1, 0)
    sims = graph.sims[np.arange(len(graph.ids)), last]
    return np.where(valid.any(axis=1), 1.0 - sims, 1.0)


class DuplicatesScore:
    name = "duplicates"
    columns = ("dup_group", "dup_of", "dup_kind")

    def compute(self, ctx: ScoreContext) -> pa.Table:
        cfg = ctx.config
        ok_rows = ctx.ok_rows
        n_ok = len(ok_rows)
        uf = UnionFind(n_ok)
        content = ctx.column("content_hash")[ok_rows]
        pixels = ctx.column("pixel_hash")[ok_rows]
        _union_equal_keys(uf, content, np.array([c is not None for c in content]))
        _union_equal_keys(uf, pixels, np.array([p is not None for p in pixels]))
        exact_roots = uf.roots() if n_ok else np.empty(0, np.int64)

        # Near duplicates from the kNN graph: close in absolute terms AND much closer than the
        # item's own neighbourhood (a ratio test), so dense regions of distinct look-alikes
        # (every handwritten "1", every product shot on white) are not merged into one group.
        graph = ctx.knn_ok
        valid_ids = graph.ids >= 0
        reference = _neighbourhood_distance(graph)
        partner = np.maximum(graph.ids, 0)
        distance = 1.0 - graph.sims
        local = np.maximum(reference[:, None], reference[partner])  # the sparser of the two
        edge = valid_ids & (graph.sims >= cfg.near_duplicate_cosine) & (
            distance <= np.maximum(cfg.near_duplicate_ratio * local, CERTAIN_DISTANCE))
        rows, cols = np.nonzero(edge)
        for a, b in zip(rows, graph.ids[rows, cols]):
            uf.union(int(a), int(b))

        # Near duplicates from the perceptual hash, guarded by a looser embedding agreement.
        if "phash" in ctx.columns and cfg.near_duplicate_hamming > 0:
            informative = ~ctx.column("is_low_information")[ok_rows] & np.isfinite(
                ctx.column("contrast")[ok_rows].astype(np.float64))
            hashes = ctx.column("phash")[ok_rows]
            bits = np.unpackbits(hashes.astype(">i8").view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)
            # A hash with few or many set bits comes from large flat areas (a digit on black, a
            # logo on white): such hashes collide between unrelated images, so they do not vote.
            balanced = (bits >= PHASH_MIN_BITS) & (bits <= 64 - PHASH_MIN_BITS)
            idx = np.flatnonzero(informative & balanced)
            left, right = phash_pairs(hashes[idx], cfg.near_duplicate_hamming)
            if len(left):
                a, b = idx[left], idx[right]
                # Only the pairs' own vectors are fetched from the store.
                ends, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
                emb = ctx.vectors.take(ends)
                cos = np.einsum("ij,ij->i", emb[inverse[: len(a)]], emb[inverse[len(a):]])
                local = np.maximum(reference[a], reference[b])
                keep = (cos >= PHASH_MIN_COSINE) & (1.0 - cos <= np.maximum(PHASH_RATIO * local, CERTAIN_DISTANCE))
                for x, y in zip(a[keep], b[keep]):
                    uf.union(int(x), int(y))

        roots = uf.roots() if n_ok else np.empty(0, np.int64)
        input_id = ctx.column("input_id")[ok_rows]
        uri = ctx.column("uri")[ok_rows]
        junk = is_junk(ctx.columns)[ok_rows]
        width = np.nan_to_num(ctx.column("width")[ok_rows].astype(np.float64))  # null for precomputed embeddings
        height = np.nan_to_num(ctx.column("height")[ok_rows].astype(np.float64))
        area = width * height

        group_ok = np.zeros(n_ok, np.int64)
        has_group = np.zeros(n_ok, bool)
        dup_of = np.empty(n_ok, dtype=object)
        kind = np.empty(n_ok, dtype=object)
        order = np.argsort(roots, kind="stable")
        boundaries = np.flatnonzero(np.diff(roots[order])) + 1
        for members in np.split(order, boundaries):
            if len(members) < 2:
                continue
            kept = min(members, key=lambda m: (bool(junk[m]), -int(area[m]), str(uri[m])))
            group_ok[members] = input_id[members].min()
            has_group[members] = True
            for m in members:
                if m == kept:
                    continue
                dup_of[m] = uri[kept]
                kind[m] = "exact" if exact_roots[m] == exact_roots[kept] else "near"

        n = ctx.n
        full_group = ctx.scatter(group_ok, 0, np.int64)
        full_has = ctx.scatter(has_group, False, bool)
        full_of = ctx.scatter(dup_of, None, object)
        full_kind = ctx.scatter(kind, None, object)
        reasons = np.empty(n, dtype=object)
        for i in np.flatnonzero(np.array([k is not None for k in full_kind], bool)):
            reasons[i] = f"{full_kind[i]} duplicate of {full_of[i]}"
        return pa.table({
            "dup_group": masked(full_group, full_has, pa.int64()),
            "dup_of": pa.array(full_of, pa.string()),
            "dup_kind": pa.array(full_kind, pa.string()),
            REASON_COLUMN: pa.array(reasons, pa.string()),
        })

    def summary(self, table: pa.Table) -> dict:
        import pyarrow.compute as pc

        kinds = pc.value_counts(table["dup_kind"].drop_null()).to_pylist()
        return {"flags": {"duplicates_not_kept": int(table["dup_of"].is_valid().to_numpy(zero_copy_only=False).sum()),
                          "duplicate_groups": len(pc.unique(table["dup_group"].drop_null()))},
                "by_kind": {str(v["values"]): int(v["counts"]) for v in kinds}}
