"""A night with nothing to decode: every ok item's vector is copied from the embedding store
by Ray tasks, one per output part, instead of a Ray Data pipeline.

The output is what the pipeline writes for the same night (:func:`curation.pipeline.
embed_to_storage`): ``embeddings/`` parts in input order, each a contiguous run of input ids
named after its first and last (:func:`curation.io.outputs.write_vector_part`), so vector ids
follow input ids; the stored rows are matched by the store's own rule
(:func:`curation.io.store.match_stored`, each key from the one file that owns it). Only the
compact rows come back to the driver. What it saves is the pipeline's start-up, about 2 s a
night on a small run -- the nights where nothing changed.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.io.filesystem import Location
from curation.io.outputs import write_vector_part
from curation.io.store import Reuse, match_stored
from curation.session import run_tasks

log = logging.getLogger(__name__)


def copy_reused(reuse: Reuse, *, folder: Location, model_id: str, store_dtype: str, rows_per_part: int) -> pa.Table:
    """Write every reused row's vector to ``folder`` (the run's ``embeddings/``), in parts of at
    most ``rows_per_part`` rows in input order; returns the compact rows (no vectors)."""
    order = np.argsort(reuse.input_ids, kind="stable")
    owners = reuse.owners if reuse.owners is not None else np.zeros(reuse.count, np.int32)
    jobs = []
    for start in range(0, len(order), max(1, rows_per_part)):
        chunk = order[start:start + rows_per_part]
        wanted = []  # per stored file that supplies some of the chunk: its keys (sorted) and their input ids
        for owner in np.unique(owners[chunk]):
            mine = np.sort(chunk[owners[chunk] == owner])  # positions in reuse.keys, which is sorted
            wanted.append((reuse.files[int(owner)], reuse.keys[mine], reuse.input_ids[mine]))
        jobs.append((wanted, folder, model_id, store_dtype))
    parts = run_tasks(copy_part, jobs)
    log.info("copied %d stored vectors into %d part(s) by Ray tasks", reuse.count, len(parts))
    return pa.concat_tables(parts, promote_options="permissive")


def copy_part(wanted: list[tuple[Location, np.ndarray, np.ndarray]], folder: Location, model_id: str,
              store_dtype: str) -> pa.Table:
    """One output part: the wanted rows of each stored file, in input order (a Ray task)."""
    tables = []
    for location, keys, input_ids in wanted:
        stored = pq.read_table(location.path, filesystem=location.filesystem)
        tables.append(match_stored(stored, keys=keys, input_ids=input_ids, model_id=model_id))
    rows = pa.concat_tables(tables, promote_options="permissive")
    return write_vector_part(folder, rows, model_id=model_id, store_dtype=store_dtype)
