"""The all-items kNN graph: exact in process for small N, FAISS shards on Ray actors above.

Sharded path, start to finish, with vectors read from storage by the workers that need them:

1. train: the coarse quantiser is trained in a Ray task on a uniform sample it fetches from
   the vector source (``VectorParts.take``: only the sampled rows travel); the driver gets the
   trained, empty index (and writes it to storage when the run keeps its index);
2. fill: ``shards`` :class:`~curation.index.shard.IndexShard` actors each stream a contiguous id
   range from the source (``add_from``);
3. search: one Ray task per query batch reads its batch from the source, fans it out to every
   shard, merges the per-shard top-k with ``faiss.merge_knn_results`` and drops the self match;
   only the compact ``(ids, sims)`` rows come back to the driver;
4. save (optional): every shard streams its filled index to storage.

The driver holds the graph: two ``(N, k)`` arrays, int32 ids and float32 similarities
(80 bytes per item at k = 10).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import logging
import time

import numpy as np

from curation.config import KnnConfig
from curation.index.knn import KnnGraph, drop_self, exact_knn, id_dtype
from curation.index.params import IndexParams, choose_params
from curation.index.shard import IndexShard, merge_shard_results, train_empty_index
from curation.index.source import CachedVectors, VectorParts, as_source
from curation.io.filesystem import Location, read_bytes, write_bytes
from curation.run_layout import TRAINED_INDEX, shard_file
from curation.session import progress
from curation.sizing import TRAIN_THREADS, WAITING, ClusterShape, shard_request, training_request

log = logging.getLogger(__name__)

SOURCE_BATCH = 16384  # rows a shard reads from storage per step (32 MB at d=512)
QUERY_TASKS_IN_FLIGHT = 2  # one batch searching while the previous one is read and merged
CALIBRATION_QUERIES = 256  # items whose exact neighbours choose nprobe (knn.target_recall)
NPROBE_STEPS = (16, 24, 32, 48, 64, 96, 128, 192, 256)  # the nprobe values calibration tries, in order
SHARD_RESTARTS = 2  # a dead shard actor is restarted (and refills itself) at most this often


def knn_graph(vectors, cfg: KnnConfig, *, seed: int = 0, save_to: Location | None = None,
              k: int | None = None) -> tuple[KnnGraph, dict]:
    """The kNN graph of every vector among all vectors, self excluded.

    Args:
        vectors: a :class:`~curation.index.source.VectorParts` (vectors in storage), a
            :class:`~curation.index.source.MemoryVectors` or an ``(N, d)`` matrix.
        cfg: ``knn.*``.
        save_to: where the sharded path writes ``trained.faissindex`` and
            ``shard-NNNNN.faissindex`` (ids are positions in the vector source).
        k: neighbours per item (``cfg.k`` by default).

    Returns:
        The graph and a description for ``run.json`` (index parameters, timings, shard sizes).
    """
    source = as_source(vectors)
    n = source.n
    d = source.dim if n else 1
    k = k or cfg.k
    params = index_params(source, cfg)
    info: dict = {"k": cfg.k, **params.to_dict()}
    if params.kind == "flat" and params.shards == 1:
        # Bounded by knn.exact_below rows, so the exact path may hold them in process.
        t = time.perf_counter()
        _, x = source.read_all(0, n) if n else (None, np.zeros((0, d), np.float32))
        graph = exact_knn(x, k)
        info.update(method="exact (faiss.IndexFlatIP, in process)", search_s=round(time.perf_counter() - t, 3))
        return graph, info
    graph, timing = sharded_knn(source, k, params, query_batch=cfg.query_batch, seed=seed, save_to=save_to,
                                refine_factor=cfg.refine_factor,
                                target_recall=cfg.target_recall if not cfg.nprobe else 0.0)
    info.update(method=f"{params.factory(d)} over {params.shards} Ray shard actor(s)", **timing)
    return graph, info


def index_params(source, cfg: KnnConfig) -> IndexParams:
    """The index for ``source`` under ``knn.*`` (its shard count from the cluster's CPUs)."""
    return choose_params(source.n, source.dim if source.n else 1, cfg, cpus=ClusterShape.current().cpus)


@dataclass(frozen=True)
class Incremental:
    """What a night that updates the previous run's index hands the search.

    Attributes:
        queries: search only these ids (sorted); the graph's rows are then theirs, in this order.
        trained_from: a trained empty index to reuse (a previous run's ``trained.faissindex``)
            instead of training one.
        update: ``(files, new_id_of, added)``: shard i starts from a previous run's filled
            ``files[i]`` instead of the source, renumbered by ``new_id_of`` (its deleted and
            changed items dropped), and adds ids ``added[i]`` (see :class:`IndexShard`).
        reverse: ``(new_ids, threshold, open_rows)``: the shards scan the queries' lists in both
            directions (:meth:`~curation.index.shard.IndexShard.scan`), and
            ``timing["reverse_candidates"]`` is ``(rows, candidates, sims)``: the open rows a new
            item beats the threshold of. None where a shard cannot scan (a quantised codec, a GPU
            index): those shards are searched.
    """

    queries: np.ndarray | None = None
    trained_from: Location | None = None
    update: tuple[list[Location], np.ndarray, list[np.ndarray]] | None = None
    reverse: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None


# Nine parameters, kept: each is a knob of the search its callers set separately (the job from
# knn.*, the tests and benchmarks one at a time); the incremental ones travel together.
def sharded_knn(vectors, k: int, params: IndexParams, *, query_batch: int = 16384,
                seed: int = 0, save_to: Location | None = None, refine_factor: int = 16,
                target_recall: float = 0.0, incremental: Incremental | None = None) -> tuple[KnnGraph, dict]:
    """Train once on a uniform sample, fill shard actors with contiguous partitions, search every
    query batch on every shard from a Ray task and merge the per-shard top-k with FAISS.

    Args:
        vectors: where the vectors are (:class:`~curation.index.source.VectorParts`: shards and
            query tasks read storage themselves), or an in-memory matrix or
            :class:`~curation.index.source.MemoryVectors` (put once in the object store).
        target_recall: when training here, choose nprobe as the smallest of ``NPROBE_STEPS`` whose
            recall@k against searching every list reaches this on ``CALIBRATION_QUERIES`` items
            (0: ``params.nprobe`` as given). ``timing["nprobe"]`` is the one searched with.
        incremental: the previous run's index and the rows to search (:class:`Incremental`).
    """
    import ray

    inc = incremental or Incremental()
    cache = as_source(vectors)  # a CachedVectors serves the query and added vectors from memory
    source = cache.source if isinstance(cache, CachedVectors) else cache
    timing: dict = {}
    blob, trained, calibration = _trained_index(source, params, inc.trained_from, save_to, seed, target_recall, timing)
    t = time.perf_counter()
    # A restarted shard is rebuilt from its constructor's arguments. In a run they are all
    # descriptions (the trained index's and the vectors' locations in storage), passed by value:
    # nothing for Ray to keep alive in the object store. An in-memory source (tests,
    # benchmarks) travels once through the object store, held by the driver until the search
    # is over, and the query tasks read it from there too.
    source_ref = source if isinstance(source, VectorParts) else ray.put(source)
    index_arg = trained if trained is not None or inc.update is not None else ray.put(blob)
    # The objects the shards' constructors name stay referenced here until the search is over:
    # a shard restarted after a lost node is rebuilt from them.
    shards, held = _start_shards(cache, source_ref, params, index_arg, refine_factor, inc.update)
    try:
        expected = _filled_sizes(shards, source, params, inc.update, timing)
        timing["add_s"] = round(time.perf_counter() - t, 3)
        if calibration is not None:
            t = time.perf_counter()
            nprobe, recalls = calibrate_nprobe(shards, *calibration, k, params.nlist, target_recall)
            params = dataclasses.replace(params, nprobe=nprobe)
            timing["nprobe_calibration"] = {"target_recall": target_recall, "queries": len(calibration[0]),
                                            "recall_at": recalls, "s": round(time.perf_counter() - t, 3)}
        timing["nprobe"] = params.nprobe
        ids, sims = _search(shards, cache, source_ref, k, params, query_batch, inc, timing)
        _check_shards(shards, expected, "after the search")
        timing["shard_peak_rss_bytes"] = ray.get([shard.memory_bytes.remote() for shard in shards])
        timing["shard_private_bytes"] = ray.get([shard.private_bytes.remote() for shard in shards])
        if save_to is not None:
            t = time.perf_counter()
            ray.get([shard.save.remote(shard_file(save_to, i)) for i, shard in enumerate(shards)])
            timing["save_s"] = round(time.perf_counter() - t, 3)
            timing["saved_to"] = save_to.uri
    finally:  # a failed search must not leave shard actors holding the cluster's CPUs
        for shard in shards:
            ray.kill(shard)
        del held, index_arg, source_ref  # only now may Ray drop what the constructors named
    return KnnGraph(ids, sims), timing


def _trained_index(source, params: IndexParams, trained_from: Location | None, save_to: Location | None, seed: int,
                   target_recall: float, timing: dict):
    """The trained empty index (serialised), where it was saved (None when not saved) and the
    nprobe calibration sample (None when not calibrating). Trained in a Ray task, which fetches
    its own sample: the driver receives only the trained, empty index (nlist centroids)."""
    import ray

    calibration = None
    t = time.perf_counter()
    if trained_from is not None:
        blob = np.frombuffer(read_bytes(trained_from), np.uint8)
        timing["trained_from"] = trained_from.uri
    else:
        request = training_request("the kNN index's training task", TRAIN_THREADS)
        train = ray.remote(**request.options())(_train)
        calibrate = CALIBRATION_QUERIES if target_recall > 0 and params.kind == "ivf" else 0
        blob, timing["coarse_distance"], calibration = ray.get(
            train.remote(source, params, source.dim, source.n, seed, request.threads, calibrate))
        progress.tick()
        timing["train_s"] = round(time.perf_counter() - t, 3)
    trained = None
    if save_to is not None:
        trained = save_to.child(TRAINED_INDEX)
        write_bytes(trained, blob.tobytes())
    return blob, trained, calibration


def _start_shards(cache, source_ref, params: IndexParams, index_arg, refine_factor: int, update) -> tuple[list, list]:
    """The shard actors, each filling itself: from its contiguous partition of the source, or
    (``update``) from a previous run's filled shard, renumbered, plus the vectors added.

    A shard whose process dies is restarted by Ray (on another node when its node is gone) and
    refills itself from the source in its constructor. Its searches are retried for as long as
    it may come back: a lost node leaves the actor "temporarily unavailable" for the seconds Ray
    takes to declare the node dead, and a fixed retry count runs out in that time. Restarts are
    bounded; past them every call fails and the run names the shard. Returns the actors and the
    object refs their constructors name, which the caller holds while the actors live."""
    import ray

    request, threads, use_gpu = shard_request(params.shards, ClusterShape.current())
    actor_cls = ray.remote(**request.options(), max_restarts=SHARD_RESTARTS, max_task_retries=-1)(IndexShard)
    common = {"nprobe": params.nprobe, "num_threads": threads, "use_gpu": use_gpu, "refine_factor": refine_factor,
              "source": source_ref}
    if update is None:
        n = (cache.source if isinstance(cache, CachedVectors) else cache).n
        bounds = np.linspace(0, n, params.shards + 1).astype(np.int64)
        return [actor_cls.remote(index_arg, partition=(int(lo), int(hi), SOURCE_BATCH), **common)
                for lo, hi in zip(bounds[:-1], bounds[1:])], []
    files, new_id_of, added = update
    new_id_ref = ray.put(new_id_of)  # once for every shard
    # The added vectors from memory when the caller holds them (read once for the search too),
    # else each shard reads its own from storage.
    added_x = [ray.put(cache.take(a)) if isinstance(cache, CachedVectors) else None for a in added]
    return [actor_cls.remote(files[i], renumber=new_id_ref, added=added[i], added_vectors=added_x[i], **common)
            for i in range(len(files))], [new_id_ref, *added_x]


def _filled_sizes(shards: list, source, params: IndexParams, update, timing: dict) -> list[int]:
    """What each shard must hold (checked now, and again after the search)."""
    n = source.n
    if update is None:
        bounds = np.linspace(0, n, params.shards + 1).astype(np.int64)
        expected = [int(hi - lo) for lo, hi in zip(bounds[:-1], bounds[1:])]
        timing["add_from"] = ("storage (each shard streams its partition)" if isinstance(source, VectorParts)
                              else "memory (each shard reads its partition from the object store)")
    else:
        # Which previous items each file held is known only once it is read: the shards' first
        # sizes must hold every vector once; later checks compare against them.
        expected = _shard_call([shard.size.remote() for shard in shards], "the update")
        if sum(expected) != n:
            raise ShardLost(f"the previous run's index shards hold {sum(expected)} of tonight's {n} vectors "
                            f"once renumbered")
        files, _, added = update
        timing["add_from"] = (f"the previous run's {len(files)} filled shard(s), renumbered; "
                              f"{sum(len(a) for a in added)} new or changed vectors added")
    _check_shards(shards, expected, "after filling")
    timing["shard_sizes"] = expected
    return expected


def _search(shards: list, cache, source_ref, k: int, params: IndexParams, query_batch: int, inc: Incremental,
            timing: dict) -> tuple[np.ndarray, np.ndarray]:
    """Every query batch searched on every shard by Ray tasks (at most ``QUERY_TASKS_IN_FLIGHT``
    at once), merged into the graph's rows."""
    t = time.perf_counter()
    n = (cache.source if isinstance(cache, CachedVectors) else cache).n
    rows = n if inc.queries is None else len(inc.queries)
    ids = np.full((rows, k), -1, id_dtype(n))
    sims = np.full((rows, k), -np.inf, np.float32)
    jobs, scanning = _query_jobs(shards, cache, source_ref, k, min(k + 1, n), params, query_batch, inc)
    found_reverse = [] if scanning else None
    pending: list = []
    done_rows = 0
    for job in jobs:
        pending.append(job)
        if len(pending) >= QUERY_TASKS_IN_FLIGHT:
            done_rows += _collect(pending.pop(0), ids, sims, found_reverse)
            log.info("kNN search: %d / %d items (%.0f s)", done_rows, rows, time.perf_counter() - t)
    while pending:
        done_rows += _collect(pending.pop(0), ids, sims, found_reverse)
    timing["search_s"] = round(time.perf_counter() - t, 3)
    timing["searched"] = rows
    if inc.reverse is not None:
        timing["scanned_both_ways"] = found_reverse is not None
        timing["reverse_candidates"] = (tuple(np.concatenate(c) for c in zip(*found_reverse))
                                        if found_reverse else None)
    return ids, sims


def _query_jobs(shards: list, cache, source_ref, k: int, search_k: int, params: IndexParams, query_batch: int,
                inc: Incremental):
    """``((start, stop, ref) ...)``, a generator (each task is submitted only when fewer than
    ``QUERY_TASKS_IN_FLIGHT`` run), and whether the tasks scan both ways. Query tasks reserve no
    CPU: they mostly wait on the shards, which hold the CPUs. Four strategies:

    * every row: one task per range of whole row groups (each read once), searched
      ``query_batch`` rows at a time;
    * the given ids, both directions in one scan of the probed lists (``inc.reverse``, when
      every shard can scan), their vectors from the caller's memory when it holds them;
    * the given ids, their vectors from the caller's memory;
    * the given ids, each task reading just its rows."""
    import ray

    queries = inc.queries
    if queries is None:
        query = ray.remote(**WAITING.options())(_query_batch)
        source = cache.source if isinstance(cache, CachedVectors) else cache
        return ((start, stop, query.remote(source_ref, start, stop, shards, search_k, k, query_batch, params.nprobe))
                for start, stop in source.ranges(query_batch)), False
    rows = len(queries)
    batches = range(0, rows, query_batch)
    cached = isinstance(cache, CachedVectors)
    if inc.reverse is not None and all(_shard_call([shard.can_scan.remote() for shard in shards], "the scan check")):
        is_new = np.isin(queries, inc.reverse[0])
        shared = [ray.put(np.asarray(inc.reverse[1], np.float32)), ray.put(np.asarray(inc.reverse[2], bool))]
        query = ray.remote(**WAITING.options())(_scan_vectors)
        return ((s, min(s + query_batch, rows),
                 query.remote(queries[s:s + query_batch], cache.take(queries[s:s + query_batch]) if cached else None,
                              source_ref, shards, search_k, k, params.nprobe, is_new[s:s + query_batch], shared))
                for s in batches), True
    if cached:
        query = ray.remote(**WAITING.options())(_query_vectors)
        return ((s, min(s + query_batch, rows),
                 query.remote(queries[s:s + query_batch], cache.take(queries[s:s + query_batch]), shards, search_k, k,
                              params.nprobe))
                for s in batches), False
    query = ray.remote(**WAITING.options())(_query_ids)
    return ((s, min(s + query_batch, rows),
             query.remote(source_ref, queries[s:s + query_batch], shards, search_k, k, params.nprobe))
            for s in batches), False


class ShardLost(RuntimeError):
    """An index shard died and could not be rebuilt: the graph would miss neighbours."""


def _shard_call(refs: list, what: str) -> list:
    """``ray.get`` of one call per shard, naming the shard whose actor is gone for good."""
    import ray
    from ray.exceptions import RayActorError

    out = []
    for i, ref in enumerate(refs):
        try:
            out.append(ray.get(ref))
        except RayActorError as exc:
            raise ShardLost(f"kNN index shard {i} died during {what} and was not rebuilt after "
                            f"{SHARD_RESTARTS} restarts: {str(exc).splitlines()[0][:200]}") from None
    return out


def _check_shards(shards: list, expected: list[int], when: str) -> None:
    held = _shard_call([shard.size.remote() for shard in shards], f"the size check {when}")
    for i, (have, want) in enumerate(zip(held, expected)):
        if have != want:  # never search (or keep) a graph with a partition missing
            raise ShardLost(f"kNN index shard {i} holds {have} vectors {when}, expected {want}")


def _train(source, params: IndexParams, d: int, n: int, seed: int, threads: int = 1,
           calibrate: int = 0) -> tuple[np.ndarray, float | None, tuple[np.ndarray, np.ndarray] | None]:
    """Train the empty index on a uniform sample of ``source``; returns it serialised, the
    sample's mean distance (1 - cosine) to its nearest coarse centroid (None without lists):
    the yardstick a later night's new items are held against (``knn.incremental``), and
    ``calibrate`` other uniformly drawn items ``(ids, vectors)`` (read with the sample) for
    :func:`calibrate_nprobe`, or None."""
    import faiss

    faiss.omp_set_num_threads(threads)  # Ray sets one OpenMP thread per reserved CPU
    calibration = None
    if params.kind == "ivf":
        rng = np.random.default_rng(seed)
        # The calibration items are drawn apart from the training sample when N allows.
        drawn = rng.choice(n, size=min(n, params.train_size + calibrate), replace=False)
        train_ids = np.sort(drawn[:params.train_size])
        query_ids = np.sort(drawn[len(drawn) - min(calibrate, len(drawn)):])
        rows = source.take(np.concatenate([train_ids, query_ids]))
        sample = rows[:len(train_ids)]
        if len(query_ids):
            calibration = (query_ids, rows[len(train_ids):])
    else:
        sample = np.zeros((1, d), np.float32)
    index = train_empty_index(sample, params.factory(d))
    distance = None
    if params.kind == "ivf":
        holder = index.base_index if isinstance(index, faiss.IndexRefine) else index
        sims, _ = faiss.extract_index_ivf(holder).quantizer.search(np.ascontiguousarray(sample[:2000]), 1)
        distance = round(float(np.mean(1.0 - sims[:, 0])), 6)
    return faiss.serialize_index(index), distance, calibration


def calibrate_nprobe(shards: list, ids: np.ndarray, queries: np.ndarray, k: int, nlist: int,
                     target: float) -> tuple[int, dict]:
    """The smallest of ``NPROBE_STEPS`` (at most ``nlist``) at which the filled shards find
    ``target`` of the queries' k nearest neighbours, the truth being a search of every list
    (exact on the stored vectors). How many lists a query must probe depends on how clustered
    the vectors are: on clustered 512-d embeddings 16 lists find 0.99, on a 772-d pixel-statistics
    embedding (``thumbnail``) about 0.9. Returns it and the recall measured at each step tried."""
    scan = all(_shard_call([shard.can_scan.remote() for shard in shards], "calibration"))

    def search(nprobe, exact=False):
        if exact and scan:  # every list, as matrix products: several times faster than the list scan
            results = [r[0] for r in _shard_call([shard.scan.remote(queries, k + 1, nprobe) for shard in shards],
                                                 "calibration")]
        else:
            results = _shard_call([shard.search.remote(queries, k + 1, nprobe) for shard in shards], "calibration")
        sims, found = merge_shard_results(results)
        return drop_self(sims, found, ids, k)[1]

    truth = search(nlist, exact=True)
    recalls: dict = {}
    steps = [s for s in NPROBE_STEPS if s < nlist] or [nlist]
    for nprobe in steps:
        found = search(nprobe)
        hits = sum(len(np.intersect1d(a[a >= 0], b[b >= 0])) for a, b in zip(found, truth))
        recalls[str(nprobe)] = round(hits / max(int((truth >= 0).sum()), 1), 4)
        if recalls[str(nprobe)] >= target:
            return nprobe, recalls
    return steps[-1], recalls


def _query_batch(source, start: int, stop: int, shards: list, search_k: int, k: int,
                 batch_rows: int, nprobe: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Ids ``[start, stop)``, run as a Ray task: read them batch by batch, search every shard,
    merge, drop self. Returns the rows' ``(ids, sims)``."""
    out_ids, out_sims = [], []
    for own, queries in source.read(start, stop, batch_rows=batch_rows):
        if len(own) == 0:
            continue
        results = _shard_call([shard.search.remote(queries, search_k, nprobe) for shard in shards], "the search")
        merged_sims, merged_ids = merge_shard_results(results)
        sims, ids = drop_self(merged_sims, merged_ids, own, k)
        out_ids.append(ids)
        out_sims.append(sims)
    if not out_ids:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    return np.concatenate(out_ids), np.concatenate(out_sims)


def _query_ids(source, own: np.ndarray, shards: list, search_k: int, k: int,
               nprobe: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The given ids, run as a Ray task: read their vectors (in this task: it must not wait on
    other tasks while the shards hold the CPUs), search every shard, merge, drop self."""
    return _query_vectors(own, source.take(own, local=True), shards, search_k, k, nprobe)


def _query_vectors(own: np.ndarray, queries: np.ndarray, shards: list, search_k: int,
                   k: int, nprobe: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The given ids with their vectors, run as a Ray task: search every shard, merge, drop self."""
    results = _shard_call([shard.search.remote(queries, search_k, nprobe) for shard in shards], "the search")
    merged_sims, merged_ids = merge_shard_results(results)
    sims, ids = drop_self(merged_sims, merged_ids, own, k)
    return ids, sims


# A Ray task's arguments are its whole interface (they travel by value): kept flat (9).
def _scan_vectors(own: np.ndarray, queries: np.ndarray | None, source, shards: list, search_k: int, k: int,
                  nprobe: int, is_new: np.ndarray, shared: list) -> tuple[np.ndarray, np.ndarray, tuple]:
    """The given ids, run as a Ray task: every shard scans their lists both ways
    (:meth:`~curation.index.shard.IndexShard.scan`); the forward lists merged with self
    dropped, and the reverse candidates of every shard. ``shared``: ``[threshold, open_rows]``
    object refs, handed to the shards unread."""
    if queries is None:
        queries = source.take(own, local=True)
    threshold, open_rows = shared
    results = _shard_call([shard.scan.remote(queries, search_k, nprobe, own, is_new, threshold, open_rows)
                           for shard in shards], "the scan")
    merged_sims, merged_ids = merge_shard_results([r[0] for r in results])
    sims, ids = drop_self(merged_sims, merged_ids, own, k)
    return ids, sims, tuple(np.concatenate(c) for c in zip(*(r[1] for r in results)))


def _collect(pending, ids: np.ndarray, sims: np.ndarray, reverse: list | None = None) -> int:
    import ray

    start, stop, ref = pending
    batch_ids, batch_sims, *rest = ray.get(ref)
    if reverse is not None and rest:
        reverse.append(rest[0])
    progress.tick()
    ids[start:stop, : batch_ids.shape[1]] = batch_ids
    sims[start:stop, : batch_sims.shape[1]] = batch_sims
    return stop - start
