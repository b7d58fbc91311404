"""Exact, near and (opt-in) semantic duplicates -> connected groups with one kept item each.

Copies are judged by how images look, never by which model embeds them: a trained encoder puts
every photo of a class as close as a copy, so its embedding cannot tell a re-encoded copy from
a sibling. Edges between ok items:

* exact: equal content hash of the bytes, or equal hash of the decoded pixels (the same image
  saved twice with different lossless encodings);
* near (copy descriptor): images mode computes a copy descriptor for every decoded image
  (:func:`curation.stages.decode.copy_descriptor`: grey, frame trimmed, blurred, mirror
  invariant) and its own kNN graph. A pair with descriptor cosine >= ``scores.copy_cosine``
  whose distance (1 - cosine) is at most ``scores.copy_ratio`` times the local scale (the
  distance to the k-th neighbour of the sparser of the two) is a copy -- the ratio test keeps
  a dense region of distinct look-alikes (product shots on white) from merging; cosine >=
  0.998 always counts. ``input.embeddings`` runs have no pixels: the same test runs on the
  embedding graph with ``scores.near_duplicate_cosine`` / ``scores.near_duplicate_ratio``,
  and ``run.json`` says what that cannot see;
* near (perceptual): 64-bit dHash Hamming distance <= ``scores.near_duplicate_hamming`` with a
  cosine of at least ``PHASH_MIN_COSINE`` in the same space and the ratio test at
  ``PHASH_RATIO``, as guards against hash collisions; hashes with fewer than
  ``PHASH_MIN_BITS`` set or unset bits (large flat areas) and low-information images are not
  used;
* semantic (opt-in, ``scores.semantic_duplicate_cosine`` > 0): embedding cosine at or above
  that value, as in SemDeDup -- the same content in another shot. Such edges only add to
  groups; they never remove a copy.

Groups are the connected components (union-find). Kept item per group, in order: not junk,
then the most pixels, then the smallest ``uri``. ``dup_group`` is the smallest ``input_id`` in
the group; ``dup_of`` is the kept item's ``uri`` for every other member; ``dup_kind`` is
``exact`` (same bytes or pixels as the kept item), ``near`` (a copy of it) or ``semantic``.
"""

from __future__ import annotations

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.index.knn import kth_distance
from curation.scores.base import EVIDENCE_EXAMPLES, REASON_COLUMN, Flag, ScoreContext, evidence_of, masked, nearby, \
    with_evidence
from curation.scores.junk import LOW_INFORMATION

PHASH_MIN_COSINE = 0.85
PHASH_MIN_BITS = 12
PHASH_RATIO = 0.25
CERTAIN_DISTANCE = 0.002  # cosine >= 0.998: a duplicate whatever the neighbourhood
PHASH_QUERY_BATCH = 16384
PAIR_BLOCK = 16384


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
        """Every element's root, by vectorised pointer jumping (no per-element Python work)."""
        roots = self.parent.copy()
        while True:
            nxt = roots[roots]
            if np.array_equal(nxt, roots):
                return roots
            roots = nxt


def _union_equal_keys(uf: UnionFind, keys: pa.ChunkedArray | pa.Array) -> None:
    """Union the rows whose (non-null) ``keys`` are equal; keys are compared as Arrow dictionary
    codes, so no per-row Python string is made."""
    codes = pc.dictionary_encode(keys).combine_chunks().indices
    codes = np.nan_to_num(codes.to_numpy(zero_copy_only=False).astype(np.float64), nan=-1).astype(np.int64)
    rows = np.flatnonzero(codes >= 0)
    order = rows[np.argsort(codes[rows], kind="stable")]
    same = np.flatnonzero(codes[order[1:]] == codes[order[:-1]])
    for j in same:
        uf.union(int(order[j]), int(order[j + 1]))


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


def _ratio_edges(graph, reference: np.ndarray, cosine: float, ratio: float) -> np.ndarray:
    """(N, k) mask of the graph's edges that pass the absolute and the ratio test: close in
    absolute terms AND much closer than the sparser endpoint's own neighbourhood."""
    partner = np.maximum(graph.ids, 0)
    local = np.maximum(reference[:, None], reference[partner])
    return (graph.ids >= 0) & (graph.sims >= cosine) & (
        1.0 - graph.sims <= np.maximum(ratio * local, CERTAIN_DISTANCE))


def _cosine_evidence(graph, reference: np.ndarray, cosine: float, ratio: float, uri: pa.ChunkedArray,
                     ok_rows: np.ndarray) -> dict:
    """What moving the cosine threshold changes: the pairs the graph's rule (cosine and ratio
    test) accepts at nearby values, and the pairs just above and just below the value."""
    values = nearby(cosine, 0.02, 0.0, 1.0)
    counts = {}
    for v in values:
        rows, cols = np.nonzero(_ratio_edges(graph, reference, v, ratio))
        a, b = rows, graph.ids[rows, cols]
        counts[str(v)] = int(len(np.unique(np.minimum(a, b) * len(graph.ids) + np.maximum(a, b))))
    # Pairs that pass the ratio test at any cosine, nearest the threshold on each side.
    loose = _ratio_edges(graph, reference, -1.0, ratio)
    rows, cols = np.nonzero(loose)
    sims = graph.sims[rows, cols].astype(np.float64)
    pairs = {}
    for side, mask in (("flagged", sims >= cosine), ("not_flagged", sims < cosine)):
        idx = np.flatnonzero(mask)[np.argsort(np.abs(sims[mask] - cosine), kind="stable")]
        seen, out = set(), []
        for i in idx:
            a, b = int(rows[i]), int(graph.ids[rows[i], cols[i]])
            if (min(a, b), max(a, b)) in seen:
                continue
            seen.add((min(a, b), max(a, b)))
            out.append({"uri_a": uri[int(ok_rows[a])].as_py(), "uri_b": uri[int(ok_rows[b])].as_py(),
                        "similarity": round(float(sims[i]), 4)})
            if len(out) >= EVIDENCE_EXAMPLES:
                break
        pairs[side] = out
    return {"value": cosine, "pairs_at": counts, **pairs}


class DuplicatesScore:
    name = "duplicates"
    # A copy that is not its group's kept item: dup_of names the kept one.
    flags = (Flag("dup_of", "duplicate", "Largest duplicate groups", "dup_group", True,
                  ("copy_cosine", "semantic_duplicate_cosine"), boolean=False, name="duplicate"),)
    columns = ("dup_group", "dup_of", "dup_kind")
    needs = ("junk flags",)  # the kept item of a group is not junk where one can be

    def compute(self, ctx: ScoreContext) -> pa.Table:
        cfg = ctx.config
        ok_rows = ctx.ok_rows
        n_ok = len(ok_rows)
        uf = UnionFind(n_ok)
        take = pa.array(ok_rows, pa.int64())
        _union_equal_keys(uf, ctx.columns.arrow("content_hash").take(take))
        _union_equal_keys(uf, ctx.columns.arrow("pixel_hash").take(take))
        exact_roots = uf.roots() if n_ok else np.empty(0, np.int64)

        # Near duplicates from the kNN graph: close in absolute terms AND much closer than the
        # item's own neighbourhood (a ratio test), so dense regions of distinct look-alikes
        # (every handwritten "1", every product shot on white) are not merged into one group.
        if ctx.copy_knn is not None:
            graph, space, cosine, ratio = ctx.copy_knn, ctx.copies, cfg.copy_cosine, cfg.copy_ratio
        else:  # no pixels: the embedding is all there is
            graph, space, cosine, ratio = ctx.knn_ok, ctx.vectors, cfg.near_duplicate_cosine, cfg.near_duplicate_ratio
        reference = kth_distance(graph)  # the local scale of "close"
        rows, cols = np.nonzero(_ratio_edges(graph, reference, cosine, ratio))
        for a, b in zip(rows, graph.ids[rows, cols]):
            uf.union(int(a), int(b))
        evidence = {("copy_cosine" if ctx.copy_knn is not None else "near_duplicate_cosine"):
                    _cosine_evidence(graph, reference, cosine, ratio, ctx.columns.arrow("uri"), ok_rows)}

        # Near duplicates from the perceptual hash, guarded by a looser embedding agreement.
        if "phash" in ctx.columns and cfg.near_duplicate_hamming > 0:
            informative = ~ctx.column(LOW_INFORMATION.column)[ok_rows] & np.isfinite(
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
                emb = space.take(ends)
                left_at, right_at = inverse[: len(a)], inverse[len(a):]
                cos = np.empty(len(a), np.float32)
                for lo in range(0, len(a), PAIR_BLOCK):  # pairs in blocks: never pairs x d at once
                    hi = min(lo + PAIR_BLOCK, len(a))
                    cos[lo:hi] = np.einsum("ij,ij->i", emb[left_at[lo:hi]], emb[right_at[lo:hi]])
                local = np.maximum(reference[a], reference[b])
                keep = (cos >= PHASH_MIN_COSINE) & (1.0 - cos <= np.maximum(PHASH_RATIO * local, CERTAIN_DISTANCE))
                for x, y in zip(a[keep], b[keep]):
                    uf.union(int(x), int(y))

        copy_roots = uf.roots() if n_ok else np.empty(0, np.int64)
        if cfg.semantic_duplicate_cosine > 0 and ctx.copy_knn is not None:
            semantic = ctx.knn_ok
            rows, cols = np.nonzero((semantic.ids >= 0) & (semantic.sims >= cfg.semantic_duplicate_cosine))
            for a, b in zip(rows, semantic.ids[rows, cols]):
                uf.union(int(a), int(b))
        roots = uf.roots() if n_ok else np.empty(0, np.int64)
        input_id = ctx.column("input_id")[ok_rows]
        uri = ctx.columns.arrow("uri")
        junk = ctx.any_flag("junk")[ok_rows]
        width = np.nan_to_num(ctx.column("width")[ok_rows].astype(np.float64))  # null for precomputed embeddings
        height = np.nan_to_num(ctx.column("height")[ok_rows].astype(np.float64))
        area = width * height

        n = ctx.n
        group = np.zeros(n, np.int64)
        has_group = np.zeros(n, bool)
        dup_of_row = np.full(n, -1, np.int64)  # the kept item's sample row
        kind_code = np.zeros(n, np.int8)  # 0 semantic, 1 near, 2 exact
        # Only groups of two or more are visited (a handful of rows each).
        root_values, sizes = np.unique(roots, return_counts=True)
        in_group = np.isin(roots, root_values[sizes > 1])
        members_all = np.flatnonzero(in_group)
        members_all = members_all[np.argsort(roots[members_all], kind="stable")]
        bounds = np.flatnonzero(np.diff(roots[members_all])) + 1
        for members in np.split(members_all, bounds) if len(members_all) else []:
            rows = ok_rows[members]
            kept = min(members, key=lambda m: (bool(junk[m]), -int(area[m]), uri[int(ok_rows[m])].as_py()))
            group[rows] = input_id[members].min()
            has_group[rows] = True
            others = members[members != kept]
            dup_of_row[ok_rows[others]] = ok_rows[kept]
            kind_code[ok_rows[others]] = np.where(exact_roots[others] == exact_roots[kept], 2,
                                                  np.where(copy_roots[others] == copy_roots[kept], 1, 0))
        is_dup = dup_of_row >= 0
        dup_of = pc.take(uri, pa.array(np.where(is_dup, dup_of_row, 0))) if n else pa.array([], pa.string())
        dup_of = pc.if_else(pa.array(is_dup), dup_of, pa.scalar(None, pa.string()))
        kind = pa.array(np.array(["semantic", "near", "exact"], dtype=object)[kind_code], pa.string(), mask=~is_dup)
        reasons = pc.binary_join_element_wise(kind, pa.scalar(" duplicate of "), dup_of, pa.scalar(""))
        return with_evidence(pa.table({
            "dup_group": masked(group, has_group, pa.int64()),
            "dup_of": dup_of,
            "dup_kind": kind,
            REASON_COLUMN: reasons,
        }), evidence)

    def summary(self, table: pa.Table) -> dict:
        kinds = pc.value_counts(table["dup_kind"].drop_null()).to_pylist()
        return {"flags": {"duplicates_not_kept": int(table["dup_of"].is_valid().to_numpy(zero_copy_only=False).sum()),
                          "duplicate_groups": len(pc.unique(table["dup_group"].drop_null()))},
                "by_kind": {str(v["values"]): int(v["counts"]) for v in kinds}, "thresholds": evidence_of(table)}
