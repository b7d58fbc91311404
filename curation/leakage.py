"""Leakage between splits: copies of one image on both sides of a train / validation / test line.

The split of an item comes from a column (``input.split_column``; ``split`` by default when the
manifest or the embeddings file has one) or, in images mode with ``input.split_from_path``, from
the first path component under ``input.images`` (``train/cat/1.jpg`` -> ``train``).

Every pair of ok items in one duplicate group (exact, near; semantic when on: the groups the
duplicates score found) whose splits differ is a leak. ``leakage.parquet`` lists them
(``uri_a, split_a, uri_b, split_b, kind, similarity``; ``split_a < split_b``): ``kind`` is
``exact`` for equal bytes or pixels (similarity 1.0), else the kind of the group's non-kept
member (``near`` / ``semantic``) with the pair's cosine in the space copies were judged in (the
copy descriptors in images mode, the embeddings otherwise). ``run.json`` -> ``leakage`` has the
pairs per split pair and, per split, the share of its items with a copy in another split.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.schema import is_ok, vector_id_of_rows

LEAKAGE_SCHEMA = pa.schema([("uri_a", pa.string()), ("split_a", pa.string()), ("uri_b", pa.string()),
                            ("split_b", pa.string()), ("kind", pa.string()), ("similarity", pa.float32())])
MAX_PAIRS_PER_GROUP = 10_000  # a huge group (a logo on every page) would otherwise square


def split_values(samples: pa.Table, *, column: str | None, images_root: str | None) -> pa.Array | None:
    """Each row's split (null when unknown), from ``column`` or from the path under
    ``images_root``; None when the run has no split."""
    if column is not None:
        if column not in samples.column_names:
            return None
        return pc.cast(samples[column], pa.string()).combine_chunks()
    if images_root is None:
        return None
    prefix = images_root.rstrip("/") + "/"
    out = []
    for uri in samples["uri"].to_pylist():
        rel = uri[len(prefix):] if uri.startswith(prefix) else None
        out.append(rel.split("/", 1)[0] if rel and "/" in rel else None)
    return pa.array(out, pa.string())


def find_leaks(samples: pa.Table, split: pa.Array, space) -> tuple[pa.Table, dict]:
    """The cross-split pairs of every duplicate group, and the ``run.json`` summary.

    Args:
        samples: scored samples (``dup_group``, ``dup_kind``, ``content_hash``, ``pixel_hash``).
        split: each row's split.
        space: the vectors copies were judged by (ok rows in vector order), for similarities.
    """
    ok = is_ok(samples["status"])
    groups = samples["dup_group"].to_numpy(zero_copy_only=False).astype(np.float64)
    # Splits as codes in the order of their names (no Python string per row).
    encoded = pc.dictionary_encode(split)
    names = np.array(encoded.dictionary.to_pylist(), dtype=object)
    order = np.argsort(names.astype(str), kind="stable")
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    raw = np.nan_to_num(encoded.indices.to_numpy(zero_copy_only=False).astype(np.float64), nan=-1).astype(np.int64)
    splits = np.where(raw >= 0, rank[np.maximum(raw, 0)], -1) if len(names) else raw
    names = names[order]
    usable = ok & np.isfinite(groups) & (splits >= 0)
    rows = np.flatnonzero(usable)
    rows = rows[np.argsort(groups[rows], kind="stable")]
    pairs_a, pairs_b = [], []
    for members in np.split(rows, np.flatnonzero(np.diff(groups[rows])) + 1) if len(rows) else []:
        if len({splits[m] for m in members}) < 2:
            continue
        count = 0
        for i, a in enumerate(members):
            for b in members[i + 1:]:
                if splits[a] != splits[b] and count < MAX_PAIRS_PER_GROUP:
                    pairs_a.append(a)
                    pairs_b.append(b)
                    count += 1
    a = np.array(pairs_a, np.int64)
    b = np.array(pairs_b, np.int64)
    swap = splits[a] > splits[b]
    a, b = np.where(swap, b, a), np.where(swap, a, b)
    table = _pair_table(samples, names, splits, a, b, space)
    sizes = np.bincount(splits[ok & (splits >= 0)], minlength=len(names))
    return table, _summary(table, {str(s): int(c) for s, c in zip(names, sizes) if c})


def _pair_table(samples, names, splits, a, b, space) -> pa.Table:
    if len(a) == 0:
        return LEAKAGE_SCHEMA.empty_table()
    uri = samples["uri"]

    def pairs_of(column):  # the column's values at both ends of every pair
        if column not in samples.column_names:
            return [None] * len(a), [None] * len(a)
        return samples[column].take(pa.array(a)).to_pylist(), samples[column].take(pa.array(b)).to_pylist()

    content, pixel, kinds = pairs_of("content_hash"), pairs_of("pixel_hash"), pairs_of("dup_kind")
    exact = np.array([(c is not None and c == d) or (p is not None and p == q)
                      for c, d, p, q in zip(*content, *pixel)], bool)
    kind = [("exact" if e else (ka if ka not in (None, "exact") else kb) or "near")
            for e, ka, kb in zip(exact, *kinds)]
    vector_of_row = vector_id_of_rows(samples)
    similarity = np.ones(len(a), np.float32)
    if space is not None and (~exact).any():
        ends, inverse = np.unique(np.concatenate([a[~exact], b[~exact]]), return_inverse=True)
        x = np.asarray(space.take(vector_of_row[ends]), np.float32)
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        half = int((~exact).sum())
        similarity[~exact] = np.einsum("ij,ij->i", x[inverse[:half]], x[inverse[half:]])
    return pa.table({"uri_a": uri.take(pa.array(a)).cast(pa.string()),
                     "split_a": pa.array([str(s) for s in names[splits[a]]], pa.string()),
                     "uri_b": uri.take(pa.array(b)).cast(pa.string()),
                     "split_b": pa.array([str(s) for s in names[splits[b]]], pa.string()),
                     "kind": pa.array(kind, pa.string()), "similarity": pa.array(similarity, pa.float32())},
                    schema=LEAKAGE_SCHEMA)


def _summary(table: pa.Table, sizes: dict[str, int]) -> dict:
    pairs: dict[str, int] = {}
    for sa, sb in zip(table["split_a"].to_pylist(), table["split_b"].to_pylist()):
        pairs[f"{sa}|{sb}"] = pairs.get(f"{sa}|{sb}", 0) + 1
    leaked: dict[str, set] = {}
    for side in ("a", "b"):
        for s, u in zip(table[f"split_{side}"].to_pylist(), table[f"uri_{side}"].to_pylist()):
            leaked.setdefault(s, set()).add(u)
    return {"pairs": int(table.num_rows), "pairs_by_splits": pairs,
            "share_with_a_copy_elsewhere": {s: round(len(leaked.get(s, ())) / n, 4) for s, n in sizes.items()},
            "items_per_split": sizes}
