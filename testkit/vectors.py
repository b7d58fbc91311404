"""Vectors in storage from an in-memory table, for tests and benchmarks (the job writes its
``embeddings/`` through the embeddings datasink on the workers: ``curation.pipeline``)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from curation.io.filesystem import Location
from curation.io.outputs import write_vector_part


def write_embeddings(folder: Location, samples: pa.Table, *, model_id: str, store_dtype: str) -> list[Location]:
    """``embeddings/`` parts of ``samples`` (rows with ``input_id``, ``status``, ``embedding``)
    written as the job writes them. Returns the files, in vector order."""
    part = write_vector_part(folder, samples, model_id=model_id, store_dtype=store_dtype)
    names = sorted(set(pc.drop_null(part["vector_file"]).to_pylist()))
    return [folder.child(name) for name in names]
