"""Write a run's outputs and publish it.

Layout under ``output.uri``::

    <run_id>/samples/part-00000.parquet
    <run_id>/selections/<name>.parquet
    <run_id>/embeddings/*.parquet        input_id, uri, embedding, copy_vector (images), model_id
    <run_id>/knn/*.parquet               uri, input_id, neighbor_ids, neighbor_similarities
    <run_id>/index/*.faissindex          trained + filled shards (sharded path only)
    <run_id>/index-copies/*.faissindex   the same for the copy descriptors (images, sharded path)
    <run_id>/diff/<selection>.parquet    against the previous published run (nightly)
    <run_id>/report.html
    <run_id>/run.json
    <run_id>/_SUCCESS                    written last
    latest                               {"run_id": ...}, replaced only after _SUCCESS

Readers should only trust a run whose ``_SUCCESS`` exists, and should find the newest complete
run through ``latest``; a crashed run leaves a folder without ``_SUCCESS`` and ``latest``
untouched.
"""

from __future__ import annotations

import datetime as dt

import logging
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import numpy as np
import pyarrow.compute as pc
import pyarrow.fs as pafs

from curation.config import is_run_id
from curation.io.filesystem import Location, read_bytes, write_bytes, write_if_unchanged
from curation.published_run import latest_bytes, latest_run_id
from curation.run_layout import LATEST, SUCCESS
from curation.schema import INTERNAL_COLUMNS, SAMPLES_CONTRACT, SAMPLES_EXTRA, is_ok, ok_rows_in_vector_order

log = logging.getLogger(__name__)

SAMPLES_ROWS_PER_FILE = 1_000_000
EMBEDDING_ROW_GROUP = 16_384  # 32 MB of 512-d float32: index shards read their partition a row group at a time


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def order_samples(samples: pa.Table) -> pa.Table:
    """Contract columns first (cast to their contract types), then our extras, then metadata."""
    columns, names = [], []
    for schema in (SAMPLES_CONTRACT, SAMPLES_EXTRA):
        for field in schema:
            if field.name in samples.column_names:
                columns.append(samples[field.name].cast(field.type))
                names.append(field.name)
    for name in samples.column_names:
        if name not in names and name not in INTERNAL_COLUMNS:
            columns.append(samples[name])
            names.append(name)
    return pa.table(dict(zip(names, columns)))


def write_parquet_parts(folder: Location, table: pa.Table, rows_per_file: int = SAMPLES_ROWS_PER_FILE,
                        row_group_size: int | None = None) -> list[Location]:
    """Write ``table`` as ``part-NNNNN.parquet`` files of at most ``rows_per_file`` rows."""
    folder.filesystem.create_dir(folder.path, recursive=True)
    files = []
    for part, start in enumerate(range(0, max(table.num_rows, 1), rows_per_file)):
        target = folder.child(f"part-{part:05d}.parquet")
        pq.write_table(table.slice(start, rows_per_file), target.path, filesystem=target.filesystem,
                       row_group_size=row_group_size)
        files.append(target)
    return files


SAMPLES_ROW_GROUP = 65_536  # bounded encode buffers while writing (and friendlier to readers)


def write_samples(run: Location, samples: pa.Table) -> list[Location]:
    return write_parquet_parts(run.child("samples"), samples, row_group_size=SAMPLES_ROW_GROUP)


# What a vector file holds besides the vector: enough for the embedding store to reuse an item
# without decoding it again (its key and its decode-time outputs).
VECTOR_FILE_COLUMNS = ("input_id", "uri", "fingerprint", "width", "height", "brightness", "contrast", "sharpness",
                       "shadows", "highlights", "content_hash", "pixel_hash", "phash",
                       "orientation")  # a detection run's: its boxes are placed in the stored frame


def write_vector_part(folder: Location, rows: pa.Table, *, model_id: str, store_dtype: str,
                      object_folder: Location | None = None) -> pa.Table:
    """Write the ok rows of one block of embedded rows as one ``embeddings/`` Parquet file and
    return every row of the block without its vector (the compact per-item columns the driver
    keeps), with ``vector_file`` / ``vector_row`` saying where each ok row's vector went.

    Runs on the workers (the embeddings datasink), so vectors never reach the driver. The file
    is named after the block's smallest ``input_id`` so that name order follows input order, and
    written in row groups of ``EMBEDDING_ROW_GROUP`` rows so readers can stream it. In a
    detection run (``crop_rows`` and ``crop_vectors`` columns) the boxes' vectors go to a file
    of the same name in ``object_folder``, named on each row as ``object_vector_file``.
    """
    keyed = "input_id" in rows.column_names
    if keyed:
        rows = rows.sort_by("input_id")
    decoded = is_ok(rows["status"])
    # crop_only rows (see curation.crop_store): their crops are written here, their image's
    # vector came from the store in another row.
    crop_only = pc.fill_null(rows["crop_only"], False).to_numpy(zero_copy_only=False) \
        if "crop_only" in rows.column_names else np.zeros(rows.num_rows, bool)
    okmask = decoded & ~crop_only
    good = rows.filter(pa.array(okmask))
    name = None
    if good.num_rows:
        embedding = good["embedding"].combine_chunks()
        if store_dtype == "float16":
            embedding = pc.cast(embedding, pa.list_(pa.float16(), embedding.type.list_size))
        columns = {c: good[c] for c in VECTOR_FILE_COLUMNS if c in good.column_names}
        columns["embedding"] = embedding
        if "copy_vector" in good.column_names:
            columns["copy_vector"] = good["copy_vector"].combine_chunks()
        columns["model_id"] = pa.array([model_id] * good.num_rows, pa.string())
        first = int(good["input_id"][0].as_py()) if keyed else 0
        # Named by content, not by attempt: a write task Ray reruns overwrites its own part.
        last = int(good["input_id"][-1].as_py()) if keyed else good.num_rows - 1
        name = f"part-{first:012d}-{last:012d}.parquet" if keyed else f"part-{uuid.uuid4().hex[:8]}.parquet"
        target = folder.child(name)
        folder.filesystem.create_dir(folder.path, recursive=True)
        pq.write_table(pa.table(columns), target.path, filesystem=target.filesystem,
                       row_group_size=EMBEDDING_ROW_GROUP)
    vector_row = np.full(rows.num_rows, -1, np.int64)
    vector_row[okmask] = np.arange(int(okmask.sum()))
    if "crop_rows" in rows.column_names:  # a detection run: the boxes' vectors beside the images'
        object_file = _write_object_part(object_folder, rows.filter(pa.array(decoded)), model_id=model_id,
                                         store_dtype=store_dtype)
        rows = rows.drop_columns(["crop_rows", "crop_vectors", "crop_keys"])
        rows = rows.append_column("object_vector_file", pa.array([object_file if m else None for m in decoded],
                                                                 pa.string()))
    compact = rows.drop_columns([c for c in INTERNAL_COLUMNS if c in rows.column_names])
    compact = compact.append_column("vector_file", pa.array([name if m else None for m in okmask], pa.string()))
    return compact.append_column("vector_row", pa.array(vector_row))


def _write_object_part(folder: Location, good: pa.Table, *, model_id: str, store_dtype: str) -> str | None:
    """The crops' vectors of one block's decoded images as one ``object-embeddings/`` file
    (named by the block's input ids, as the images' parts): ``object_row`` (the box's row in
    the run's objects table), ``input_id`` (its image), ``embedding``, ``crop_key`` (what the
    crop store reuses it by). Returns the name (None: no crop in the block)."""
    if not good.num_rows:
        return None
    # (null on rows copied from the embedding store: they cut no crop tonight)
    rows = [np.frombuffer(b or b"", np.int64) for b in good["crop_rows"].to_pylist()]
    vectors = [np.frombuffer(b or b"", np.float32) for b in good["crop_vectors"].to_pylist()]
    keys = [np.frombuffer(b or b"", np.int64) for b in good["crop_keys"].to_pylist()]
    count = sum(len(r) for r in rows)
    if not count:
        return None
    name = f"part-{int(good['input_id'][0].as_py()):012d}-{int(good['input_id'][-1].as_py()):012d}.parquet"
    dim = good["embedding"].type.list_size
    flat = np.concatenate(vectors).astype(np.float16 if store_dtype == "float16" else np.float32)
    value_type = pa.float16() if store_dtype == "float16" else pa.float32()
    input_ids = good["input_id"].to_numpy()
    table = pa.table({
        "object_row": pa.array(np.concatenate(rows)),
        "input_id": pa.array(np.repeat(input_ids, [len(r) for r in rows])),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(flat, value_type), dim),
        "model_id": pa.array([model_id] * count, pa.string()),
        "crop_key": pa.array(np.concatenate(keys), pa.int64()),
    })
    folder.filesystem.create_dir(folder.path, recursive=True)
    target = folder.child(name)
    pq.write_table(table, target.path, filesystem=target.filesystem, row_group_size=EMBEDDING_ROW_GROUP)
    return name


KNN_ROWS_PER_STEP = 262_144  # the graph is converted and written this many rows at a time


def write_knn_graph(folder: Location, samples: pa.Table, knn) -> None:
    """The kNN graph the scores used: ``uri, input_id, neighbor_ids`` (their ``input_id``s),
    ``neighbor_similarities`` (cosine), for every ok item, nearest first. Written step by step so
    no second copy of the whole graph is made."""
    ok_rows = ok_rows_in_vector_order(samples)
    input_ids = samples["input_id"].to_numpy()[ok_rows]
    folder.filesystem.create_dir(folder.path, recursive=True)
    target = folder.child("part-00000.parquet")
    schema = pa.schema([("uri", pa.string()), ("input_id", pa.int64()), ("neighbor_ids", pa.list_(pa.int64())),
                        ("neighbor_similarities", pa.list_(pa.float32()))])
    with pq.ParquetWriter(target.path, schema, filesystem=target.filesystem) as writer:
        for start in range(0, max(len(ok_rows), 1), KNN_ROWS_PER_STEP):
            stop = min(start + KNN_ROWS_PER_STEP, len(ok_rows))
            ids, sims = knn.ids[start:stop], knn.sims[start:stop]
            valid = ids >= 0
            mapped = input_ids[ids[valid]] if len(input_ids) else ids[valid]
            offsets = np.concatenate([[0], np.cumsum(valid.sum(axis=1))]).astype(np.int32)
            writer.write_table(pa.table({
                "uri": samples["uri"].take(pa.array(ok_rows[start:stop])).cast(pa.string()),
                "input_id": pa.array(input_ids[start:stop], pa.int64()),
                "neighbor_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(mapped, pa.int64())),
                "neighbor_similarities": pa.ListArray.from_arrays(pa.array(offsets), pa.array(sims[valid], pa.float32())),
            }, schema=schema))


def write_table(location: Location, table: pa.Table) -> None:
    parent = location.path.rsplit("/", 1)[0]
    location.filesystem.create_dir(parent, recursive=True)
    pq.write_table(table, location.path, filesystem=location.filesystem)


def interrupted_vector_files(output: Location, current_run: str, *, newest: int = 3,
                             skip: tuple[str | None, ...] = ()) -> list[Location]:
    """The ``embeddings/`` parts of runs that stopped before publishing (no ``_SUCCESS``), the
    ``newest`` such runs by name (run ids sort by time). Parts are written as blocks complete,
    so they are the checkpoint a rerun resumes from; a part cut short by the crash is skipped
    when it is read (see :meth:`curation.io.store.EmbeddingStore.lookup`). ``skip``: runs not to
    consider (the one the store's snapshot was made from already is in the store)."""
    fs = output.filesystem
    try:
        folders = [info for info in fs.get_file_info(pafs.FileSelector(output.path, allow_not_found=True))
                   if info.type == pafs.FileType.Directory and info.base_name != current_run
                   and info.base_name not in skip]
        marks = fs.get_file_info([f"{info.path}/{SUCCESS}" for info in folders])
        unfinished = sorted((info.base_name for info, mark in zip(folders, marks)
                             if mark.type != pafs.FileType.File), reverse=True)
        files: list[Location] = []
        runs = 0
        for run_id in unfinished:  # other folders (the embedding store) have no embeddings/ parts
            if runs == newest:
                break
            folder = output.child(run_id, "embeddings")
            infos = fs.get_file_info(pafs.FileSelector(folder.path, allow_not_found=True))
            parts = [folder.child(i.base_name) for i in infos
                     if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")]
            runs += bool(parts)
            files += parts
    except (OSError, pa.ArrowException) as exc:
        log.warning("could not look for interrupted runs under %s (%s); not resuming", output.uri, exc)
        return []
    return files


def remove_old_runs(output: Location, keep: int) -> list[str]:
    """Delete all but the ``keep`` newest complete runs under ``output`` (by the time of their
    ``_SUCCESS``), never the run ``latest`` names nor a folder without ``_SUCCESS`` (a run being
    written, a crashed one kept for inspection, the embedding store). Returns the removed ids."""
    if keep <= 0:
        return []
    fs = output.filesystem
    folders = [info for info in fs.get_file_info(pafs.FileSelector(output.path, allow_not_found=True))
               if info.type == pafs.FileType.Directory]
    marks = fs.get_file_info([f"{info.path}/{SUCCESS}" for info in folders])
    complete = sorted(((mark.mtime_ns or 0, info.base_name) for info, mark in zip(folders, marks)
                       if mark.type == pafs.FileType.File), reverse=True)
    try:
        latest = latest_run_id(read_bytes(output.child(LATEST)))
    except OSError:
        latest = None
    removed = []
    for _, run_id in complete[keep:]:
        if run_id != latest:
            fs.delete_dir(output.child(run_id).path)
            removed.append(run_id)
    return removed


def publish(output: Location, run_id: str, *, expected_latest: str | None = None, storage=None) -> None:
    """Mark the run complete, then point ``latest`` at it (in that order). ``latest`` moves by
    compare-and-swap: only if it still has the tag ``expected_latest`` this run saw when it
    started (None: only if there was none), so of two runs on one output that started from the
    same ``latest``, exactly one publishes; the other raises
    :class:`~curation.io.filesystem.PreconditionFailed` and leaves ``latest`` alone."""
    if not is_run_id(run_id):  # the config refuses such ids; nothing else may publish one either
        raise ValueError(f"not a run folder name: {run_id!r}")
    run = output.child(run_id)
    write_bytes(run.child(SUCCESS), b"")
    write_if_unchanged(output.child(LATEST), latest_bytes({"run_id": run_id, "uri": run.uri}), expected_latest, storage)
