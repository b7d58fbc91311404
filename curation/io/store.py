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
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.io.filesystem import Location, copy_file, list_files, read_bytes, write_bytes
from curation.schema import STATUS_OK

log = logging.getLogger(__name__)

KEY_COLUMNS = ("uri", "fingerprint")


def _slug(model_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model_id)


def key_hashes(uri, fingerprint) -> np.ndarray:
    """Stable 64-bit hashes of ``(uri, fingerprint)`` (pandas' keyed SipHash: the same in every
    process). Arrow or numpy columns in; rows without a fingerprint hash to 0 (never reused)."""
    uri = pa.array(uri) if not isinstance(uri, (pa.Array, pa.ChunkedArray)) else uri
    fingerprint = pa.array(fingerprint) if not isinstance(fingerprint, (pa.Array, pa.ChunkedArray)) else fingerprint
    keys = pc.binary_join_element_wise(uri.cast(pa.string()), fingerprint.cast(pa.string()), "\x00")
    values = keys.to_numpy(zero_copy_only=False)
    valid = ~pd.isna(values)
    out = np.zeros(len(values), np.uint64)
    if valid.any():
        out[valid] = pd.util.hash_array(values[valid].astype(object), categorize=False)
    return out.view(np.int64)


@dataclass
class Reuse:
    """The current inputs found in the store: where their rows are and which ``input_id`` each
    becomes. ``keys`` is sorted; ``input_ids[i]`` belongs to ``keys[i]``."""

    files: list[Location]
    keys: np.ndarray
    input_ids: np.ndarray
    model_id: str

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
        from curation.stages.decode import COPY_DESCRIPTOR_ID

        # The copy descriptor is stored beside the vector: a new descriptor is a new store.
        self.root = location.child(_slug(f"{model_id}+{COPY_DESCRIPTOR_ID}"))
        self.model_id = model_id

    def _snapshot_files(self) -> list[Location]:
        try:
            pointer = json.loads(read_bytes(self.root.child("CURRENT")))
        except (FileNotFoundError, OSError, ValueError):
            return []
        folder = self.root.child(pointer.get("snapshot") or "-")
        try:
            return [folder.child(info.base_name) for info in list_files(folder) if info.path.endswith(".parquet")]
        except OSError as exc:
            log.warning("embedding store %s unreadable (%s); embedding everything", folder.uri, exc)
            return []

    def lookup(self, inputs: pa.Table) -> tuple[np.ndarray, Reuse | None]:
        """Which ``inputs`` rows the store holds (same uri and fingerprint, no ``input_error``).

        Returns the mask over ``inputs`` and the :class:`Reuse` that tells the pipeline how to
        fetch them (None when nothing is reused). Only the keys of the store are read here."""
        n = inputs.num_rows
        files = self._snapshot_files()
        if not files or "fingerprint" not in inputs.column_names:
            return np.zeros(n, bool), None
        stored = []
        try:
            for location in files:
                with location.filesystem.open_input_file(location.path) as fh:
                    for batch in pq.ParquetFile(fh).iter_batches(columns=list(KEY_COLUMNS), batch_size=65536):
                        stored.append(key_hashes(batch.column(0), batch.column(1)))
        except (OSError, pa.ArrowException) as exc:
            log.warning("embedding store %s unreadable (%s); embedding everything", self.root.uri, exc)
            return np.zeros(n, bool), None
        stored_keys = np.unique(np.concatenate(stored)) if stored else np.zeros(0, np.int64)
        keys = key_hashes(inputs["uri"], inputs["fingerprint"])
        usable = (keys != 0) & ~inputs["input_error"].is_valid().to_numpy(zero_copy_only=False)
        hit = usable & np.isin(keys, stored_keys)
        if not hit.any():
            return hit, None
        order = np.argsort(keys[hit], kind="stable")
        return hit, Reuse(files, keys[hit][order], inputs["input_id"].to_numpy()[hit][order], self.model_id)

    def write(self, vector_files: list[Location], run_id: str, rows: int) -> int:
        """Make the run's vector files the new snapshot (copied, server-side on S3), then
        point ``CURRENT`` at it. Returns the rows stored."""
        snapshot = f"snapshot-{run_id}"
        for location in vector_files:
            copy_file(location, self.root.child(snapshot, location.path.rsplit("/", 1)[-1]))
        write_bytes(self.root.child("CURRENT"), json.dumps({"snapshot": snapshot, "rows": rows}).encode())
        return rows


def match_stored(batch: pa.Table, *, keys: np.ndarray, input_ids: np.ndarray, model_id: str) -> pa.Table:
    """Rows of a stored vector file that the current run reuses, with their current
    ``input_id`` (a Ray Data batch function: keys are matched by hash)."""
    hashes = key_hashes(batch["uri"], batch["fingerprint"])
    pos = np.minimum(np.searchsorted(keys, hashes), max(len(keys) - 1, 0))
    hit = (len(keys) > 0) & (keys[pos] == hashes) & (hashes != 0)
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
