"""What "the same item, unchanged" means between two runs: the one rule.

An item is its ``uri``; a version of it is its ``uri`` and ``fingerprint`` (size and
modification time from the listing, or a manifest's ``etag``/``fingerprint``). Two rows are the
same item unchanged when their uris are equal and their fingerprints are equal -- **an unknown
(null) fingerprint never counts as unchanged**: nothing tells that the file is the one seen
before. When a table has no ``fingerprint`` column at all (precomputed embeddings without one,
or a run written before the column existed), the uri alone names the item.

Every consumer calls this module: the nightly diff (``changed``), stored label corrections
(kept while their item is unchanged), the embedding store (vectors reused), drift (``new``
items), the kNN graph update (rows carried from the previous night) and the report map
(positions carried). No other module joins uri and fingerprint itself.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

KEY_COLUMNS = ("uri", "fingerprint")
_SEPARATOR = "\x00"


def key_columns(*tables: pa.Table) -> list[str]:
    """The columns that name one version of an item in every one of ``tables``: ``uri``, and
    ``fingerprint`` when every table has it."""
    return [c for c in KEY_COLUMNS if all(c in t.column_names for t in tables)]


def _joined(table: pa.Table, columns: list[str]) -> pa.Array:
    """Per row, ``columns`` joined (null where any of them is null)."""
    parts = [pc.cast(table[c], pa.string()).combine_chunks() for c in columns]
    return parts[0] if len(parts) == 1 else pc.binary_join_element_wise(*parts, _SEPARATOR)


def unknown(table: pa.Table, columns: list[str]) -> np.ndarray:
    """Rows whose key is unknown (a null uri, or a null fingerprint where it is a key column):
    such a row never matches a row of another run."""
    out = np.zeros(table.num_rows, bool)
    for c in columns:
        if table[c].null_count:
            out |= ~pc.is_valid(table[c]).to_numpy(zero_copy_only=False)
    return out


def match_items(tonight: pa.Table, old: pa.Table) -> np.ndarray:
    """Per row of ``tonight``, the row of ``old`` holding the same item unchanged, else -1."""
    if not old.num_rows or not tonight.num_rows:
        return np.full(tonight.num_rows, -1, np.int64)
    columns = key_columns(tonight, old)
    # A null key matches nothing: pc.index_in never matches a null needle with a null in the set
    # when nulls are skipped (the default), and rows with a null part join to null.
    where = pc.index_in(_joined(tonight, columns), value_set=_joined(old, columns))
    out = where.to_numpy(zero_copy_only=False)
    out = np.where(np.isnan(out.astype(np.float64)), -1, np.nan_to_num(out.astype(np.float64))).astype(np.int64)
    out[unknown(tonight, columns)] = -1
    return out


def unchanged(tonight: pa.Table, old: pa.Table) -> np.ndarray:
    """Per row of ``tonight``: whether ``old`` holds the same item unchanged."""
    return match_items(tonight, old) >= 0


def unverifiable(tonight: pa.Table, old: pa.Table) -> np.ndarray:
    """Per row of ``tonight``: its uri was in ``old`` but a version is unknown (a null
    fingerprint tonight or then), so it can be shown neither unchanged nor changed."""
    columns = key_columns(tonight, old)
    if "fingerprint" not in columns or not tonight.num_rows:
        return np.zeros(tonight.num_rows, bool)
    uri_now, uri_old = tonight["uri"].combine_chunks(), old["uri"].combine_chunks()
    seen = pc.is_in(uri_now, value_set=uri_old).to_numpy(zero_copy_only=False)
    unknown_then = uri_old.filter(pa.array(unknown(old, columns)))
    then = pc.is_in(uri_now, value_set=unknown_then).to_numpy(zero_copy_only=False) if len(unknown_then) else False
    return seen & (unknown(tonight, columns) | then)


def key_hashes(uri, fingerprint) -> np.ndarray:
    """Stable 64-bit hashes of ``(uri, fingerprint)`` versions (pandas' keyed SipHash: the same
    in every process), for the embedding store's files. Arrow or numpy columns in; a row whose
    key is unknown hashes to 0, which the store never reuses."""
    table = pa.table({"uri": _as_array(uri), "fingerprint": _as_array(fingerprint)})
    values = _joined(table, list(KEY_COLUMNS)).to_numpy(zero_copy_only=False)
    valid = ~pd.isna(values)
    out = np.zeros(len(values), np.uint64)
    if valid.any():
        out[valid] = pd.util.hash_array(values[valid].astype(object), categorize=False)
    return out.view(np.int64)


def object_ids(uri, bbox, *, grid: float = 0.5) -> pa.Array:
    """A box's identity from night to night: its image's ``uri`` and its geometry (``[x, y, w,
    h]``, pixels, snapped to ``grid`` so that a float written back a little differently names
    the same box), as a hex string. Not the input's annotation id, which an export renumbers;
    not the label, so a relabelled box is the same object (its change is the diff's to report).
    Two boxes with the same geometry on one image (a duplicate box) get the order they came in
    as a third part. Whether the box is *unchanged* is its image's question, asked by the rule
    above (``uri`` and ``fingerprint``): a box of a changed image is a changed object. A row
    with a null uri or bbox gets a null id."""
    uris, boxes = _as_array(uri).cast(pa.string()), _as_array(bbox)
    n = len(uris)
    # Two passes over bounded chunks (a million boxes never become a million Python lists at
    # once): the keys' 64-bit hashes give each key its order of appearance, then the ids.
    hashes = np.zeros(n, np.uint64)
    known = np.zeros(n, bool)
    for start in range(0, n, IDS_CHUNK):
        keys = _geometry_keys(uris, boxes, start, grid)
        mine = np.array([k is not None for k in keys], bool)
        known[start:start + len(keys)] = mine
        if mine.any():
            hashes[start:start + len(keys)][mine] = pd.util.hash_array(
                np.array([k for k in keys if k is not None], dtype=object), categorize=False)
    rank = np.zeros(n, np.int64)
    rows = np.flatnonzero(known)
    if len(rows):
        order = rows[np.argsort(hashes[rows], kind="stable")]
        sorted_hashes = hashes[order]
        starts = np.flatnonzero(np.r_[True, sorted_hashes[1:] != sorted_hashes[:-1]])
        rank[order] = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    out: list[pa.Array] = []
    for start in range(0, n, IDS_CHUNK):
        out.append(pa.array([None if key is None else hashlib.blake2b(f"{key}{_SEPARATOR}{rank[i]}".encode(),
                                                                       digest_size=12).hexdigest()
                             for i, key in enumerate(_geometry_keys(uris, boxes, start, grid), start)], pa.string()))
    return pa.concat_arrays(out) if out else pa.array([], pa.string())


IDS_CHUNK = 65_536  # boxes turned into key text at a time


def _geometry_keys(uris: pa.Array, boxes: pa.Array, start: int, grid: float) -> list[str | None]:
    """``uri`` + snapped geometry of the boxes ``start:start + IDS_CHUNK`` (None: unknown)."""
    out = []
    for u, box in zip(uris.slice(start, IDS_CHUNK).to_pylist(), boxes.slice(start, IDS_CHUNK).to_pylist()):
        if u is None or box is None or any(v is None for v in box):
            out.append(None)
            continue
        geometry = ",".join(f"{round(float(v) / grid) * grid:g}" for v in box)
        out.append(f"{u}{_SEPARATOR}{geometry}")
    return out


def _as_array(values) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks()
    return values if isinstance(values, pa.Array) else pa.array(values)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser over uint64 (a well-spread 64-bit hash of a 64-bit value)."""
    with np.errstate(over="ignore"):
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))


def crop_keys(image_keys: np.ndarray, boxes: np.ndarray, *, salt: str) -> np.ndarray:
    """Per box, the 64-bit key of its crop vector: what makes an unchanged box's crop reusable.

    Built on the rule above: the box's image version (``image_keys``, :func:`key_hashes` of its
    ``uri`` and ``fingerprint``, 0 when unknown) plus the box's geometry as the annotations give
    it (``boxes``, ``(m, 4)``) and ``salt`` (what else shapes the crop: its margin, its size).
    Two boxes of one image with the same geometry get their order of appearance as another
    part, so no two boxes share a key. An unknown image version keys to 0 (never reused)."""
    image_keys = np.asarray(image_keys, np.int64)
    h = _mix(image_keys.view(np.uint64) ^ np.uint64(int(hashlib.blake2b(salt.encode(), digest_size=8).hexdigest(), 16)))
    for part in np.ascontiguousarray(np.asarray(boxes, np.float64).reshape(-1, 4)).view(np.uint64).T:
        h = _mix(h ^ part)
    # The n-th box with this geometry on this image: its n as a last part.
    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    rank = np.empty(len(h), np.int64)
    starts = np.searchsorted(inverse[order], np.arange(len(first)))
    rank[order] = np.arange(len(h)) - np.repeat(starts, np.diff(np.append(starts, len(h))))
    keys = _mix(h ^ rank.astype(np.uint64)).view(np.int64)
    return np.where(image_keys == 0, 0, keys)


def background_keys(image_keys: np.ndarray, box_keys_per_image: list[np.ndarray], count: int, *,
                    salt: str) -> np.ndarray:
    """``(n, count)`` keys of each image's background squares: they are placed away from the
    image's boxes, so they depend on its image version and its whole set of boxes (their crop
    keys): a changed box set cuts new ones."""
    image_keys = np.asarray(image_keys, np.int64)
    base = np.array([np.bitwise_xor.reduce(_mix(np.asarray(k, np.int64).view(np.uint64))) if len(k) else 0
                     for k in box_keys_per_image], np.uint64).reshape(-1)
    salted = crop_keys(image_keys, np.zeros((len(image_keys), 4)), salt=f"background\x00{salt}").view(np.uint64)
    out = np.stack([_mix(salted ^ _mix(base + np.uint64(j + 1))) for j in range(count)], axis=1) \
        if count else np.zeros((len(image_keys), 0), np.uint64)
    out = out.view(np.int64)
    out[image_keys == 0] = 0
    return out
