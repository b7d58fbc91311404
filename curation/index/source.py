"""Where vectors are read from: Parquet files in storage, not the driver.

A :class:`VectorParts` names the Parquet files that hold the vectors in id order (the run's
``embeddings/`` output, or the files of ``input.embeddings``) and, for inputs that contain
rejected rows, which rows become ids. Each index shard streams only its own id range, each
query task its own batch, and :meth:`VectorParts.take` fetches a few rows (a training sample,
one class for a selection) reading only the row groups that hold them, so on a cluster the
vectors go from object storage to the worker that needs them, never through the driver.

:class:`MemoryVectors` offers the same interface over a matrix already in memory (tests,
benchmarks, small in-process runs).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.io.filesystem import Location
from curation.sizing import ONE_CPU
from curation.session import progress, run_tasks

READ_BUFFER = 8 << 20  # bytes per buffered read from storage


@dataclass
class VectorParts:
    """Parquet files holding vectors in id order.

    Attributes:
        parts: ``(file, first row, rows)`` in order; rows are numbered across all files.
        column: the list column holding the vectors (float32 or float16).
        keep: optional mask over rows; the kept rows, in order, are ids 0, 1, ... (rows of an
            ``input.embeddings`` file whose vector was rejected are skipped).
    """

    parts: list[tuple[Location, int, int]]
    column: str = "embedding"
    keep: np.ndarray | None = None

    # A VectorParts is an index shard's constructor argument. Ray puts arguments over 100 KB in
    # the object store, and an actor that may restart with such arguments logs an E-level line
    # (and keeps them alive); a byte per row of ``keep`` would be that at 100k rows. Packed to a
    # bit per row and compressed, a mask with few rejected rows is a few hundred bytes.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self.keep is not None:
            state["keep"] = ("packed", len(self.keep), zlib.compress(np.packbits(self.keep).tobytes(), 6))
        return state

    def __setstate__(self, state: dict) -> None:
        keep = state.get("keep")
        if isinstance(keep, tuple) and keep and keep[0] == "packed":
            _, n, data = keep
            state["keep"] = np.unpackbits(np.frombuffer(zlib.decompress(data), np.uint8), count=n).astype(bool)
        self.__dict__.update(state)

    @property
    def rows(self) -> int:
        return sum(rows for _, _, rows in self.parts)

    def describe(self) -> dict:
        """Where the vectors are, for ``run.json`` (``knn.vectors``): readers of a published run
        open these files in this order instead of listing a folder."""
        return {"files": [location.uri for location, _, _ in self.parts], "column": self.column,
                "rows": self.rows, "skips_rejected_rows": self.keep is not None}

    @property
    def dim(self) -> int:
        """Vector length, from the first file's schema (or its first vector)."""
        for location, _, rows in self.parts:
            with location.filesystem.open_input_file(location.path) as fh:
                reader = pq.ParquetFile(fh)
                field = reader.schema_arrow.field(self.column)
                if pa.types.is_fixed_size_list(field.type):
                    return field.type.list_size
                if rows:
                    first = reader.read_row_group(0, columns=[self.column]).column(0).drop_null()
                    if len(first):
                        return len(first[0])
        return 1

    def ranges(self, target_rows: int) -> list[tuple[int, int]]:
        """Consecutive id ranges of about ``target_rows`` that follow row-group boundaries, so a
        task reading one range reads each row group once (a larger row group is one range)."""
        bounds = [0]
        for location, first, rows in self.parts:
            with location.filesystem.open_input_file(location.path) as fh:
                meta = pq.ParquetFile(fh).metadata
            start = first
            for g in range(meta.num_row_groups):
                start += meta.row_group(g).num_rows
                if start - bounds[-1] >= target_rows:
                    bounds.append(start)
        if bounds[-1] != self.rows:
            bounds.append(self.rows)
        if self.keep is not None:  # row boundaries -> id boundaries
            kept_before = np.concatenate([[0], np.cumsum(self.keep)])
            bounds = sorted(set(int(kept_before[b]) for b in bounds))
        return [(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """File-order row numbers of ``ids``."""
        ids = np.asarray(ids, np.int64)
        return np.flatnonzero(self.keep)[ids] if self.keep is not None else ids

    def take(self, ids: np.ndarray, *, local: bool = False) -> np.ndarray:
        """Unit vectors of ``ids`` (any order, repeats allowed) as ``(len(ids), d)`` float32.

        Only the row groups holding them are read, one task per file (Ray tasks when Ray is
        up; in this process when ``local``, as a task that must not wait on other tasks does),
        so the caller receives just these rows."""
        ids = np.asarray(ids, np.int64)
        if len(ids) == 0:
            return np.zeros((0, self.dim), np.float32)
        wanted, inverse = np.unique(self.rows_of(ids), return_inverse=True)
        jobs = []
        for location, first, rows in self.parts:
            lo, hi = np.searchsorted(wanted, [first, first + rows])
            if hi > lo:
                jobs.append((location, self.column, wanted[lo:hi] - first))
        out = np.concatenate([_take_rows(*job) for job in jobs] if local else run_tasks(_take_rows, jobs))
        if len(wanted) == len(ids) and np.array_equal(inverse, np.arange(len(ids))):
            return out  # ids were sorted and distinct: no reordering copy
        return out[inverse]

    def take_groups(self, groups: list[np.ndarray], *, window_bytes: int) -> Iterator[np.ndarray]:
        """:meth:`take` of each group of ids in turn, reading every file once per window of
        consecutive groups whose vectors fit in ``window_bytes`` rather than once per group:
        when the groups are spread over every file (the classes of a selection), a take per
        group reads the whole store each time. A window's rows wait in Ray's object store, one
        object per file and group (spilled to disk by Ray if it must), and the caller holds
        one group at a time."""
        import ray

        row_bytes = 4 * max(self.dim, 1)
        window: list[int] = []
        windows: list[list[int]] = []
        for i, ids in enumerate(groups):
            if window and (sum(len(groups[j]) for j in window) + len(ids)) * row_bytes > window_bytes:
                windows.append(window)
                window = []
            window.append(i)
        if window:
            windows.append(window)
        for window in windows:
            if not ray.is_initialized() or len(window) == 1:
                for i in window:
                    yield self.take(groups[i])
                continue
            rows = [np.sort(self.rows_of(groups[i])) for i in window]
            order = [np.argsort(np.argsort(self.rows_of(groups[i]), kind="stable"), kind="stable") for i in window]
            task = ray.remote(num_returns=len(window), **ONE_CPU.options())(_take_rows_split)
            refs = []
            for location, first, count in self.parts:
                local = [r[np.searchsorted(r, first):np.searchsorted(r, first + count)] - first for r in rows]
                if sum(len(x) for x in local):
                    refs.append(task.remote(location, self.column, np.concatenate(local),
                                            np.array([len(x) for x in local], np.int64)))
            for j in range(len(window)):
                parts = [p for p in ray.get([ref[j] for ref in refs]) if len(p)]
                for ref in refs:  # this group's objects are no longer needed
                    ref[j] = None
                progress.tick()
                yield np.concatenate(parts)[order[j]] if parts else np.zeros((0, self.dim), np.float32)

    def read_all(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, vectors)`` of ``[lo, hi)`` in one array (a query batch)."""
        parts = list(self.read(lo, hi))
        if not parts:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    @property
    def n(self) -> int:
        return int(self.keep.sum()) if self.keep is not None else self.rows

    def read(self, lo: int, hi: int, *, batch_rows: int = 16384) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(ids, unit vectors float32)`` for ids in ``[lo, hi)``, ``batch_rows`` rows at a time."""
        if hi <= lo:
            return
        if self.keep is None:
            row_lo, row_hi = lo, hi
            id_of_row = None
        else:
            kept_rows = np.flatnonzero(self.keep)
            row_lo, row_hi = int(kept_rows[lo]), int(kept_rows[hi - 1]) + 1
            id_of_row = np.cumsum(self.keep) - 1
        for location, first, rows in self.parts:
            if first + rows <= row_lo or first >= row_hi:
                continue
            try:
                with location.filesystem.open_input_file(location.path) as fh:
                    # Only the row groups that overlap this range, streamed page by page (no
                    # pre-buffering of whole row groups), so a shard holds about one batch.
                    reader = pq.ParquetFile(fh, pre_buffer=False, buffer_size=READ_BUFFER)
                    groups, position, offset = [], None, first
                    for g in range(reader.metadata.num_row_groups):
                        size = reader.metadata.row_group(g).num_rows
                        if offset < row_hi and offset + size > row_lo:
                            groups.append(g)
                            position = offset if position is None else position
                        offset += size
                    if not groups:
                        continue
                    for batch in reader.iter_batches(batch_size=batch_rows, row_groups=groups, columns=[self.column],
                                                     use_threads=False):
                        start, stop = max(position, row_lo), min(position + batch.num_rows, row_hi)
                        offset = position
                        position += batch.num_rows
                        if start >= stop:
                            continue
                        values = batch.column(0).slice(start - offset, stop - start)
                        ids = np.arange(start, stop, dtype=np.int64)
                        if id_of_row is not None:
                            mask = self.keep[start:stop]
                            values = values.filter(pa.array(mask))
                            ids = id_of_row[start:stop][mask]
                        yield ids, _unit(values)
            except (OSError, pa.ArrowException) as exc:
                raise OSError(f"index shard: cannot read vectors from {location.uri} ({exc})") from exc


def _unit(values: pa.Array) -> np.ndarray:
    """(n, d) float32 rows scaled to unit length (float16 storage is re-normalised after the cast)."""
    if len(values) == 0:
        return np.zeros((0, 1), np.float32)
    flat = values.flatten()
    if flat.type != pa.float32():
        flat = pc.cast(flat, pa.float32())
    x = np.array(flat.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(values), -1)  # one copy
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x /= np.where(norms > 0, norms, 1.0)
    return x


def parquet_parts(files: list[Location]) -> list[tuple[Location, int, int]]:
    """``(file, first row, rows)`` for Parquet files read in this order (row counts from footers)."""
    out, first = [], 0
    for location in files:
        with location.filesystem.open_input_file(location.path) as fh:
            rows = pq.ParquetFile(fh).metadata.num_rows
        out.append((location, first, rows))
        first += rows
    return out


def _take_rows(location: Location, column: str, rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` (sorted, file-local) of one Parquet file as unit vectors, reading only the
    row groups that hold them."""
    try:
        with location.filesystem.open_input_file(location.path) as fh:
            reader = pq.ParquetFile(fh, pre_buffer=False, buffer_size=READ_BUFFER)
            out, start = [], 0
            for g in range(reader.metadata.num_row_groups):
                size = reader.metadata.row_group(g).num_rows
                lo, hi = np.searchsorted(rows, [start, start + size])
                if hi > lo:
                    group = reader.read_row_group(g, columns=[column]).column(0)
                    out.append(_unit(group.take(pa.array(rows[lo:hi] - start)).combine_chunks()))
                start += size
    except (OSError, pa.ArrowException) as exc:
        raise OSError(f"cannot read vectors from {location.uri} ({exc})") from exc
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


def _take_rows_split(location: Location, column: str, rows: np.ndarray, lengths: np.ndarray) -> tuple:
    """:func:`_take_rows` of several groups' rows (each sorted, concatenated), split back."""
    order = np.argsort(rows, kind="stable")
    x = _take_rows(location, column, rows[order]) if len(rows) else np.zeros((0, 1), np.float32)
    back = np.empty_like(x)
    back[order] = x
    parts = tuple(np.split(back, np.cumsum(lengths)[:-1]))
    return parts if len(parts) > 1 else parts[0]


class MemoryVectors:
    """The :class:`VectorParts` interface over an in-memory ``(n, d)`` matrix of unit vectors."""

    def __init__(self, x: np.ndarray):
        self.x = np.ascontiguousarray(x, dtype=np.float32)

    @property
    def n(self) -> int:
        return len(self.x)

    @property
    def dim(self) -> int:
        return self.x.shape[1]

    def read(self, lo: int, hi: int, *, batch_rows: int = 16384) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(lo, hi, batch_rows):
            stop = min(start + batch_rows, hi)
            yield np.arange(start, stop, dtype=np.int64), self.x[start:stop]

    def read_all(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        return np.arange(lo, hi, dtype=np.int64), self.x[lo:hi]

    def ranges(self, target_rows: int) -> list[tuple[int, int]]:
        return [(lo, min(lo + target_rows, self.n)) for lo in range(0, self.n, target_rows)]

    def take(self, ids: np.ndarray, *, local: bool = False) -> np.ndarray:
        return self.x[np.asarray(ids, np.int64)]

    def take_groups(self, groups: list[np.ndarray], *, window_bytes: int = 0) -> Iterator[np.ndarray]:
        for ids in groups:
            yield self.take(ids)


CACHE_MAX_BYTES = 512 << 20  # the most vectors a CachedVectors holds on the driver


class CachedVectors:
    """A vector source that keeps the vectors of some ids in memory, read once.

    A night's new and changed items, or a phase's samples, are spread over every file: each
    :meth:`VectorParts.take` of some of them reads most of the store again. Wrapped here, their
    vectors are read once; ``take`` serves them from memory and reads only the ids it does not
    hold. Everything else goes to ``source``, and a copy sent to a Ray task (pickled) is the
    plain ``source``: the cache never travels.

    Args:
        source: the vector source.
        ids: the ids to hold (at most ``CACHE_MAX_BYTES`` of vectors; past that none are held).
    """

    def __init__(self, source, ids: np.ndarray):
        self.source = source.source if isinstance(source, CachedVectors) else source
        ids = np.unique(np.asarray(ids, np.int64))
        if len(ids) * 4 * max(self.source.dim, 1) > CACHE_MAX_BYTES:
            ids = ids[:0]
        self.ids = ids
        # Through ``source``: ids another cache already holds are not read again.
        self.x = source.take(ids) if len(ids) else np.zeros((0, self.source.dim), np.float32)

    def take(self, ids: np.ndarray, *, local: bool = False) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        if not len(self.ids):
            return self.source.take(ids, local=local)
        at = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        held = self.ids[at] == ids
        if held.all():
            return self.x[at]
        out = np.empty((len(ids), self.source.dim), np.float32)
        out[held] = self.x[at[held]]
        out[~held] = self.source.take(ids[~held], local=local)
        return out

    def __reduce__(self):
        return _plain_source, (self.source,)

    def __getattr__(self, name):
        if name.startswith("__") or name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)


def _plain_source(source):
    return source


def as_source(vectors) -> "VectorParts | MemoryVectors":
    """A vector source from a matrix or a source."""
    return MemoryVectors(vectors) if isinstance(vectors, np.ndarray) else vectors


def map_vectors(source, fn, *args, rows_per_task: int = 65536) -> list:
    """``[fn(ids, vectors, *args) for each consecutive range of ids]``, run where the vectors
    are: one Ray task per range when Ray is up (each reads its own rows from storage), in
    process otherwise. Only ``fn``'s (compact) results come back."""
    import ray

    ranges = source.ranges(rows_per_task)
    shared = ray.put(source) if ray.is_initialized() and len(ranges) > 1 else source
    return run_tasks(_apply_to_range, [(shared, lo, hi, fn, args) for lo, hi in ranges])


def _apply_to_range(source, lo: int, hi: int, fn, args: tuple):
    ids, x = source.read_all(lo, hi)
    return fn(ids, x, *args)
