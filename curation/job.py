"""The curation job, start to finish: inputs -> decode/embed (Ray) -> kNN -> scores ->
selections -> outputs -> publish."""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import curation
from curation.balance import balance_stats
from curation.config import Config
from curation.io import inputs as inputs_io
from curation.io import outputs
from curation.io.filesystem import Resolver, write_bytes
from curation.index.source import VectorParts, parquet_parts
from curation.io.store import EmbeddingStore
from curation.report import render_report
from curation.schema import STATUS_OK, STATUS_REJECTED
from curation.scores import REGISTRY, run_scores
from curation.select import build_selections

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_id: str
    run_uri: str
    samples: pa.Table
    run_info: dict


def _embeddings_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(N, d) float32 from a list column, filled chunk by chunk (no combined intermediate)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    total = sum(len(c) for c in chunks)
    first = next((c for c in chunks if len(c)), None)
    if first is None:
        return np.zeros((0, 1), np.float32)
    dim = first.type.list_size if pa.types.is_fixed_size_list(first.type) else len(first[0])
    out = np.empty((total, dim), np.float32)
    pos = 0
    for chunk in chunks:
        if len(chunk):
            out[pos:pos + len(chunk)] = chunk.flatten().to_numpy(zero_copy_only=False).reshape(len(chunk), dim)
            pos += len(chunk)
    return out


def _samples_from_embeddings(table: pa.Table, matrix: np.ndarray, valid: np.ndarray, lengths: np.ndarray,
                             dim: int) -> tuple[pa.Table, np.ndarray]:
    """Rows of ``input.embeddings``: no pixels, so no decode statistics; all rows ok unless
    their vector is null, of the wrong length or not finite. Normalises ``matrix`` in place."""
    n = table.num_rows
    good = valid & (lengths == dim)
    finite = np.isfinite(matrix).all(axis=1)
    norms = np.linalg.norm(matrix, axis=1)
    good &= finite & (norms > 0)
    np.divide(matrix, np.where(good, norms, 1.0)[:, None], out=matrix)
    reasons = np.where(~valid, "corrupt: null embedding",
                       np.where(lengths != dim, f"corrupt: embedding length differs from {dim}",
                                np.where(~good, "corrupt: embedding is zero or not finite", None)))
    columns = {
        "input_id": pa.array(np.arange(n, dtype=np.int64)),
        "uri": table["uri"].cast(pa.string()),
        "label": table["label"].cast(pa.string()) if "label" in table.column_names else pa.nulls(n, pa.string()),
        "status": pa.array(np.where(good, STATUS_OK, STATUS_REJECTED), pa.string()),
        "reason": pa.array(list(reasons), pa.string()),
        "width": pa.nulls(n, pa.int32()), "height": pa.nulls(n, pa.int32()),
        "brightness": pa.array(np.full(n, np.nan, np.float32)),
        "contrast": pa.array(np.full(n, np.nan, np.float32)),
        "sharpness": pa.array(np.full(n, np.nan, np.float32)),
        "content_hash": pa.nulls(n, pa.string()), "pixel_hash": pa.nulls(n, pa.string()),
        "phash": pa.array(np.zeros(n, np.int64)),
    }
    for name in table.column_names:
        if name not in columns:
            columns[name] = table[name]
    return pa.table(columns), (matrix if good.all() else matrix[good])


def _decode_and_embed(todo: pa.Table, config: Config, resolver: Resolver, timings: dict) -> pa.Table | None:
    """Run the Ray Data graph over the inputs that need it; None when there are none."""
    if todo.num_rows == 0:
        return None
    from curation import pipeline  # imports Ray; kept out of module import for fast CLI errors

    started_ray = pipeline.init_ray(config)
    try:
        t = time.perf_counter()
        ds = pipeline.decode_and_embed(todo, config, resolver)
        fresh = pipeline.collect_table(ds)
        timings["decode_embed"] = round(time.perf_counter() - t, 3)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    return fresh


def _knn(embeddings_ok: np.ndarray, config: Config, *, save_to, source: VectorParts | None):
    from curation import pipeline

    started_ray = False
    if len(embeddings_ok) >= config.knn.exact_below or config.knn.shards > 1 or config.knn.index == "ivf":
        started_ray = pipeline.init_ray(config)
    try:
        return pipeline.knn_graph(embeddings_ok, config.knn, save_to=save_to, source=source)
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _concat_samples(reused: pa.Table, fresh: pa.Table | None) -> pa.Table:
    if fresh is None:
        return reused
    if reused.num_rows == 0:
        return fresh
    reused = reused.select([name for name in fresh.column_names if name in reused.column_names])
    return pa.concat_tables([reused, fresh], promote_options="permissive").sort_by("input_id")


def run_job(config: Config, *, resolver: Resolver | None = None) -> RunResult:
    """Run the whole job; returns after ``_SUCCESS`` and ``latest`` are written."""
    resolver = resolver or Resolver(config.storage)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    inputs_io.check_inputs(config, resolver)
    output = resolver.resolve(config.output.uri)
    run_id = config.output.run_id or outputs.new_run_id()
    run = output.child(run_id)
    log.info("run %s -> %s", run_id, run.uri)

    if config.input.embeddings:
        table, matrix, valid, lengths, dim, files = inputs_io.read_embeddings_input(config, resolver)
        model_id = str(table["model_id"][0]) if "model_id" in table.column_names and table.num_rows else None
        samples, embeddings_ok = _samples_from_embeddings(table, matrix, valid, lengths, dim)
        del table, matrix
        # The index shards read the vectors from the input files themselves, skipping rejected rows.
        ok_rows = samples["status"].to_numpy(zero_copy_only=False) == STATUS_OK
        vector_source = VectorParts(parquet_parts(files), keep=ok_rows)
        identity = {"model": "precomputed", "source": config.input.embeddings, "model_id": model_id}
        timings["read_embeddings"] = round(time.perf_counter() - t0, 3)
        n_inputs = samples.num_rows
    else:
        inputs = inputs_io.list_inputs(config, resolver)
        n_inputs = inputs.num_rows
        timings["list_inputs"] = round(time.perf_counter() - t0, 3)
        from curation.embedders import load_embedder  # torch: only when there is something to embed

        # Describe (and validate) the model on the driver before any Ray work starts.
        _, ident = load_embedder(config.embedder.model, config.embedder.weights,
                                 image_size=config.embedder.image_size, resolver=resolver)
        identity = ident.to_dict()
        store = None
        reused = inputs.slice(0, 0)
        todo = inputs
        if config.store.enabled:
            store_location = resolver.resolve(config.store.uri) if config.store.uri else output.child("embedding-store")
            store = EmbeddingStore(store_location, ident.model_id)
            reused, todo = store.split(inputs)
        log.info("inputs: %d; reused from the embedding store: %d; to decode and embed: %d",
                 n_inputs, reused.num_rows, todo.num_rows)
        fresh = _decode_and_embed(todo, config, resolver, timings)
        samples = _concat_samples(reused, fresh)
        status = samples["status"].to_numpy(zero_copy_only=False)
        embedded = fresh.filter(pc.equal(fresh["status"], STATUS_OK)).num_rows if fresh is not None else 0
        store_counts = {"reused": reused.num_rows, "embedded": embedded,
                        "rejected": int((status == STATUS_REJECTED).sum())}
        identity["store"] = store_counts
        log.info("embedding store: reused %(reused)d, embedded %(embedded)d, rejected %(rejected)d", store_counts)
        t = time.perf_counter()
        files = outputs.write_embeddings(run.child("embeddings"), samples, model_id=ident.model_id,
                                         store_dtype=config.embedder.store_dtype)
        vector_source = VectorParts(parquet_parts(files))  # the index shards read the run's embeddings
        if store is not None:
            store.write(samples, run_id)
        timings["write_embeddings"] = round(time.perf_counter() - t, 3)
        ok_mask = pc.equal(samples["status"], STATUS_OK)
        embeddings_ok = (_embeddings_matrix(samples["embedding"].filter(ok_mask)) if samples.num_rows
                         else np.zeros((0, 1), np.float32))
        samples = samples.drop_columns(["embedding"])

    if samples.num_rows != n_inputs:
        raise RuntimeError(f"accounting: {n_inputs} inputs but {samples.num_rows} sample rows")

    t = time.perf_counter()
    knn, knn_info = _knn(embeddings_ok, config, save_to=run.child("index"), source=vector_source)
    timings["knn"] = round(time.perf_counter() - t, 3)
    budgets = [sel.budget for sel in config.selections if sel.mode == "representative" and sel.budget]
    samples, score_timings = run_scores(samples, embeddings_ok, knn, config.scores, budget=max(budgets, default=None))
    timings.update({f"score_{k}": v for k, v in score_timings.items()})
    t = time.perf_counter()
    results = build_selections(samples, config.scores, config.selections, embeddings_ok)
    timings["selections"] = round(time.perf_counter() - t, 3)

    samples = outputs.order_samples(samples)
    status = samples["status"].to_numpy(zero_copy_only=False)
    counts = {"inputs": n_inputs, "ok": int((status == STATUS_OK).sum()),
              "rejected": int((status == STATUS_REJECTED).sum())}
    flags = {name: int(pc.sum(samples[name]).as_py() or 0)
             for name in ("is_dark", "is_bright", "is_blurry", "is_low_information", "is_suspected_mislabel")}
    flags["duplicates_not_kept"] = int(samples["dup_of"].is_valid().to_numpy(zero_copy_only=False).sum())
    flags["duplicate_groups"] = len(pc.unique(samples["dup_group"].drop_null()))
    labels = samples["label"].drop_null()
    class_counts = {str(v["values"]): int(v["counts"]) for v in pc.value_counts(labels).to_pylist()} if len(labels) else {}
    balance = balance_stats(samples, {r.name: r.table for r in results},
                            {name for score in REGISTRY for name in score.columns})
    run_info = {
        "run_id": run_id,
        "uri": run.uri,
        "version": curation.__version__,
        "counts": counts,
        "flags": flags,
        "class_balance": class_counts,
        "balance": balance,
        "embedder": identity,
        "knn": knn_info,
        "selections": [{"name": r.name, "mode": r.mode, "rows": r.table.num_rows, "eligible": r.eligible,
                        "note": r.note} for r in results],
        "config": config.to_dict(redact=True),
        "versions": _versions(),
    }

    t = time.perf_counter()
    outputs.write_samples(run, samples)
    outputs.write_knn_graph(run.child("knn"), samples, knn)
    for r in results:
        outputs.write_table(run.child("selections", f"{r.name}.parquet"), r.table)
    write_bytes(run.child("report.html"), render_report(
        run_id=run_id, samples=samples, run_info=run_info,
        selections={r.name: r.table for r in results}).encode("utf-8"))
    timings["write_outputs"] = round(time.perf_counter() - t, 3)
    timings["total"] = round(time.perf_counter() - t0, 3)
    run_info["timings_s"] = timings
    outputs.write_json(run.child("run.json"), run_info)
    outputs.publish(output, run_id)
    log.info("published %s: %d inputs, %d ok, %d rejected in %.1fs", run.uri, counts["inputs"], counts["ok"],
             counts["rejected"], timings["total"])
    return RunResult(run_id, run.uri, samples, run_info)


def _versions() -> dict:
    import faiss
    import ray
    import sklearn
    import torch
    import torchvision

    return {"python": platform.python_version(), "ray": ray.__version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "faiss": faiss.__version__, "pyarrow": pa.__version__,
            "scikit-learn": sklearn.__version__}
