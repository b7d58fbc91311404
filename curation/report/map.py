"""The report's 2-D map: which items are plotted (``choose_map_rows``) and where (``map_coordinates``).

The map is a capped sample, whatever N is: every flagged item (duplicates, junk, suspected
mislabels) and every member of the review selections (``edge_cases``, ``label_review``) comes
first, because those are what a user opens the map to look at; the rest is a sample stratified
by label (by cluster when unlabelled), so small classes stay visible. Only the sample's vectors
are fetched, in one Ray task (on a GPU worker with cuML's UMAP when the cluster has one).
"""

from __future__ import annotations

import logging
import time
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.config import ReportConfig
from curation.item_key import match_items
from curation.schema import is_ok
from curation.scores import flag_columns
from curation.scores.clusters import kmeans_backend
from curation.index.source import as_source
from curation.session import run_tasks
from curation.sizing import ClusterShape, gpu_request

log = logging.getLogger(__name__)

SEED = 0
PCA_DIMS = 50
UMAP_NEIGHBOURS = 15
UMAP_MIN_DIST = 0.1
REVIEW_MODES = ("edge_cases", "label_review")


def flag(samples: pa.Table, name: str) -> np.ndarray:
    """A boolean column as a mask (null and a missing column read as False)."""
    if name not in samples.column_names:
        return np.zeros(samples.num_rows, bool)
    return pc.fill_null(samples[name], False).to_numpy(zero_copy_only=False).astype(bool)


def rows_of(samples: pa.Table, uris) -> np.ndarray:
    """Sample row positions of ``uris`` (uris are unique in ``samples``); unknown uris are dropped."""
    position = pc.index_in(uris, value_set=samples["uri"]).to_numpy(zero_copy_only=False)
    position = np.asarray(position, dtype=np.float64)
    return np.unique(position[np.isfinite(position)].astype(np.int64))


def highlight_masks(samples: pa.Table, selections: dict[str, pa.Table], modes: dict[str, str]) -> dict[str, np.ndarray]:
    """One boolean mask per highlight the page offers: the flags, then each selection.

    Args:
        samples: the scored samples.
        selections: selection name -> its table (``uri`` column).
        modes: selection name -> its mode.
    """
    masks = {
        "duplicates": pc.is_valid(samples["dup_group"]).to_numpy(zero_copy_only=False).astype(bool)
        if "dup_group" in samples.column_names else np.zeros(samples.num_rows, bool),
        "junk": np.logical_or.reduce([flag(samples, c) for c in flag_columns("junk")]),
        "suspected mislabels": np.logical_or.reduce([flag(samples, c) for c in flag_columns("mislabel")]),
    }
    for name, table in selections.items():
        mask = np.zeros(samples.num_rows, bool)
        mask[rows_of(samples, table["uri"])] = True
        masks[f"selection: {name} ({modes.get(name, '?')})"] = mask
    return masks


def must_show(samples: pa.Table, selections: dict[str, pa.Table], modes: dict[str, str]) -> np.ndarray:
    """Rows the map includes before any sampling: flagged items and review-selection members."""
    masks = highlight_masks(samples, {n: t for n, t in selections.items() if modes.get(n) in REVIEW_MODES}, modes)
    return np.logical_or.reduce(list(masks.values()))


def strata(samples: pa.Table) -> np.ndarray:
    """A stratum code per row: the label, else the cluster (-1 when neither)."""
    label = samples["label"] if "label" in samples.column_names else pa.nulls(samples.num_rows, pa.string())
    codes = pc.dictionary_encode(label).combine_chunks()
    out = np.asarray(codes.indices.to_numpy(zero_copy_only=False), dtype=np.float64)
    out = np.where(np.isfinite(out), out, -1).astype(np.int64)
    if "cluster" in samples.column_names:
        cluster = np.asarray(samples["cluster"].to_numpy(zero_copy_only=False), dtype=np.float64)
        cluster = np.where(np.isfinite(cluster), cluster, -1).astype(np.int64)
        base = len(codes.dictionary)
        out = np.where((out < 0) & (cluster >= 0), base + cluster, out)
    return out


def choose_map_rows(ok: np.ndarray, must: np.ndarray, codes: np.ndarray, cap: int, *, seed: int = SEED) -> np.ndarray:
    """Sorted rows to plot: ok rows only, at most ``cap``; ``must`` rows first (a random subset
    of them when they alone exceed ``cap``), then the other ok rows stratified by ``codes``
    (each stratum in proportion to its size, at least one item while room lasts)."""
    rng = np.random.default_rng(seed)
    must_rows = np.flatnonzero(ok & must)
    if cap <= 0:
        return np.zeros(0, np.int64)
    if len(must_rows) >= cap:
        return np.sort(rng.choice(must_rows, cap, replace=False))
    rest = np.flatnonzero(ok & ~must)
    room = cap - len(must_rows)
    if len(rest) <= room:
        return np.sort(np.concatenate([must_rows, rest]))
    values, inverse, counts = np.unique(codes[rest], return_inverse=True, return_counts=True)
    quota = np.floor(counts * room / len(rest)).astype(np.int64)
    quota = np.maximum(quota, np.minimum(counts, 1))
    while quota.sum() > room:  # the minimum of one per stratum overshot: trim the largest
        quota[np.argmax(quota)] -= 1
    order = rng.permutation(len(rest))
    picked = []
    for stratum in range(len(values)):
        members = order[inverse[order] == stratum][: quota[stratum]]
        picked.append(rest[members])
    chosen = np.concatenate(picked) if picked else np.zeros(0, np.int64)
    left = room - len(chosen)
    if left > 0:  # rounding left room: fill it at random from the rest
        spare = np.setdiff1d(rest, chosen)
        chosen = np.concatenate([chosen, rng.choice(spare, min(left, len(spare)), replace=False)])
    return np.sort(np.concatenate([must_rows, chosen]))


def map_backend() -> str:
    """``cuml`` when cuML imports and a GPU is visible, else ``umap-learn``."""
    return "cuml" if kmeans_backend() == "cuml" else "umap-learn"


# umap-learn's own numba functions are compiled in every new process (~8 s here: most are not
# declared cache=True) and, below 4,096 points, it finds neighbours by calling a numba distance
# from Python for every pair (~4 s at 2,600 points). The map sample's exact neighbours from
# FAISS cost well under a second at the 20,000-point cap, and the compiled functions are kept
# on disk (numba's cache, beside umap's sources or in NUMBA_CACHE_DIR) for the next process.
_NUMBA_CACHED = False


def enable_numba_cache() -> int:
    """Turn on numba's on-disk cache for umap-learn's compiled functions (best effort; how many)."""
    global _NUMBA_CACHED
    if _NUMBA_CACHED:
        return 0
    _NUMBA_CACHED = True
    try:
        import importlib

        from numba.core.caching import NullCache
        from numba.core.registry import CPUDispatcher
    except ImportError:
        return 0
    count = 0
    for name in ("umap.umap_", "umap.layouts", "umap.utils", "umap.distances", "umap.sparse", "umap.spectral"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for value in vars(module).values():
            if isinstance(value, CPUDispatcher) and isinstance(getattr(value, "_cache", None), NullCache):
                try:
                    value.enable_caching()
                    count += 1
                except Exception:  # a function numba cannot cache: compiled per process, as before
                    continue
    return count


def warm_numba_cache() -> float:
    """Compile the map's numba functions into numba's on-disk cache (``make venv`` runs this
    once), so that the first run's map task loads them instead of compiling for ~15 s. Seconds."""
    start = time.perf_counter()
    x = np.random.default_rng(SEED).normal(size=(200, 8)).astype(np.float32)
    embed_2d(x, "umap")
    return time.perf_counter() - start


def exact_knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, None]:
    """``(ids, euclidean distances, None)`` of every row's ``k`` nearest rows (itself first), as
    umap-learn's ``precomputed_knn`` takes them."""
    import faiss

    x = np.ascontiguousarray(x, np.float32)
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    squared, ids = index.search(x, k)
    return ids.astype(np.int64), np.sqrt(np.maximum(squared, 0)).astype(np.float32), None


def embed_2d(x: np.ndarray, method: str, *, seed: int = SEED) -> tuple[np.ndarray, str]:
    """(n, 2) float32 coordinates of the rows of ``x`` and a description of how they were made."""
    from sklearn.decomposition import PCA

    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if n < 3:
        return np.zeros((n, 2), np.float32), "too few points"
    if method == "pca" or n <= UMAP_NEIGHBOURS + 1:
        xy = PCA(n_components=2, random_state=seed).fit_transform(x)
        return xy.astype(np.float32), "PCA"
    reduced = PCA(n_components=min(PCA_DIMS, d, n), random_state=seed).fit_transform(x) if d > PCA_DIMS else x
    backend = map_backend()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # umap-learn warns that a seed turns off its parallelism
        if backend == "cuml":
            from cuml.manifold import UMAP

            model = UMAP(n_neighbors=UMAP_NEIGHBOURS, min_dist=UMAP_MIN_DIST, random_state=seed, init="spectral")
        else:
            enable_numba_cache()
            from umap import UMAP

            model = UMAP(n_neighbors=UMAP_NEIGHBOURS, min_dist=UMAP_MIN_DIST, random_state=seed, init="pca",
                         precomputed_knn=exact_knn(reduced, UMAP_NEIGHBOURS))
        xy = np.asarray(model.fit_transform(reduced), dtype=np.float32)
    return xy, f"UMAP ({backend}, after PCA to {reduced.shape[1]} dims)"


def _embed_sample(vectors, ids: np.ndarray, method: str) -> tuple[np.ndarray, str]:
    return embed_2d(vectors.take(ids), method)


def layout_in_task(vectors, ids: np.ndarray, method: str, *, what: str) -> tuple[np.ndarray, str]:
    """2-D coordinates of the vectors ``ids`` (sorted) in one Ray task sized for the map (on a
    GPU worker when the cluster has one), and how they were made; ``what`` names the task."""
    shape = ClusterShape.current()
    request = shape.fit(what, cpus=1, gpus=gpu_request(shape))
    return run_tasks(_embed_sample, [(as_source(vectors), ids, method)], request=request)[0]


REUSE_MIN_SHARE = 0.5  # an incremental night keeps the previous layout when this share of the points had a place


def _place_new(vectors, anchor_ids: np.ndarray, anchor_xy: np.ndarray, new_ids: np.ndarray) -> np.ndarray:
    """New points at their nearest anchor's place (cosine over the vectors), slightly jittered."""
    import faiss

    anchors = np.ascontiguousarray(vectors.take(anchor_ids), np.float32)
    index = faiss.IndexFlatIP(anchors.shape[1])
    index.add(anchors)
    _, nearest = index.search(np.ascontiguousarray(vectors.take(new_ids), np.float32), 1)
    spread = np.nanstd(anchor_xy, axis=0) * 0.01
    jitter = np.random.default_rng(SEED).normal(size=(len(new_ids), 2)) * spread
    return (anchor_xy[nearest[:, 0]] + jitter).astype(np.float32)


def _prefer_placed(rows: np.ndarray, previous, samples: pa.Table, ok: np.ndarray, must: np.ndarray) -> np.ndarray:
    """As many rows as ``rows``, preferring items the previous run placed: must-show items it
    placed, then other must-show items, then other items it placed, then ``rows``' own sample.
    The map then keeps last night's points where it can."""
    rng = np.random.default_rng(SEED)
    ok_rows = np.flatnonzero(ok)
    known = previous_layout(previous, samples, ok_rows)
    was = np.zeros(len(ok), bool)
    was[ok_rows[np.isfinite(known[:, 0])]] = True
    cap = len(rows)
    sampled = np.zeros(len(ok), bool)
    sampled[rows] = True
    tiers = [ok & must & was, ok & must & ~was, ok & was & ~must, sampled & ~must & ~was]
    picked: list[np.ndarray] = []
    room = cap
    for tier in tiers:
        members = rng.permutation(np.flatnonzero(tier))[:room]
        picked.append(members)
        room -= len(members)
        if room <= 0:
            break
    return np.sort(np.concatenate(picked))


def previous_layout(previous, samples: pa.Table, rows: np.ndarray) -> np.ndarray:
    """``(len(rows), 2)`` coordinates the previous run gave the same items (same uri and
    fingerprint), NaN for the others."""
    out = np.full((len(rows), 2), np.nan, np.float32)
    old = previous.items(["x", "y"], ok_only=False)
    if old is None or "x" not in old.column_names:
        return out
    old = old.filter(pc.is_valid(old["x"]))
    where = match_items(samples.take(pa.array(rows, pa.int64())), old)
    found = where >= 0
    at = where[found]
    out[found, 0] = old["x"].to_numpy(zero_copy_only=False)[at]
    out[found, 1] = old["y"].to_numpy(zero_copy_only=False)[at]
    return out


def map_coordinates(samples: pa.Table, vectors, selections: dict[str, pa.Table], modes: dict[str, str],
                    config: ReportConfig, *, previous=None) -> tuple[pa.Table, dict]:
    """``samples`` with ``x``, ``y`` set for the chosen rows (null elsewhere), and a summary.

    Args:
        samples: scored samples; ok rows carry ``vector_id`` (else ok rows in order are ids 0..).
        vectors: the ok rows' vectors (a source in storage or a matrix).
        selections, modes: the built selections and their modes (their review members are mapped).
        config: the ``report`` section.
        previous: on an incremental night, the previous run: points it placed keep their place
            and the others go beside their nearest placed neighbour, unless fewer than
            ``REUSE_MIN_SHARE`` of the points had a place (then a new layout is made).
    """
    start = time.perf_counter()
    ok = is_ok(samples["status"])
    rows = choose_map_rows(ok, must_show(samples, selections, modes), strata(samples), config.map_points)
    coords = np.full((samples.num_rows, 2), np.nan, np.float32)
    how = "none"
    if len(rows):
        if "vector_id" in samples.column_names:
            ids = samples["vector_id"].to_numpy(zero_copy_only=False)[rows].astype(np.int64)
        else:
            ids = np.searchsorted(np.flatnonzero(ok), rows)
        if previous is not None:
            rows = _prefer_placed(rows, previous, samples, ok, must_show(samples, selections, modes))
            ids = (samples["vector_id"].to_numpy(zero_copy_only=False)[rows].astype(np.int64)
                   if "vector_id" in samples.column_names else np.searchsorted(np.flatnonzero(ok), rows))
        order = np.argsort(ids)
        known = previous_layout(previous, samples, rows) if previous is not None else None
        placed = np.isfinite(known[:, 0]) if known is not None else np.zeros(len(rows), bool)
        if placed.mean() >= REUSE_MIN_SHARE and (~placed).any():
            xy = run_tasks(_place_new, [(as_source(vectors), ids[placed], known[placed], ids[~placed])])[0]
            coords[rows[placed]] = known[placed]
            coords[rows[~placed]] = xy
            how = f"the previous run's layout ({int(placed.sum())} points kept, {int((~placed).sum())} placed beside " \
                  f"their nearest kept point)"
        elif placed.mean() >= REUSE_MIN_SHARE:
            coords[rows] = known
            how = "the previous run's layout"
        else:
            xy, how = layout_in_task(vectors, ids[order], config.map_method, what="the map's UMAP task")
            coords[rows[order]] = xy
    has = np.isfinite(coords[:, 0])
    for name, column in (("x", coords[:, 0]), ("y", coords[:, 1])):
        array = pa.array(column, pa.float32(), mask=~has)
        if name in samples.column_names:
            samples = samples.set_column(samples.column_names.index(name), name, array)
        else:
            samples = samples.append_column(name, array)
    info = {"method": how, "points": int(has.sum()), "seconds": round(time.perf_counter() - start, 3)}
    log.info("map: %d points by %s in %.1fs", info["points"], how, info["seconds"])
    return samples, info
