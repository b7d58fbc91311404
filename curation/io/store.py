"""The embedding store: what makes nightly reruns incremental.

A Parquet dataset of every ok item ever embedded, keyed by ``uri`` + ``fingerprint`` (size and
modification time from the listing, or a manifest's ``etag``/``fingerprint`` column) + the
embedder's ``model_id``. It holds the decode-time statistics too, so a reused item skips
reading, decoding and embedding entirely.

Layout (``store.uri``, default ``<output.uri>/embedding-store``)::

    <model_id slug>/snapshot-<run_id>/part-00000.parquet
    <model_id slug>/CURRENT          {"snapshot": "snapshot-<run_id>", "rows": N}

Each run writes a new snapshot holding exactly the current inputs' ok items (so deleted files
drop out), then replaces ``CURRENT``; a crashed run leaves the previous snapshot in use.
"""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.io.filesystem import Location, read_bytes, write_bytes
from curation.io.outputs import write_parquet_parts

log = logging.getLogger(__name__)

# What a reused row carries besides its key: the decode outputs and the embedding.
STORED_COLUMNS = ("width", "height", "brightness", "contrast", "sharpness", "content_hash", "pixel_hash",
                  "phash", "embedding")
KEY_COLUMNS = ("uri", "fingerprint")
ROWS_PER_FILE = 250_000


def _slug(model_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model_id)


class EmbeddingStore:
    """Look up and write stored embeddings for one embedder identity.

    Args:
        location: the store root.
        model_id: the embedder identity; a different model never reuses another's vectors.
    """

    def __init__(self, location: Location, model_id: str):
        self.root = location.child(_slug(model_id))
        self.model_id = model_id

    def _current(self) -> str | None:
        try:
            pointer = json.loads(read_bytes(self.root.child("CURRENT")))
        except (FileNotFoundError, OSError, ValueError):
            return None
        return pointer.get("snapshot")

    def load(self) -> pa.Table | None:
        """The current snapshot, or None when there is none."""
        snapshot = self._current()
        if not snapshot:
            return None
        folder = self.root.child(snapshot)
        try:
            table = pq.read_table(folder.path, filesystem=folder.filesystem)
        except (OSError, pa.ArrowException) as exc:
            log.warning("embedding store %s unreadable (%s); embedding everything", folder.uri, exc)
            return None
        return table.filter(pc.equal(table["model_id"], self.model_id))

    def split(self, inputs: pa.Table) -> tuple[pa.Table, pa.Table]:
        """Split ``inputs`` into (reused rows with their stored columns, rows still to embed).

        An input is reused when its ``(uri, fingerprint)`` is in the store and it has no
        ``input_error``. Reused rows come back as sample rows (``status='ok'``).
        """
        stored = self.load()
        n = inputs.num_rows
        if stored is None or stored.num_rows == 0 or "fingerprint" not in inputs.column_names:
            return inputs.slice(0, 0), inputs
        index = {(u, f): i for i, (u, f) in enumerate(zip(stored["uri"].to_pylist(), stored["fingerprint"].to_pylist()))}
        errors = inputs["input_error"].to_pylist()
        take_inputs, take_stored = [], []
        for i, (u, f, err) in enumerate(zip(inputs["uri"].to_pylist(), inputs["fingerprint"].to_pylist(), errors)):
            j = index.get((u, f)) if f is not None and err is None else None
            if j is not None:
                take_inputs.append(i)
                take_stored.append(j)
        hit = np.zeros(n, bool)
        hit[take_inputs] = True
        reused = inputs.take(pa.array(take_inputs, pa.int64()))
        rows = stored.take(pa.array(take_stored, pa.int64()))
        reused = reused.append_column("status", pa.array(["ok"] * len(take_inputs), pa.string()))
        reused = reused.append_column("reason", pa.nulls(len(take_inputs), pa.string()))
        for name in STORED_COLUMNS:
            reused = reused.append_column(name, rows[name])
        return reused, inputs.filter(pa.array(~hit))

    def write(self, samples: pa.Table, run_id: str) -> int:
        """Write a new snapshot with the ok rows of ``samples`` (which carry ``embedding``)."""
        ok = samples.filter(pc.and_(pc.equal(samples["status"], "ok"), pc.is_valid(samples["fingerprint"])))
        columns = {name: ok[name] for name in KEY_COLUMNS + STORED_COLUMNS}
        columns["model_id"] = pa.array([self.model_id] * ok.num_rows, pa.string())
        table = pa.table(columns)
        snapshot = f"snapshot-{run_id}"
        write_parquet_parts(self.root.child(snapshot), table, ROWS_PER_FILE)
        write_bytes(self.root.child("CURRENT"), json.dumps({"snapshot": snapshot, "rows": table.num_rows}).encode())
        return table.num_rows
