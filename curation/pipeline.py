"""The only module that builds the Ray Data graph and sizes actor pools.

inputs table -> decode (CPU tasks) -> embed (autoscaling actor pool) -> materialised dataset.
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np
import pyarrow as pa
import ray

from curation.config import Config, KnnConfig
from curation.index.knn import KnnGraph, drop_self, exact_knn
from curation.index.params import IndexParams, choose_params
from curation.index.shard import IndexShard, merge_shard_results, train_empty_index
from curation.io.filesystem import Location, Resolver, write_bytes
from curation.stages.decode import DecodeStage
from curation.stages.embed import EmbedStage

log = logging.getLogger(__name__)

TARGET_ROWS_PER_BLOCK = 256
ADD_CHUNK = 65536  # vectors per add() call to a shard actor
SOURCE_BATCH = 16384  # rows a shard reads from storage per step (32 MB at d=512)


def init_ray(config: Config) -> bool:
    """Connect to ``RAY_ADDRESS`` when set, reuse a running Ray, else start a local one.

    Returns True when this call started Ray (so the caller should shut it down).
    """
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    kwargs: dict = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
        log.info("connected to Ray at %s", address)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        if config.ray.num_cpus:
            kwargs["num_cpus"] = config.ray.num_cpus
        if config.ray.object_store_memory:
            kwargs["object_store_memory"] = config.ray.object_store_memory
        ray.init(include_dashboard=False, **kwargs)
        log.info("started a local Ray (%s CPUs)", ray.cluster_resources().get("CPU"))
    return True


def embed_pool_size(config: Config) -> dict:
    """Actor-pool sizing that always leaves CPU for read/decode tasks.

    With GPUs: one actor per GPU. On CPU: actors take one CPU each and at most half the
    cluster's CPUs, so on a 2-CPU node exactly one actor runs and decoding keeps the other
    (two CPU actors there deadlock the pipeline).
    """
    resources = ray.cluster_resources()
    cpus = int(resources.get("CPU", 1))
    gpus = int(resources.get("GPU", 0))
    device = config.embedder.device
    use_gpu = gpus > 0 and device in ("auto", "cuda")
    if use_gpu:
        limit = gpus
        per_actor = {"num_gpus": 1, "num_cpus": 1}
    else:
        limit = max(1, cpus // 2)
        per_actor = {"num_cpus": 1}
    max_size = config.embedder.max_actors or limit
    max_size = max(1, min(max_size, limit))
    min_size = min(config.embedder.min_actors, max_size)
    return {"min_size": min_size, "max_size": max_size, "per_actor": per_actor,
            "device": "cuda" if use_gpu else "cpu"}


def decode_and_embed(inputs: pa.Table, config: Config, resolver: Resolver) -> ray.data.Dataset:
    """Build decode -> embed (lazy; executed by :func:`collect_table`). Pixels are dropped."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = log.isEnabledFor(logging.INFO)
    n = inputs.num_rows
    blocks = max(1, math.ceil(n / TARGET_ROWS_PER_BLOCK))
    ds = ray.data.from_arrow(inputs)
    if blocks > 1:
        ds = ds.repartition(blocks)
    # Decoding runs as stateless CPU tasks (the stage holds no model), so Ray Data can scale
    # them with the available CPUs and keep them apart from the embedding actors.
    decode = DecodeStage(
        resolver=resolver,
        image_size=config.embedder.image_size,
        max_pixels=config.decode.max_pixels,
        background=tuple(config.decode.background),
    )
    ds = ds.map_batches(
        _decode_batch,
        fn_kwargs={"stage": decode},
        batch_size=config.decode.batch_size,
        batch_format="numpy",
        num_cpus=DecodeStage.num_cpus,
        # Declaring the decode memory also keeps Ray Data from fusing these tasks into the
        # embedding actors (it fuses ops with identical resource requests), so decoding runs
        # on its own CPUs and the model never waits on a serial decode in the same process.
        memory=DecodeStage.memory_bytes,
    )
    pool = embed_pool_size(config)
    log.info("embedding actor pool: %d..%d actors on %s", pool["min_size"], pool["max_size"], pool["device"])
    ds = ds.map_batches(
        EmbedStage,
        fn_constructor_kwargs={
            "model": config.embedder.model,
            "weights": config.embedder.weights,
            "image_size": config.embedder.image_size,
            "device": pool["device"],
            "precision": config.embedder.precision,
            "num_threads": int(pool["per_actor"].get("num_cpus", 1)),
            "resolver": resolver,
        },
        compute=ray.data.ActorPoolStrategy(min_size=pool["min_size"], max_size=pool["max_size"]),
        batch_size=config.embedder.batch_size,
        batch_format="numpy",
        **pool["per_actor"],
    )
    return ds


def _decode_batch(batch, stage: DecodeStage):
    return stage(batch)


def collect_table(ds: ray.data.Dataset) -> pa.Table:
    """Pull the materialised blocks into one Arrow table on the driver, in input order."""
    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    table = pa.concat_tables(tables, promote_options="permissive")
    return table.sort_by("input_id")


def knn_graph(embeddings: np.ndarray, cfg: KnnConfig, *, seed: int = 0,
              save_to: Location | None = None, source=None) -> tuple[KnnGraph, dict]:
    """The all-items kNN graph: exact in-process for small N, sharded over Ray actors above.

    Returns the graph and a description (index parameters, timings, per-shard sizes) for run.json.
    With ``save_to``, the sharded path writes the trained empty index and every filled shard
    there (``trained.faissindex``, ``shard-00000.faissindex``, ...; ids are row numbers of
    the ok items in ``samples`` order). With ``source`` (a
    :class:`curation.index.source.VectorParts` holding the same vectors in the same order) the
    shards read their partitions from storage themselves.
    """
    import time

    n, d = embeddings.shape
    cpus = int(ray.cluster_resources().get("CPU", 2)) if ray.is_initialized() else 2
    params = choose_params(n, d, cfg, cpus=cpus)
    info: dict = {"k": cfg.k, **params.to_dict()}
    if params.kind == "flat" and params.shards == 1:
        t = time.perf_counter()
        graph = exact_knn(embeddings, cfg.k)
        info.update(method="exact (faiss.IndexFlatIP, in process)", search_s=round(time.perf_counter() - t, 3))
        return graph, info
    graph, timing = sharded_knn(embeddings, cfg.k, params, query_batch=cfg.query_batch, seed=seed, save_to=save_to,
                                source=source, refine_factor=cfg.refine_factor)
    info.update(method=f"{params.factory(d)} over {params.shards} Ray shard actor(s)", **timing)
    return graph, info


def sharded_knn(embeddings: np.ndarray, k: int, params: IndexParams, *, query_batch: int = 16384,
                seed: int = 0, save_to: Location | None = None, source=None,
                refine_factor: int = 16) -> tuple[KnnGraph, dict]:
    """Train once on a uniform sample, fill shard actors with contiguous partitions, fan queries
    out to every shard and merge the per-shard top-k with FAISS.

    With ``source`` (:class:`curation.index.source.VectorParts`, the same vectors in the same
    order) each shard streams its partition from storage; without it the driver sends chunks."""
    import time

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, d = x.shape
    timing: dict = {}
    t = time.perf_counter()
    rng = np.random.default_rng(seed)
    sample = x[np.sort(rng.choice(n, size=params.train_size, replace=False))] if params.kind == "ivf" else x[:1]
    empty = train_empty_index(sample, params.factory(d))
    import faiss

    blob = faiss.serialize_index(empty)
    timing["train_s"] = round(time.perf_counter() - t, 3)
    if save_to is not None:
        write_bytes(save_to.child("trained.faissindex"), blob.tobytes())

    t = time.perf_counter()
    resources = ray.cluster_resources()
    cpus = max(1, int(resources.get("CPU", 1)))
    threads = max(1, cpus // params.shards)
    use_gpu = resources.get("GPU", 0) >= params.shards
    actor_cls = ray.remote(num_cpus=min(1, cpus / params.shards), num_gpus=1 if use_gpu else 0)(IndexShard)
    blob_ref = ray.put(blob)
    shards = [actor_cls.remote(blob_ref, nprobe=params.nprobe, num_threads=threads, use_gpu=use_gpu,
                               refine_factor=refine_factor)
              for _ in range(params.shards)]
    bounds = np.linspace(0, n, params.shards + 1).astype(np.int64)
    if source is not None:
        if source.n != n:
            raise ValueError(f"kNN: the vector source holds {source.n} vectors, the driver {n}")
        ray.get([shard.add_from.remote(source, int(lo), int(hi), SOURCE_BATCH)
                 for shard, lo, hi in zip(shards, bounds[:-1], bounds[1:])])
        timing["add_from"] = "storage (each shard streams its partition)"
    else:
        # Partitions travel in chunks, one chunk per shard in flight: the object store (and each
        # shard's mapped copy of its argument) never holds more than a few hundred MB.
        starts = [list(range(lo, hi, ADD_CHUNK)) for lo, hi in zip(bounds[:-1], bounds[1:])]
        for step in range(max((len(s) for s in starts), default=0)):
            futures = []
            for shard, shard_starts, hi in zip(shards, starts, bounds[1:]):
                if step < len(shard_starts):
                    lo = shard_starts[step]
                    top = min(lo + ADD_CHUNK, hi)
                    futures.append(shard.add.remote(np.arange(lo, top), x[lo:top]))
            ray.get(futures)
        timing["add_from"] = "driver (chunks through the object store)"
    timing["add_s"] = round(time.perf_counter() - t, 3)
    timing["shard_sizes"] = [int(hi - lo) for lo, hi in zip(bounds[:-1], bounds[1:])]

    t = time.perf_counter()
    ids = np.full((n, k), -1, np.int64)
    sims = np.full((n, k), -np.inf, np.float32)
    search_k = min(k + 1, n)
    pending = None
    for start in range(0, n, query_batch):
        stop = min(start + query_batch, n)
        q_ref = ray.put(x[start:stop])
        futures = [shard.search.remote(q_ref, search_k) for shard in shards]
        if pending is not None:  # merge the previous batch while this one searches
            _store(pending, ids, sims, k)
        pending = (start, stop, futures)
    if pending is not None:
        _store(pending, ids, sims, k)
    timing["search_s"] = round(time.perf_counter() - t, 3)
    timing["shard_peak_rss_bytes"] = ray.get([shard.memory_bytes.remote() for shard in shards])
    timing["shard_private_bytes"] = ray.get([shard.private_bytes.remote() for shard in shards])
    if save_to is not None:
        t = time.perf_counter()
        ray.get([shard.save.remote(save_to.child(f"shard-{i:05d}.faissindex")) for i, shard in enumerate(shards)])
        timing["save_s"] = round(time.perf_counter() - t, 3)
        timing["saved_to"] = save_to.uri
    for shard in shards:
        ray.kill(shard)
    return KnnGraph(ids, sims), timing


def _store(pending, ids: np.ndarray, sims: np.ndarray, k: int) -> None:
    start, stop, futures = pending
    merged_sims, merged_ids = merge_shard_results(ray.get(futures))
    batch_sims, batch_ids = drop_self(merged_sims, merged_ids, np.arange(start, stop), k)
    ids[start:stop, : batch_ids.shape[1]] = batch_ids
    sims[start:stop, : batch_sims.shape[1]] = batch_sims
