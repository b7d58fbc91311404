"""Nightly kNN graphs that cost what changed: the previous published run's graph, updated.

An item whose uri and fingerprint the previous run had (unchanged) keeps its previous
neighbour list, mapped to tonight's ids. Then:

* **new and changed items** are searched against every vector tonight, for ``WIDE * k``
  neighbours (their own top k, and candidates for the reverse direction);
* **old items that lost a neighbour** (deleted or changed tonight) are searched again;
* **reverse edges**: a new item enters an old item's list when it is closer than that item's
  last neighbour (margin included). On the exact path every old item is checked against every
  new item (exact: the graph equals a full recompute, up to ties); on the sharded path the
  shards scan the lists each new item probes once, for both directions
  (:meth:`~curation.index.shard.IndexShard.scan`: every pair its search scores, not only its
  own top k), and the candidates from the new items' wide lists join them (all there is for
  a codec the scan cannot read). The recall against a full recompute is measured in
  ``benchmarks/incremental.py``.

On the sharded path the previous run's trained coarse quantiser (``index/trained.faissindex``)
is reused instead of trained again, unless the new items sit farther from its centroids than
the old ones do (``QUANTISER_DRIFT``): then it is retrained. The shards are filled with
tonight's vectors (streamed from storage, as on a full night) and asked only the queries above.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from curation.index.knn import KnnGraph, drop_self, id_dtype
from curation.io.filesystem import Location
from curation.run_layout import TRAINED_INDEX, shard_file
from curation.item_key import match_items
from curation.schema import ok_rows_in_vector_order
from curation.index.shard import load_index
from curation.index.params import IndexParams
from curation.index.sharded import Incremental, index_params, knn_graph, sharded_knn
from curation.index.source import CachedVectors, as_source

if TYPE_CHECKING:
    from curation.published_run import PublishedRun
    from curation.run_info import KnnRecord

log = logging.getLogger(__name__)

WIDE = 3  # new items are searched for WIDE * k neighbours, so the reverse direction is covered
# Each row keeps this many neighbours past the k-th (``knn-margin/``), so that a row whose
# neighbour was deleted or changed tonight is filled from its own next candidates instead of
# being searched again: with 2% of the items gone a night, 18% of the rows lose one of their 10,
# and about 3 in 10 million lose more than 5 of 15.
def margin_of(k: int) -> int:
    return max(1, k // 2)


QUANTISER_DRIFT = 1.5  # retrain when new items' mean distance to their coarse centroid is this many times the old items'
DRIFT_SAMPLE = 2000  # items of each kind that measure it
KNN_SETTINGS = ("k", "index", "exact_below", "nlist", "nprobe", "target_recall", "codec", "refine_factor", "train_size", "max_flat_bytes")


@dataclass
class Carried:
    """The previous run's graph in tonight's ids.

    Attributes:
        ids, sims: ``(n, width)`` (k neighbours and the margin); rows of items the previous run
            did not have are empty (-1, -inf).
        carried: tonight's items whose previous row was kept (same uri and fingerprint).
        lost: carried rows left with fewer than k neighbours once the deleted and changed items
            are taken out (they are searched again).
        deleted: previous ok items gone or changed tonight.
        tonight_of_previous: per previous vector id (a position in its index), tonight's vector
            id (-1: deleted or changed).
    """

    ids: np.ndarray
    sims: np.ndarray
    carried: np.ndarray
    lost: np.ndarray
    deleted: int
    tonight_of_previous: np.ndarray | None = None
    refilled: int = 0  # rows that lost a neighbour and were filled from their margin


def _dense(lists: pa.ChunkedArray, width: int, fill, dtype) -> np.ndarray:
    """The first ``width`` entries of each list as a padded ``(rows, width)`` matrix."""
    lists = lists.combine_chunks()
    offsets = lists.offsets.to_numpy()
    offsets = offsets - offsets[0]
    values = lists.flatten().to_numpy()
    lengths = np.diff(offsets)
    if len(lengths) and (lengths == width).all():  # the usual graph: every row full
        return np.array(values.reshape(len(lengths), width), dtype)  # writable
    out = np.full((len(lengths), width), fill, dtype)
    row_of = np.repeat(np.arange(len(lengths)), lengths)
    slot = np.arange(len(values)) - offsets[:-1][row_of]
    inside = slot < width
    out[row_of[inside], slot[inside]] = values[inside]
    return out


class UntrustedGraph(ValueError):
    """The previous run's saved graph is there but not consistent with that run: tonight's is built whole."""


SIM_CHECK_ROWS = 64  # carried rows whose stored similarities are recomputed from the vectors
SIM_CHECK_TOLERANCE = 0.05  # cosine: loose enough for a quantised index, far below a scrambled graph's error
SIM_CHECK_MAX_BAD = 0.1  # share of checked pairs allowed outside the tolerance


def _check_graph(graph: pa.Table, ids: np.ndarray, sims: np.ndarray, old_input: np.ndarray, where: str) -> None:
    """The saved graph against the run that wrote it: one row per ok item, neighbour ids that
    name that run's items, similarities that are cosines in descending order."""
    own = graph["input_id"].to_numpy()
    if graph.num_rows != len(old_input):
        raise UntrustedGraph(f"{where}: {graph.num_rows} rows for the run's {len(old_input)} ok items")
    if len(np.unique(own)) != len(own) or not np.isin(own, old_input).all():
        raise UntrustedGraph(f"{where}: its input_id column does not name that run's ok items one to one")
    named = ids[ids >= 0]
    if (ids < -1).any() or not np.isin(named, old_input).all():
        bad = ids[(ids < -1) | ((ids >= 0) & ~np.isin(ids, old_input))][0]
        raise UntrustedGraph(f"{where}: neighbour id {int(bad)} is not an item of that run")
    valid = ids >= 0
    values = sims[valid]
    if not np.isfinite(values).all() or (np.abs(values) > 1.01).any():
        raise UntrustedGraph(f"{where}: similarities outside [-1, 1]")
    filled = np.where(valid, sims, 0.0)  # (unnamed slots hold NaN)
    ordered = np.where(valid[:, 1:] & valid[:, :-1], filled[:, 1:] - filled[:, :-1], 0.0)
    if (ordered > 1e-4).any():
        raise UntrustedGraph(f"{where}: neighbours not in descending similarity")


def check_carried_similarities(carried: Carried, source, k: int, where: str, *, seed: int = 0) -> None:
    """Recompute a sample of carried rows' similarities from tonight's vectors (the carried
    items are unchanged, so their vectors are the ones the previous graph was built from)."""
    rows = np.flatnonzero(carried.carried & ((carried.ids[:, :k] >= 0).sum(axis=1) > 0))
    if len(rows) == 0:
        return
    rows = np.sort(np.random.default_rng(seed).choice(rows, min(SIM_CHECK_ROWS, len(rows)), replace=False))
    pairs = [(r, int(j), float(s)) for r in rows
             for j, s in zip(carried.ids[r, :k][:4], carried.sims[r, :k][:4]) if j >= 0]
    ids = np.unique(np.array([p[0] for p in pairs] + [p[1] for p in pairs], np.int64))
    x = source.take(ids, local=True)
    at = {int(i): n for n, i in enumerate(ids)}
    true = np.array([float(x[at[a]] @ x[at[b]]) for a, b, _ in pairs])
    stored = np.array([p[2] for p in pairs])
    bad = np.abs(true - stored) > SIM_CHECK_TOLERANCE
    if bad.mean() > SIM_CHECK_MAX_BAD:
        worst = int(np.argmax(np.abs(true - stored)))
        raise UntrustedGraph(f"{where}: {int(bad.sum())} of {len(pairs)} sampled neighbour similarities differ from "
                             f"the vectors' by more than {SIM_CHECK_TOLERANCE} (e.g. stored {stored[worst]:.3f}, "
                             f"recomputed {true[worst]:.3f})")


def _read_graph(folder: Location) -> pa.Table:
    return ds.dataset(folder.path, filesystem=folder.filesystem, format="parquet").to_table(
        columns=["input_id", "neighbor_ids", "neighbor_similarities"])


def carry_previous(previous: Location, samples: pa.Table, k: int, *, folder: str = "knn",
                   margin: int = 0) -> Carried | None:
    """The previous run's ``folder`` graph (``knn/`` or ``knn-copies/``, followed by its
    ``-margin`` neighbours when it kept them) mapped onto tonight's ok items (``samples`` with
    ``vector_id``), ``k + margin`` wide; None when that run has no such graph."""
    old = previous.items(["input_id", "vector_id"])
    location = previous.child(folder)
    info = location.filesystem.get_file_info(location.path)
    if info.type.name != "Directory":
        return None  # that run saved no graph
    try:
        graph = _read_graph(location)
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise UntrustedGraph(f"{location.uri}: cannot be read ({str(exc).splitlines()[0][:200]})") from None
    if old is None:
        return None
    width = k + margin
    ids_before = _dense(graph["neighbor_ids"], k, -1, np.int64)
    sims_before = _dense(graph["neighbor_similarities"], k, -np.inf, np.float32)
    _check_graph(graph, ids_before, sims_before, old["input_id"].to_numpy(), location.uri)
    if margin:
        ids_before = np.concatenate([ids_before, np.full((len(ids_before), margin), -1, np.int64)], axis=1)
        sims_before = np.concatenate([sims_before, np.full((len(sims_before), margin), -np.inf, np.float32)], axis=1)
        try:  # written in the same row order as the graph
            extra = _read_graph(previous.child(f"{folder}-margin"))
        except (OSError, pa.ArrowException, ValueError):
            extra = None  # a run without a margin (older, or incremental off): its rows are k wide
        if extra is not None and extra.num_rows == graph.num_rows:
            if np.array_equal(extra["input_id"].to_numpy(), graph["input_id"].to_numpy()):
                ids_extra = _dense(extra["neighbor_ids"], margin, -1, np.int64)
                sims_extra = _dense(extra["neighbor_similarities"], margin, -np.inf, np.float32)
                short = (ids_before[:, :k] >= 0).sum(axis=1) < k  # a short row has no margin
                ids_extra[short], sims_extra[short] = -1, -np.inf
                ids_before[:, k:], sims_before[:, k:] = ids_extra, sims_extra
    rows = ok_rows_in_vector_order(samples)
    n = len(rows)
    # previous input_id -> tonight's vector id (-1: deleted or changed)
    where = match_items(old, samples.take(pa.array(rows, pa.int64())))
    old_input = old["input_id"].to_numpy()
    size = int(max(old_input.max(initial=-1), graph["input_id"].to_numpy().max(initial=-1)) + 1)
    to_tonight = np.full(size, -1, np.int64)
    to_tonight[old_input] = where
    deleted = int((where < 0).sum())

    ids = np.full((n, width), -1, id_dtype(n))
    sims = np.full((n, width), -np.inf, np.float32)
    carried = np.zeros(n, bool)
    lost = np.zeros(n, bool)
    own = to_tonight[graph["input_id"].to_numpy()]
    keep = own >= 0
    if keep.any():
        mapped = to_tonight[np.maximum(ids_before[keep], 0)]
        mapped[ids_before[keep] < 0] = -1
        mapped_sims = sims_before[keep]
        valid = mapped >= 0
        # The surviving neighbours moved to the left, in their order (only rows that lost one).
        holes = np.flatnonzero(~valid.all(axis=1))
        order = np.argsort(~valid[holes], axis=1, kind="stable")
        mapped[holes] = np.where(np.take_along_axis(valid[holes], order, axis=1),
                                 np.take_along_axis(mapped[holes], order, axis=1), -1)
        mapped_sims[holes] = np.take_along_axis(mapped_sims[holes], order, axis=1)
        mapped_sims[mapped < 0] = -np.inf
        target = own[keep]
        ids[target] = mapped
        sims[target] = mapped_sims
        carried[target] = True
        lost[target] = valid.sum(axis=1) < min(k, n - 1)
        refilled = int(((ids_before[keep] >= 0) & ~valid).any(axis=1).sum() - lost[target].sum())
    else:
        refilled = 0
    tonight_of_previous = None
    if "vector_id" in old.column_names:
        vector_id = old["vector_id"].to_numpy(zero_copy_only=False)
        tonight_of_previous = np.full(len(old), -1, np.int64)
        tonight_of_previous[vector_id.astype(np.int64)] = where
    return Carried(ids, sims, carried, lost, deleted, tonight_of_previous, refilled)


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
    return int(((top >= k) & np.isfinite(np.take_along_axis(all_sims, top, axis=1))).sum())  # candidates kept


def quantiser_drift(trained: Location, source, new_ids: np.ndarray, old_ids: np.ndarray,
                    old_distance: float | None = None) -> float:
    """New items' mean distance to their nearest coarse centroid over the old items' (samples;
    ``old_distance``, the training sample's as the index recorded it, when given)."""
    import faiss

    index = load_index(trained)
    holder = index.base_index if isinstance(index, faiss.IndexRefine) else index
    try:
        quantiser = faiss.extract_index_ivf(holder).quantizer
    except RuntimeError:
        return 1.0  # a flat index has no centroids to drift from
    if len(new_ids) == 0 or len(old_ids) == 0:
        return 1.0
    rng = np.random.default_rng(0)
    new = np.sort(rng.choice(new_ids, min(len(new_ids), DRIFT_SAMPLE), replace=False))
    if old_distance:
        sims, _ = quantiser.search(np.ascontiguousarray(source.take(new), np.float32), 1)
        return float(np.mean(1.0 - sims[:, 0])) / max(float(old_distance), 1e-9)
    old = np.sort(rng.choice(old_ids, min(len(old_ids), DRIFT_SAMPLE), replace=False))
    x = source.take(np.concatenate([new, old]))  # one read of the store for both
    sims, _ = quantiser.search(np.ascontiguousarray(x, np.float32), 1)
    distance = 1.0 - sims[:, 0]
    return float(np.mean(distance[:len(new)])) / max(float(np.mean(distance[len(new):])), 1e-9)


def update_graph(source, carried: Carried, k: int, *, search) -> tuple[KnnGraph, dict]:
    """Tonight's graph from ``carried`` rows: ``search(query_ids, width, reverse)`` returns the
    ``(ids, sims)`` of those queries among all of tonight's vectors (self excluded), and is
    asked only for new items, changed ones and old items that lost a neighbour; and, given
    ``reverse = (new_ids, threshold, open_rows)``, the ``(rows, candidates, sims)`` of open rows
    a new item beats the threshold of, or None where it cannot tell."""
    t = time.perf_counter()
    n = len(carried.carried)
    ids, sims = carried.ids.copy(), carried.sims.copy()
    queries = np.flatnonzero(~carried.carried | carried.lost)
    new = ~carried.carried
    info = {"carried_rows": int(carried.carried.sum() - carried.lost.sum()), "new_or_changed": int(new.sum()),
            "refilled_from_margin": carried.refilled, "short_of_k": int(carried.lost.sum()),
            "deleted_or_changed_before": carried.deleted, "searched": int(len(queries))}
    if len(queries):
        keep = ids.shape[1]  # k and the margin
        width = min(max(WIDE * k, keep), n - 1)
        # What a newcomer must beat: the row's last neighbour (margin included) where it has
        # them all, else its k-th.
        threshold = np.where(np.isfinite(sims[:, -1]), sims[:, -1], sims[:, k - 1]).astype(np.float32)
        open_rows = carried.carried & ~carried.lost
        found_ids, found_sims, reverse = search(queries, width, (np.flatnonzero(new), threshold, open_rows))
        got = min(keep, found_ids.shape[1])
        ids[queries], sims[queries] = -1, -np.inf
        ids[queries, :got] = found_ids[:, :got]
        sims[queries, :got] = found_sims[:, :got]
        # Reverse edges from the new items' wide lists into old rows not searched again.
        is_new_query = new[queries]
        rows = found_ids[is_new_query].ravel().astype(np.int64)
        cand = np.repeat(queries[is_new_query], found_ids.shape[1])
        cand_sims = found_sims[is_new_query].ravel()
        open_row = (rows >= 0)
        open_row[open_row] = open_rows[rows[open_row]]
        rows, cand, cand_sims = rows[open_row], cand[open_row], cand_sims[open_row]
        if reverse is not None:  # the shards' pairs, each once
            rows, cand, cand_sims = (np.concatenate([a, b]) for a, b in zip((rows, cand, cand_sims), reverse))
            _, first = np.unique(rows * n + cand, return_index=True)
            rows, cand, cand_sims = rows[first], cand[first], cand_sims[first]
            info["reverse_scored_by_shards"] = int(len(reverse[0]))
        info["reverse_inserted"] = merge_candidates(ids, sims, rows, cand, cand_sims)
    info["update_s"] = round(time.perf_counter() - t, 3)
    return KnnGraph(ids, sims), info


def exact_search(x: np.ndarray):
    """``search`` for :func:`update_graph` over an in-memory matrix (the exact path), plus the
    exact reverse check: every old item against every new one."""
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(np.ascontiguousarray(x, np.float32))

    def search(queries: np.ndarray, width: int, reverse=None):
        found_sims, found_ids = index.search(np.ascontiguousarray(x[queries]), width + 1)
        found_sims, found_ids = drop_self(found_sims, found_ids, queries, width)
        return found_ids, found_sims, None  # the reverse check is exact_reverse's

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


def why_not(cfg, previous: PublishedRun | None, model_id: str, n_items: int, carried: Carried | None, kind: str,
            *, graph_problem: str | None = None) -> str | None:
    """The reason tonight's graph is built whole, or None when the previous one can be updated."""
    if cfg.incremental == "off":
        return "knn.incremental is off"
    if previous is None:
        return "first night: no previous published run"
    record = previous.info_or_none()
    if record is None:
        return "the previous run's run.json cannot be read"
    if str(record.embedder.get("model_id")) != model_id:
        return "the embedder changed"
    settings = previous.config.knn  # as that run validated it
    changed = [key for key in KNN_SETTINGS if getattr(settings, key) != getattr(cfg, key)]
    if changed:
        return f"knn settings changed: {', '.join(changed)}"
    knn = record.knn
    if knn.kind != kind:
        return f"the index kind changed ({knn.kind} then, {kind} now)"
    chain = knn.incremental.nights_since_rebuild if knn.incremental is not None else 0
    if chain + 1 >= cfg.rebuild_every:
        return f"knn.rebuild_every: {chain + 1} nights since the graph was built whole"
    if carried is None:
        return graph_problem or "the previous run has no saved graph"
    changed_share = (int((~carried.carried).sum()) + carried.deleted) / max(n_items, 1)
    if changed_share > cfg.incremental_max_change:
        return f"{changed_share:.0%} of the items changed (knn.incremental_max_change {cfg.incremental_max_change})"
    return None


# Nine parameters, kept: the graph phase's inputs (the vectors, knn.*, tonight's rows, the
# previous run, where to save, what to hold in memory) each come from another phase.
def neighbour_graph(vectors, cfg, *, samples, save_to: Location | None, previous: PublishedRun | None,
                    model_id: str, folder: str = "knn",
                    index_folder: str = "index", hold: np.ndarray | None = None) -> tuple[KnnGraph, dict, object]:
    """Tonight's graph: the previous run's updated when it can be (see the module), else built
    whole; ``info["incremental"]`` says which and why. Also returns the vector source to use
    from here on: on an updated night, one that holds the new and changed items' vectors in
    memory (:class:`~curation.index.source.CachedVectors`: read once, they are what the search,
    the shards, the clusters and the drift check read; ``hold``: more ids to read with them, for
    a later phase)."""
    source = as_source(vectors)
    n = source.n
    params = index_params(source, cfg)
    margin = margin_of(cfg.k) if cfg.incremental != "off" else 0
    carried, problem = None, None
    if previous is not None and cfg.incremental != "off":
        try:  # the previous night is validated before it is trusted
            carried = carry_previous(previous, samples, cfg.k, folder=folder, margin=margin)
            if carried is not None:
                check_carried_similarities(carried, source, cfg.k, previous.child(folder).uri)
        except UntrustedGraph as exc:
            carried, problem = None, f"the previous run's graph is not trusted: {exc}"
            log.warning("kNN: %s; building the whole graph", problem)
    reason = why_not(cfg, previous, model_id, n, carried, params.kind, graph_problem=problem)
    before = None if reason else previous.info.knn if folder == "knn" else previous.info.knn.copies  # its record
    reason = reason or (None if before is not None else "the previous run recorded no copy graph")
    trained = None
    if reason is None:  # read the new, changed and short rows' vectors once: every step below needs them
        wanted = np.flatnonzero(~carried.carried | carried.lost)
        source = CachedVectors(source, wanted if hold is None else np.union1d(wanted, hold))
    if reason is None and params.kind == "ivf":
        trained = previous.child(index_folder, TRAINED_INDEX)
        if trained.filesystem.get_file_info(trained.path).type.name != "File":
            reason = "the previous run saved no trained index"
        else:  # the previous index's lists and codec, tonight's shard count
            params = IndexParams(params.kind, before.codec or params.codec, before.nlist or params.nlist,
                                 before.nprobe or params.nprobe, params.train_size, params.shards)
            drift = quantiser_drift(trained, source, np.flatnonzero(~carried.carried), np.flatnonzero(carried.carried),
                                    old_distance=before.coarse_distance)
            if drift > QUANTISER_DRIFT:
                reason = (f"new items sit {drift:.2f}x farther from the index's coarse centroids than old ones "
                          f"(more than {QUANTISER_DRIFT}): retrained")
    if reason is not None:
        graph, info = knn_graph(vectors, cfg, save_to=save_to, k=cfg.k + margin)
        info["incremental"] = {"used": False, "reason": reason, "nights_since_rebuild": 0, "margin": margin}
        log.info("kNN graph built whole (%s)", reason)
        return graph.split(cfg.k), info, vectors
    chain = before.incremental.nights_since_rebuild if before.incremental is not None else 0
    info: dict = {"k": cfg.k, **params.to_dict()}
    if params.kind == "flat" and params.shards == 1:
        _, x = source.read_all(0, n)
        graph, update = update_graph(source, carried, cfg.k, search=exact_search(x))
        update["reverse_inserted"] = update.get("reverse_inserted", 0) + exact_reverse(
            graph, x, ~carried.carried, skip=~carried.carried | carried.lost)
        info["method"] = "the previous graph updated exactly (faiss.IndexFlatIP, in process)"
    else:
        timings: dict = {}
        shards = _previous_shards(previous.child(index_folder), before, params, carried)

        def search(queries, width, reverse):
            found, timing = sharded_knn(source, width, params, query_batch=cfg.query_batch, save_to=save_to,
                                        refine_factor=cfg.refine_factor,
                                        incremental=Incremental(queries, trained, shards, reverse))
            candidates = timing.pop("reverse_candidates", None)
            timings.update(timing)
            return found.ids, found.sims, candidates

        graph, update = update_graph(source, carried, cfg.k, search=search)
        info.update(timings)
        reused = ("its filled shards renumbered and the new vectors added" if shards is not None
                  else "its trained quantiser, the shards filled again")
        info["method"] = (f"the previous graph updated: {params.factory(source.dim)} over {params.shards} Ray shard "
                          f"actor(s), the previous run's index reused ({reused})")
    info["incremental"] = {"used": True, "previous_run": previous.uri, "nights_since_rebuild": chain + 1,
                           "margin": margin, **update}
    if before.coarse_distance is not None:  # the same quantiser: the same yardstick next night
        info["coarse_distance"] = before.coarse_distance
    log.info("kNN graph updated from %s: %s", previous.uri, update)
    return graph.split(cfg.k), info, source


def _previous_shards(folder: Location, before: KnnRecord, params, carried: Carried):
    """``sharded_knn``'s ``update`` from the previous run's saved shards: when it saved as many
    as tonight uses, of an IVF index whose lists can be renumbered in place (not the refined
    fast-scan codec); else None (the shards are filled from the source)."""
    sizes = before.shard_sizes
    if (carried.tonight_of_previous is None or params.codec == "pq-fastscan" or len(sizes) != params.shards
            or sum(sizes) != len(carried.tonight_of_previous)):
        return None
    files = [shard_file(folder, i) for i in range(len(sizes))]
    if any(f.filesystem.get_file_info(f.path).type.name != "File" for f in files):
        return None
    return files, carried.tonight_of_previous, np.array_split(np.flatnonzero(~carried.carried), len(files))
