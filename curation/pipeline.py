"""The only module that builds the Ray Data graph.

    inputs to decode ─► decode + pixel statistics (CPU tasks) ─► embed (autoscaling actor pool) ─┐
    embedding store  ─► match stored rows to current inputs (tasks) ──────────────────────────────┴─► EmbeddingsDatasink

The datasink runs on the workers: it writes each bundle's ok vectors as one ``embeddings/``
Parquet file and hands back only the compact per-item columns (status, reason, statistics,
hashes, where the vector went), so the vectors never reach the driver.
"""

from __future__ import annotations

import logging
import math
from typing import Iterable

import numpy as np
import pyarrow as pa
import ray
# Ray internals, each pinned by tests/test_ray_internals.py (which fails when Ray moves them):
# * ExecutionCallback: the only hook that sees a streaming execution's progress while it runs
#   (Ray Data's public API reports nothing until a dataset is consumed or written);
# * StreamingExecutor._topology (in _RayDataProgress): the operators whose finished-task counts
#   feed the stall watchdog; no public accessor exposes them.
from ray.data._internal.execution.execution_callback import ExecutionCallback
from ray.data.block import BlockAccessor
from ray.data.datasource.datasink import Datasink, WriteResult
import pyarrow.compute as pc
import pyarrow.fs as pafs

from curation.config import Config
from curation.io.filesystem import Location, Resolver
from curation.io.outputs import EMBEDDING_ROW_GROUP, write_vector_part
from curation.io.store import Reuse, match_stored
from curation.session import progress
from curation.sizing import ClusterShape, stage_requests
from curation.stages.decode import DecodeStage
from curation.stages.embed import EMPTY_IS_NULL, EmbedStage
from curation.store_copy import copy_reused

log = logging.getLogger(__name__)

TARGET_ROWS_PER_BLOCK = 256
CHECKPOINTS = 8  # a small run writes its vectors in about this many parts (large runs: 16k-row parts)
# Columns of the inputs table that travel to the decode tasks (labels and metadata stay home).
DECODE_INPUT_COLUMNS = ("input_id", "uri", "input_error", "fingerprint")
# detection runs: each input's boxes to cut (see DecodeStage and curation.crop_store)
BOX_COLUMNS = ("boxes", "box_rows", "box_cut", "box_keys", "crop_only")


class EmbeddingsDatasink(Datasink[pa.Table]):
    """Writes embedded rows as ``embeddings/`` Parquet parts from the workers.

    Args:
        folder: the run's ``embeddings/`` folder.
        model_id: written beside every vector.
        store_dtype: ``float32`` or ``float16``.
        object_folder: the run's ``object-embeddings/`` folder (detection runs: the crops' vectors).

    After the write, :attr:`compact` holds one row per input row without its vector (see
    :func:`curation.io.outputs.write_vector_part`) and :attr:`files` the parts written.
    """

    def __init__(self, *, folder: Location, model_id: str, store_dtype: str, rows_per_part: int = EMBEDDING_ROW_GROUP,
                 object_folder: Location | None = None):
        self.folder = folder
        self.object_folder = object_folder
        self.rows_per_part = rows_per_part
        self.model_id = model_id
        self.store_dtype = store_dtype
        self.compact: pa.Table | None = None

    @property
    def min_rows_per_write(self) -> int:
        # At most ~16k rows a file (what an index shard reads per step); fewer in small runs, so
        # that every run leaves a few parts behind as it goes: the checkpoint a rerun resumes from.
        return self.rows_per_part

    def write(self, blocks: Iterable, ctx) -> pa.Table:
        tables = [BlockAccessor.for_block(block).to_arrow() for block in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return pa.table({"input_id": pa.array([], pa.int64())})
        rows = pa.concat_tables(tables, promote_options="permissive")
        return write_vector_part(self.folder, rows, model_id=self.model_id, store_dtype=self.store_dtype,
                                 object_folder=self.object_folder)

    def on_write_complete(self, write_result: WriteResult[pa.Table]) -> None:
        parts = [t for t in write_result.write_returns if t.num_rows]
        self.compact = pa.concat_tables(parts, promote_options="permissive") if parts else None


def embed_to_storage(todo: pa.Table, reuse: Reuse | None, config: Config, resolver: Resolver, *,
                     folder: Location, model_id: str, objects: dict | None = None,
                     object_folder: Location | None = None) -> pa.Table | None:
    """Decode and embed ``todo``, fetch the ``reuse`` rows from the store, write every ok vector
    to ``folder``; returns the compact rows (None when there was nothing to do).

    A detection run gives ``objects`` (the decode stage's box settings, see
    :class:`~curation.stages.decode.DecodeStage`) and ``todo`` carries ``boxes`` and
    ``box_rows``: the boxes' crops are cut in the same decode, embedded by the same actors and
    written to ``object_folder``."""
    ctx = ray.data.DataContext.get_current()
    # Ray Data warns "no available CPUs, the Dataset job will hang" once per process when it
    # re-reads the materialised write while the actor pool is still giving its CPUs back: a
    # false alarm at the end of every run. Sizing (sizing.stage_requests) prevents the real
    # case, and the stall watchdog reports it if it happens anyway.
    from ray.util.debug import log_once

    log_once("cpu_warning")
    # Blocks reach the writer in input order, so every part holds a contiguous run of each
    # branch's rows and the parts' names (their first input id) sort the same on any cluster:
    # vector ids follow input ids, not which node finished first.
    ctx.execution_options.preserve_order = True
    if _RayDataProgress not in ctx.custom_execution_callback_classes:
        ctx.custom_execution_callback_classes.append(_RayDataProgress)
    total = todo.num_rows + (reuse.count if reuse is not None else 0)
    rows_per_part = int(min(EMBEDDING_ROW_GROUP, max(TARGET_ROWS_PER_BLOCK, total // CHECKPOINTS)))
    if not todo.num_rows and reuse is not None and reuse.count:  # nothing to decode: no pipeline to start
        return copy_reused(reuse, folder=folder, model_id=model_id, store_dtype=config.embedder.store_dtype,
                           rows_per_part=rows_per_part)
    branches = []
    if todo.num_rows:
        columns = list(DECODE_INPUT_COLUMNS) + (list(BOX_COLUMNS) if objects is not None else [])
        branches.append(_decode_and_embed(todo.select(columns), config, resolver, objects))
    if reuse is not None and reuse.count:
        branches.append(_stored_rows(reuse))
    if not branches:
        return None
    ds = branches[0] if len(branches) == 1 else branches[0].union(*branches[1:])
    sink = EmbeddingsDatasink(folder=folder, model_id=model_id, store_dtype=config.embedder.store_dtype,
                              rows_per_part=rows_per_part, object_folder=object_folder if objects is not None else None)
    ds.write_datasink(sink)
    remove_unlisted_parts(folder, sink.compact)
    if objects is not None:
        remove_unlisted_parts(object_folder, sink.compact, column="object_vector_file")
    return sink.compact


def remove_unlisted_parts(folder: Location, compact: pa.Table | None, *, column: str = "vector_file") -> list[str]:
    """Delete ``embeddings/`` parts no compact row points at: a write task that Ray reran
    after its node was lost may have left a first, half-reported part behind, and readers
    take the folder's name order as vector order. Returns the names removed."""
    listed = set()
    if compact is not None and column in compact.column_names:
        listed = set(pc.drop_null(compact[column]).to_pylist())
    infos = folder.filesystem.get_file_info(pafs.FileSelector(folder.path, allow_not_found=True))
    stray = [i for i in infos if i.type == pafs.FileType.File and i.base_name.startswith("part-")
             and i.base_name not in listed]
    for info in stray:
        folder.filesystem.delete_file(info.path)
    if stray:
        log.info("removed %d %s part(s) left by retried write tasks", len(stray), folder.path.rsplit("/", 1)[-1])
    return [i.base_name for i in stray]


class _RayDataProgress(ExecutionCallback):
    """Ray Data execution callback: every task an operator finishes counts as progress for
    the stall watchdog (:class:`curation.session.StallWatchdog`)."""

    def __init__(self):
        self.seen = 0

    def before_execution_starts(self, executor) -> None:
        self.seen = 0
        progress.streaming = True

    def on_execution_step(self, executor) -> None:
        topology = getattr(executor, "_topology", None) or {}  # internal: see the note at the imports
        finished = sum(getattr(op.metrics, "num_tasks_finished", 0) for op in topology)
        if finished > self.seen:
            progress.tick(finished - self.seen)
            self.seen = finished

    def after_execution_succeeds(self, executor) -> None:
        progress.streaming = False
        progress.tick()

    def after_execution_fails(self, executor, error) -> None:
        progress.streaming = False


def _decode_and_embed(inputs: pa.Table, config: Config, resolver: Resolver,
                      objects: dict | None = None) -> ray.data.Dataset:
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = log.isEnabledFor(logging.INFO)
    blocks = max(1, math.ceil(inputs.num_rows / TARGET_ROWS_PER_BLOCK))
    ds = ray.data.from_arrow(inputs)
    if blocks > 1:
        ds = ds.repartition(blocks)
    # Decoding runs as stateless CPU tasks (the stage holds no model), so Ray Data can scale
    # them with the available CPUs and keep them apart from the embedding actors.
    pool = stage_requests(config.embedder, ClusterShape.current(config.cluster))
    # decode.path: auto decodes JPEGs in the embedding actors when they hold a GPU (nvJPEG):
    # the node's CPUs then only read the files.
    on_device = config.decode.path == "torch" or (config.decode.path == "auto" and pool["device"] == "cuda")
    decode = DecodeStage(resolver=resolver, image_size=config.embedder.image_size,
                         max_pixels=config.decode.max_pixels, background=tuple(config.decode.background),
                         defer_jpegs=on_device, objects=objects)
    ds = ds.map_batches(
        _decode_batch,
        fn_kwargs={"stage": decode},
        batch_size=config.decode.batch_size,
        batch_format="numpy",
        # Declaring the decode memory also keeps Ray Data from fusing these tasks into the
        # embedding actors (it fuses ops with identical resource requests), so decoding runs
        # on its own CPUs and the model never waits on a serial decode in the same process.
        **pool["decode"].options(),
    )
    log.info("embedding actor pool: %d..%d actors on %s (%s each); decode tasks %s CPU each; JPEGs decoded %s",
             pool["min_size"], pool["max_size"], pool["device"], pool["actor"].options(), pool["decode"].cpus,
             f"in the embedding actors ({pool['device']})" if on_device else "by the decode tasks")
    return ds.map_batches(
        EmbedStage,
        fn_constructor_kwargs={
            "model": config.embedder.model,
            "weights": config.embedder.weights,
            "image_size": config.embedder.image_size,
            "device": pool["device"],
            "precision": config.embedder.precision,
            "num_threads": pool["actor"].threads,
            "resolver": resolver,
            "decode": ({"max_pixels": config.decode.max_pixels, "background": list(config.decode.background)}
                       if on_device else None),
        },
        compute=ray.data.ActorPoolStrategy(min_size=pool["min_size"], max_size=pool["max_size"],
                                           max_concurrent_calls_per_actor=pool["calls"]),
        batch_size=config.embedder.batch_size,
        batch_format="numpy",
        **pool["actor"].options(),
    )


def _decode_batch(batch, stage: DecodeStage):
    out = stage(batch)
    # Between numpy batches Ray Data may see a text column that is all None as null/float and
    # later join it with real text as "nan": ship "" instead (the embed stage turns it back
    # into null).
    for name in EMPTY_IS_NULL:
        values = out[name]
        values[np.fromiter((v is None for v in values), bool, len(values))] = ""
    return out


def _stored_rows(reuse: Reuse) -> ray.data.Dataset:
    """The store's vector files, filtered to the rows this run reuses (keys as shared arrays)."""
    files = reuse.files
    paths = [f.path for f in files]
    ds = ray.data.read_parquet(paths, filesystem=files[0].filesystem, include_paths=True)
    return ds.map_batches(match_stored, batch_format="pyarrow",
                          fn_kwargs={"keys": reuse.keys, "input_ids": reuse.input_ids,
                                     "model_id": reuse.model_id, "owners": reuse.owners, "paths": paths})
