"""Nightly kNN graphs that cost what changed: the previous published run's graph, updated.

An item whose uri and fingerprint the previous run had (unchanged) keeps its previous
neighbour list, mapped to tonight's ids. Then:

* **new and changed items** are searched against every vector tonight, for ``WIDE * k``
  neighbours (their own top k, and candidates for the reverse direction);
* **old items that lost a neighbour** (deleted or changed tonight) are searched again;
* **reverse edges**: a new item enters an old item's list when it is closer than that item's
  k-th neighbour. On the exact path every old item is checked against every new item (exact:
  the graph equals a full recompute, up to ties); on the sharded path the candidates come from
  the new items' wide lists (an old item farther than ``WIDE * k`` from a new one is missed;
  the recall against a full recompute is measured in ``benchmarks/incremental.py``).

On the sharded path the previous run's trained coarse quantiser (``index/trained.faissindex``)
is reused instead of trained again, unless the new items sit farther from its centroids than
the old ones do (``QUANTISER_DRIFT``): then it is retrained. The shards are filled with
tonight's vectors (streamed from storage, as on a full night) and asked only the queries above.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.index.knn import KnnGraph, drop_self, id_dtype
from curation.io.filesystem import Location

log = logging.getLogger(__name__)

WIDE = 3  # new items are searched for WIDE * k neighbours, so the reverse direction is covered
QUANTISER_DRIFT = 1.5  # retrain when new items' mean distance to their coarse centroid is this many times the old items'
DRIFT_SAMPLE = 2000  # items of each kind that measure it
KNN_SETTINGS = ("k", "index", "exact_below", "nlist", "nprobe", "codec", "refine_factor", "train_size", "max_flat_bytes")


@dataclass
class Carried:
    """The previous run's graph in tonight's ids.

    Attributes:
        ids, sims: ``(n, k)``; rows of items the previous run did not have are empty (-1, -inf).
        carried: tonight's items whose previous row was kept (same uri and fingerprint).
        lost: carried rows that lost a neighbour (deleted or changed tonight) or are short.
        deleted: previous ok items gone or changed tonight.
    """

    ids: np.ndarray
    sims: np.ndarray
    carried: np.ndarray
    lost: np.ndarray
    deleted: int


def carry_previous(previous: Location, samples: pa.Table, k: int, *, folder: str = "knn") -> Carried | None:
    """The previous run's ``folder`` graph (``knn/`` or ``knn-copies/``) mapped onto tonight's
    ok items (``samples`` with ``vector_id``); None when that run has no such graph."""
    import pyarrow.dataset as ds

    from curation.schema import is_ok, item_key_columns, item_keys, ok_rows_in_vector_order

    graph_folder, samples_folder = previous.child(folder), previous.child("samples")
    try:
        old = ds.dataset(samples_folder.path, filesystem=samples_folder.filesystem, format="parquet")
        old = old.to_table(columns=[c for c in ("input_id", "uri", "fingerprint", "status") if c in old.schema.names])
        graph = ds.dataset(graph_folder.path, filesystem=graph_folder.filesystem, format="parquet").to_table(
            columns=["input_id", "neighbor_ids", "neighbor_similarities"])
    except (OSError, pa.ArrowException, ValueError):
        return None
    old = old.filter(pa.array(is_ok(old["status"])))
    rows = ok_rows_in_vector_order(samples)
    n = len(rows)
    use = item_key_columns(samples, old)
    tonight = item_keys(samples.take(pa.array(rows, pa.int64())), use)
    # previous input_id -> tonight's vector id (-1: deleted or changed)
    where = pc.index_in(item_keys(old, use), value_set=tonight).to_numpy(zero_copy_only=False)
    where = np.where(np.isnan(where.astype(np.float64)), -1, np.nan_to_num(where)).astype(np.int64)
    old_input = old["input_id"].to_numpy()
    size = int(max(old_input.max(initial=-1), graph["input_id"].to_numpy().max(initial=-1)) + 1)
    to_tonight = np.full(size, -1, np.int64)
    to_tonight[old_input] = where
    deleted = int((where < 0).sum())

    ids = np.full((n, k), -1, id_dtype(n))
    sims = np.full((n, k), -np.inf, np.float32)
    carried = np.zeros(n, bool)
    lost = np.zeros(n, bool)
    own = to_tonight[graph["input_id"].to_numpy()]
    keep = own >= 0
    if keep.any():
        lists = graph["neighbor_ids"].combine_chunks()
        offsets = lists.offsets.to_numpy()
        flat = to_tonight[lists.values.to_numpy()]
        flat_sims = graph["neighbor_similarities"].combine_chunks().values.to_numpy()
        lengths = np.diff(offsets)
        # Row r, slot j <- flat[offsets[r] + j] for j < min(length, k), dropping unmapped neighbours.
        row_of = np.repeat(np.arange(len(lengths)), lengths)
        slot = np.arange(len(flat)) - offsets[:-1][row_of]
        valid = (flat >= 0) & (slot < k) & keep[row_of]
        missing = np.bincount(row_of[(flat < 0) & (slot < k)], minlength=len(lengths)) > 0
        # Compact the surviving neighbours to the left, in their order.
        rank = np.cumsum(valid) - 1
        first = np.concatenate([[0], np.cumsum(np.bincount(row_of[valid], minlength=len(lengths)))])[:-1]
        slot_new = rank - first[row_of]
        target = own[row_of[valid]]
        ids[target, slot_new[valid]] = flat[valid]
        sims[target, slot_new[valid]] = flat_sims[valid]
        carried[own[keep]] = True
        short = lengths < min(k, n - 1)
        lost[own[keep]] = (missing | short)[keep]
    return Carried(ids, sims, carried, lost, deleted)


def merge_candidates(ids: np.ndarray, sims: np.ndarray, rows: np.ndarray, cand: np.ndarray, cand_sims: np.ndarray) -> int:
    """Insert candidate neighbours ``cand`` (with ``cand_sims``) into rows ``rows`` of the graph
    where they beat the current k-th; returns how many were inserted."""
    k = ids.shape[1]
    better = (cand_sims > sims[rows, k - 1]) & ~(ids[rows] == cand[:, None]).any(axis=1)
    rows, cand, cand_sims = rows[better], cand[better], cand_sims[better]
    if len(rows) == 0:
        return 0
    order = np.lexsort((-cand_sims, rows))
    rows, cand, cand_sims = rows[order], cand[order], cand_sims[order]
    unique, start = np.unique(rows, return_index=True)
    rank = np.arange(len(rows)) - np.repeat(start, np.diff(np.r_[start, len(rows)]))
    take = rank < k
    position = np.searchsorted(unique, rows[take])
    extra_ids = np.full((len(unique), k), -1, ids.dtype)
    extra_sims = np.full((len(unique), k), -np.inf, np.float32)
    extra_ids[position, rank[take]] = cand[take]
    extra_sims[position, rank[take]] = cand_sims[take]
    all_ids = np.concatenate([ids[unique], extra_ids], axis=1)
    all_sims = np.concatenate([sims[unique], extra_sims], axis=1)
    top = np.argsort(-all_sims, axis=1, kind="stable")[:, :k]
    ids[unique] = np.take_along_axis(all_ids, top, axis=1)
    sims[unique] = np.take_along_axis(all_sims, top, axis=1)
    return int(np.isin(extra_ids, ids[unique]).sum())


def quantiser_drift(trained: Location, source, new_ids: np.ndarray, old_ids: np.ndarray) -> float:
    """New items' mean distance to their nearest coarse centroid over the old items' (samples)."""
    import faiss

    from curation.index.shard import load_index

    index = load_index(trained)
    holder = index.base_index if isinstance(index, faiss.IndexRefine) else index
    try:
        quantiser = faiss.extract_index_ivf(holder).quantizer
    except RuntimeError:
        return 1.0  # a flat index has no centroids to drift from
    rng = np.random.default_rng(0)

    def mean_distance(ids):
        ids = np.sort(rng.choice(ids, min(len(ids), DRIFT_SAMPLE), replace=False))
        sims, _ = quantiser.search(np.ascontiguousarray(source.take(ids), np.float32), 1)
        return float(np.mean(1.0 - sims[:, 0]))

    if len(new_ids) == 0 or len(old_ids) == 0:
        return 1.0
    return mean_distance(new_ids) / max(mean_distance(old_ids), 1e-9)


def update_graph(source, carried: Carried, k: int, *, search) -> tuple[KnnGraph, dict]:
    """Tonight's graph from ``carried`` rows: ``search(query_ids, width)`` returns the
    ``(ids, sims)`` of those queries among all of tonight's vectors (self excluded), and is
    asked only for new items, changed ones and old items that lost a neighbour."""
    t = time.perf_counter()
    n = len(carried.carried)
    ids, sims = carried.ids.copy(), carried.sims.copy()
    queries = np.flatnonzero(~carried.carried | carried.lost)
    new = ~carried.carried
    info = {"carried_rows": int(carried.carried.sum() - carried.lost.sum()), "new_or_changed": int(new.sum()),
            "lost_a_neighbour": int(carried.lost.sum()), "deleted_or_changed_before": carried.deleted,
            "searched": int(len(queries))}
    if len(queries):
        width = min(WIDE * k, n - 1)
        found_ids, found_sims = search(queries, width)
        ids[queries] = found_ids[:, :k]
        sims[queries] = found_sims[:, :k]
        # Reverse edges from the new items' wide lists into old rows not searched again.
        is_new_query = new[queries]
        rows = found_ids[is_new_query].ravel().astype(np.int64)
        cand = np.repeat(queries[is_new_query], found_ids.shape[1])
        cand_sims = found_sims[is_new_query].ravel()
        open_row = (rows >= 0)
        open_row[open_row] = carried.carried[rows[open_row]] & ~carried.lost[rows[open_row]]
        info["reverse_inserted"] = merge_candidates(ids, sims, rows[open_row], cand[open_row], cand_sims[open_row])
    info["update_s"] = round(time.perf_counter() - t, 3)
    return KnnGraph(ids, sims), info


def exact_search(x: np.ndarray):
    """``search`` for :func:`update_graph` over an in-memory matrix (the exact path), plus the
    exact reverse check: every old item against every new one."""
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(np.ascontiguousarray(x, np.float32))

    def search(queries: np.ndarray, width: int):
        found_sims, found_ids = index.search(np.ascontiguousarray(x[queries]), width + 1)
        found_sims, found_ids = drop_self(found_sims, found_ids, queries, width)
        return found_ids, found_sims

    return search


def exact_reverse(graph: KnnGraph, x: np.ndarray, new: np.ndarray, skip: np.ndarray) -> int:
    """Every item not in ``skip`` against every ``new`` item, exactly: a new item enters a row
    where it beats the k-th. Returns the insertions."""
    import faiss

    new_ids = np.flatnonzero(new)
    rows = np.flatnonzero(~skip)
    if len(new_ids) == 0 or len(rows) == 0:
        return 0
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(np.ascontiguousarray(x[new_ids], np.float32))
    width = min(graph.k, len(new_ids))
    found_sims, local = index.search(np.ascontiguousarray(x[rows], np.float32), width)
    cand = np.where(local >= 0, new_ids[np.maximum(local, 0)], -1)
    valid = (cand >= 0) & (cand != rows[:, None])
    return merge_candidates(graph.ids, graph.sims, np.repeat(rows, width)[valid.ravel()], cand[valid],
                            found_sims[valid])


def read_previous_info(previous: Location) -> dict:
    from curation.run_info import RunInfo

    try:
        return RunInfo.read(previous).to_dict()
    except (OSError, ValueError):
        return {}


def why_not(cfg, previous: Location | None, previous_info: dict, model_id: str, n_items: int,
            carried: Carried | None, kind: str) -> str | None:
    """The reason tonight's graph is built whole, or None when the previous one can be updated."""
    if cfg.incremental == "off":
        return "knn.incremental is off"
    if previous is None:
        return "first night: no previous published run"
    if not previous_info:
        return "the previous run's run.json cannot be read"
    if str(previous_info.get("embedder", {}).get("model_id")) != model_id:
        return "the embedder changed"
    before = (previous_info.get("config") or {}).get("knn") or {}
    changed = [key for key in KNN_SETTINGS if before.get(key) != getattr(cfg, key)]
    if changed:
        return f"knn settings changed: {', '.join(changed)}"
    knn = previous_info.get("knn") or {}
    if knn.get("kind") != kind:
        return f"the index kind changed ({knn.get('kind')} then, {kind} now)"
    chain = int((knn.get("incremental") or {}).get("nights_since_rebuild", 0))
    if chain + 1 >= cfg.rebuild_every:
        return f"knn.rebuild_every: {chain + 1} nights since the graph was built whole"
    if carried is None:
        return "the previous run has no saved graph"
    changed_share = (int((~carried.carried).sum()) + carried.deleted) / max(n_items, 1)
    if changed_share > cfg.incremental_max_change:
        return f"{changed_share:.0%} of the items changed (knn.incremental_max_change {cfg.incremental_max_change})"
    return None


def neighbour_graph(vectors, cfg, *, samples, save_to: Location | None, previous: Location | None,
                    previous_info: dict, model_id: str, folder: str = "knn",
                    index_folder: str = "index") -> tuple[KnnGraph, dict]:
    """Tonight's graph: the previous run's updated when it can be (see the module), else built
    whole; ``info["incremental"]`` says which and why."""
    from curation.index.params import IndexParams
    from curation.index.sharded import index_params, knn_graph, sharded_knn
    from curation.index.source import as_source

    source = as_source(vectors)
    n = source.n
    params = index_params(source, cfg)
    carried = (carry_previous(previous, samples, cfg.k, folder=folder)
               if previous is not None and cfg.incremental != "off" else None)
    reason = why_not(cfg, previous, previous_info, model_id, n, carried, params.kind)
    before = (previous_info.get("knn") or {})
    if folder != "knn":
        before = before.get("copies") or {}
    trained = None
    if reason is None and params.kind == "ivf":
        trained = previous.child(index_folder, "trained.faissindex")
        if trained.filesystem.get_file_info(trained.path).type.name != "File":
            reason = "the previous run saved no trained index"
        else:  # the previous index's lists and codec, tonight's shard count
            params = IndexParams(params.kind, before.get("codec", params.codec), int(before.get("nlist") or params.nlist),
                                 int(before.get("nprobe") or params.nprobe), params.train_size, params.shards)
            drift = quantiser_drift(trained, source, np.flatnonzero(~carried.carried), np.flatnonzero(carried.carried))
            if drift > QUANTISER_DRIFT:
                reason = (f"new items sit {drift:.2f}x farther from the index's coarse centroids than old ones "
                          f"(more than {QUANTISER_DRIFT}): retrained")
    if reason is not None:
        graph, info = knn_graph(vectors, cfg, save_to=save_to)
        info["incremental"] = {"used": False, "reason": reason, "nights_since_rebuild": 0}
        log.info("kNN graph built whole (%s)", reason)
        return graph, info
    chain = int((before.get("incremental") or {}).get("nights_since_rebuild", 0))
    info: dict = {"k": cfg.k, **params.to_dict()}
    if params.kind == "flat" and params.shards == 1:
        _, x = source.read_all(0, n)
        graph, update = update_graph(source, carried, cfg.k, search=exact_search(x))
        update["reverse_inserted"] = update.get("reverse_inserted", 0) + exact_reverse(
            graph, x, ~carried.carried, skip=~carried.carried | carried.lost)
        info["method"] = "the previous graph updated exactly (faiss.IndexFlatIP, in process)"
    else:
        timings: dict = {}

        def search(queries, width):
            found, timing = sharded_knn(source, width, params, query_batch=cfg.query_batch, save_to=save_to,
                                        refine_factor=cfg.refine_factor, trained_from=trained, queries=queries)
            timings.update(timing)
            return found.ids, found.sims

        graph, update = update_graph(source, carried, cfg.k, search=search)
        info.update(timings)
        info["method"] = (f"the previous graph updated: {params.factory(source.dim)} over {params.shards} Ray shard "
                          f"actor(s), the previous run's trained index reused")
    info["incremental"] = {"used": True, "previous_run": previous.uri, "nights_since_rebuild": chain + 1, **update}
    log.info("kNN graph updated from %s: %s", previous.uri, update)
    return graph, info
