"""The embedding store: what makes nightly reruns incremental.

The vector files of every ok item embedded by the last run, keyed by ``uri`` + ``fingerprint``
(size and modification time from the listing, or a manifest's ``etag``/``fingerprint`` column)
+ the embedder's ``model_id``. The files are the run's own ``embeddings/`` parts (which carry the
decode-time statistics and hashes too), copied into the store (server-side on S3), so a reused
item skips reading, decoding and embedding entirely.

Layout (``store.uri``, default ``<output.uri>/embedding-store``)::

    <model_id + copy descriptor id, slugged>/snapshot-<run_id>/part-*.parquet
    <...>/CURRENT                    {"snapshot": "snapshot-<run_id>", "rows": N}

Each run writes a new snapshot holding exactly the current inputs' ok items (so deleted files
drop out), then replaces ``CURRENT``; a crashed run leaves the previous snapshot in use.

The driver reads only the keys of the snapshot (hashed to 8 bytes each); the stored vectors are
read by Ray Data tasks (``curation.pipeline``) and matched to the current inputs by that hash.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.io.filesystem import Location, copy_file, list_files, read_bytes, write_bytes
from curation.item_key import KEY_COLUMNS, key_hashes
from curation.schema import STATUS_OK

log = logging.getLogger(__name__)

def _slug(model_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model_id)


@dataclass
class Reuse:
    """The current inputs found in the store: where their rows are and which ``input_id`` each
    becomes. ``keys`` is sorted; ``input_ids[i]`` belongs to ``keys[i]``."""

    files: list[Location]
    keys: np.ndarray
    input_ids: np.ndarray
    model_id: str
    owners: np.ndarray | None = None  # per key, the index in ``files`` that supplies it (one file only)

    @property
    def count(self) -> int:
        return len(self.keys)


class EmbeddingStore:
    """Look up and write stored embeddings for one embedder identity.

    Args:
        location: the store root.
        model_id: the embedder identity; a different model never reuses another's vectors.
    """

    def __init__(self, location: Location, model_id: str):
        from curation.stages.decode import FEATURES_ID

        # The decode-time features are stored beside the vector: a new definition is a new store.
        self.root = location.child(_slug(f"{model_id}+{FEATURES_ID}"))
        self.model_id = model_id

    def snapshot_run(self) -> str | None:
        """The run whose vectors the current snapshot holds (None without a snapshot)."""
        try:
            snapshot = json.loads(read_bytes(self.root.child("CURRENT"))).get("snapshot") or ""
        except (FileNotFoundError, OSError, ValueError):
            return None
        return snapshot.removeprefix("snapshot-") or None

    def _snapshot_files(self) -> list[Location]:
        return current_snapshot_files(self.root)

    def lookup(self, inputs: pa.Table, *, resume: list[Location] = ()) -> tuple[np.ndarray, Reuse | None]:
        """Which ``inputs`` rows the store holds (same uri and fingerprint, no ``input_error``).

        Args:
            inputs: the listed inputs.
            resume: more vector files to reuse from: the parts an interrupted run wrote before
                it stopped (its checkpoint). Rows of another embedder are never matched.

        Returns the mask over ``inputs`` and the :class:`Reuse` that tells the pipeline how to
        fetch them (None when nothing is reused). Only the keys of the files are read here; a
        file that cannot be read (cut short by a crash) is skipped with a warning."""
        n = inputs.num_rows
        files = self._snapshot_files() + list(resume)
        if not files or "fingerprint" not in inputs.column_names:
            return np.zeros(n, bool), None
        stored, readable, owner = [], [], []
        for location in files:
            try:
                keys = []
                with location.filesystem.open_input_file(location.path) as fh:
                    parquet = pq.ParquetFile(fh)
                    wanted = list(KEY_COLUMNS) + (["model_id"] if "model_id" in parquet.schema_arrow.names else [])
                    for batch in parquet.iter_batches(columns=wanted, batch_size=65536):
                        hashes = key_hashes(batch.column(0), batch.column(1))
                        if len(wanted) == 3:  # only this embedder's rows count as stored
                            hashes = hashes[pc.equal(batch.column(2), self.model_id).to_numpy(zero_copy_only=False)]
                        keys.append(hashes)
            except (OSError, pa.ArrowException) as exc:
                log.warning("embedding store: skipping unreadable %s (%s)", location.uri, str(exc).splitlines()[0])
                continue
            stored += keys
            owner += [np.full(len(k), len(readable), np.int32) for k in keys]
            readable.append(location)
        all_keys = np.concatenate(stored) if stored else np.zeros(0, np.int64)
        # A key held by several files (the snapshot and an interrupted run's parts) is taken
        # from the first one only, so no item is fetched twice.
        stored_keys, first = np.unique(all_keys, return_index=True)
        key_owner = np.concatenate(owner)[first] if stored else np.zeros(0, np.int32)
        keys = key_hashes(inputs["uri"], inputs["fingerprint"])
        usable = (keys != 0) & ~inputs["input_error"].is_valid().to_numpy(zero_copy_only=False)
        hit = usable & np.isin(keys, stored_keys)
        if not hit.any():
            return hit, None
        order = np.argsort(keys[hit], kind="stable")
        sorted_keys = keys[hit][order]
        owners = key_owner[np.searchsorted(stored_keys, sorted_keys)]
        return hit, Reuse(readable, sorted_keys, inputs["input_id"].to_numpy()[hit][order], self.model_id, owners)

    def stage(self, vector_files: list[Location], run_id: str, rows: int) -> "StagedSnapshot":
        """Copy the run's vector files into a new snapshot (server-side on S3). ``CURRENT`` is
        not moved: :meth:`StagedSnapshot.point` does that once the run has published, so of two
        concurrent runs the store follows the one that published, not the one that lost."""
        return self.stage_into(self.root, vector_files, run_id, rows)

    @staticmethod
    def stage_into(root: Location, vector_files: list[Location], run_id: str, rows: int) -> "StagedSnapshot":
        """Copy ``vector_files`` into ``root``'s snapshot of ``run_id`` (not yet current)."""
        snapshot = f"snapshot-{run_id}"
        for location in vector_files:
            copy_file(location, root.child(snapshot, location.path.rsplit("/", 1)[-1]))
        return StagedSnapshot(root, snapshot, rows)

    def write(self, vector_files: list[Location], run_id: str, rows: int) -> int:
        """Stage the snapshot and point ``CURRENT`` at it at once. Returns the rows stored."""
        self.stage(vector_files, run_id, rows).point()
        return rows


def current_snapshot_files(root: Location) -> list[Location]:
    """The Parquet files of the snapshot ``root/CURRENT`` names (none without one, or when it
    cannot be read: everything is then embedded anew, with a warning)."""
    try:
        pointer = json.loads(read_bytes(root.child("CURRENT")))
    except (FileNotFoundError, OSError, ValueError):
        return []
    folder = root.child(pointer.get("snapshot") or "-")
    try:
        return [folder.child(info.base_name) for info in list_files(folder)
                if info.problem is None and info.path.endswith(".parquet")]
    except OSError as exc:
        log.warning("embedding store %s unreadable (%s); embedding everything", folder.uri, exc)
        return []


@dataclass(frozen=True)
class StagedSnapshot:
    """A snapshot copied into the store that ``CURRENT`` does not name yet."""

    root: Location
    snapshot: str
    rows: int
    also: tuple["StagedSnapshot", ...] = ()  # named in the same step (a detection run's crop vectors)

    def point(self) -> None:
        for other in self.also:
            other.point()
        write_bytes(self.root.child("CURRENT"), json.dumps({"snapshot": self.snapshot, "rows": self.rows}).encode())


SCHEME_AND_ROOT = r"^([a-z0-9]+://)?/*"  # what readers may spell differently in one path


def plain_path(path: str) -> str:
    return re.sub(SCHEME_AND_ROOT, "", path)


def match_stored(batch: pa.Table, *, keys: np.ndarray, input_ids: np.ndarray, model_id: str,
                 owners: np.ndarray | None = None, paths: list[str] | None = None) -> pa.Table:
    """Rows of a stored vector file that the current run reuses, with their current
    ``input_id`` (a Ray Data batch function: keys are matched by hash). With ``owners`` and
    ``paths`` (the batch then has the ``path`` column Ray Data adds), a row counts only in the
    file that owns its key."""
    hashes = key_hashes(batch["uri"], batch["fingerprint"])
    pos = np.minimum(np.searchsorted(keys, hashes), max(len(keys) - 1, 0))
    hit = (len(keys) > 0) & (keys[pos] == hashes) & (hashes != 0)
    if owners is not None and paths is not None and "path" in batch.column_names:
        # Matched by path, spelled without a scheme or a leading slash (readers may differ there).
        names = pa.array([plain_path(p) for p in paths])
        batch_names = pc.replace_substring_regex(batch["path"], pattern=SCHEME_AND_ROOT, replacement="")
        file_index = pc.index_in(batch_names, value_set=names).to_numpy(zero_copy_only=False)
        file_index = np.asarray(file_index, np.float64)
        hit &= owners[pos] == np.where(np.isfinite(file_index), file_index, -1)
    if "path" in batch.column_names:
        batch = batch.drop_columns(["path"])
    if "model_id" in batch.column_names:
        hit &= pc.equal(batch["model_id"], model_id).to_numpy(zero_copy_only=False)
    rows = batch.filter(pa.array(hit))
    ids = pa.array(input_ids[pos[hit]], pa.int64())
    if "input_id" in rows.column_names:
        rows = rows.set_column(rows.column_names.index("input_id"), "input_id", ids)
    else:  # a snapshot written before vector files carried input_id
        rows = rows.append_column("input_id", ids)
    emb = rows["embedding"]
    if emb.type.value_type != pa.float32():
        emb = pc.cast(emb, pa.list_(pa.float32(), emb.type.list_size))
        rows = rows.set_column(rows.column_names.index("embedding"), "embedding", emb)
    rows = rows.drop_columns([c for c in ("model_id",) if c in rows.column_names])
    n = rows.num_rows
    rows = rows.append_column("status", pa.array([STATUS_OK] * n, pa.string()))
    return rows.append_column("reason", pa.nulls(n, pa.string()))
