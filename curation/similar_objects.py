"""``curation similar --space object``: boxes like a box, in a detection run's crop vectors.

:class:`ObjectSearch` opens a published detection run once: its ``objects/`` (the annotated
boxes that are ``ok``, in ``object_vector_id`` order: the columns a ``--where`` may name) and
its ``object-embeddings/`` parts (each stored crop's ``object_row`` says which box it is; the
background squares are skipped). A query is a box of the run (``--object ID``, its
``object_id``), searched exactly (cosine, FAISS ``IndexFlatIP`` over the ok boxes' vectors, or
over those a ``--where`` leaves); the box itself is never a hit.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from curation.index.source import VectorParts, parquet_parts
from curation.io.filesystem import Resolver
from curation.object_scores import OBJECT_FLAGS
from curation.published_run import PublishedRun
from curation.run_layout import OBJECT_EMBEDDINGS_FOLDER, OBJECTS_FOLDER
from curation.similar import SimilarError
from curation.where import where_mask

log = logging.getLogger(__name__)

OBJECT_HIT_SCHEMA = pa.schema([
    ("query", pa.string()), ("rank", pa.int32()), ("object_id", pa.string()), ("uri", pa.string()),
    ("bbox", pa.list_(pa.float64(), 4)), ("similarity", pa.float32()), ("label", pa.string()),
    ("flags", pa.list_(pa.string())),
])


class ObjectSearch:
    """A published detection run opened for box search.

    Args:
        run: a run URI, or an output URI meaning its latest published run.
        resolver: resolves ``s3://`` and local URIs (default: from the environment).
    """

    def __init__(self, run: str, *, resolver: Resolver | None = None):
        self.resolver = resolver or Resolver()
        published = PublishedRun.resolve(self.resolver.resolve(run))
        if published is None:
            raise SimilarError(f"--run {run}: no published run there (no _SUCCESS, and no latest naming one)")
        self.run = published.location
        self.run_id = published.info.run_id
        objects_folder = self.run.child(OBJECTS_FOLDER)
        if objects_folder.filesystem.get_file_info(objects_folder.path).type.name != "Directory":
            raise SimilarError(f"--space object: run {self.run_id} is not a detection run (no objects/; "
                               f"give input.annotations)")
        table = ds.dataset(objects_folder.path, filesystem=self.run.filesystem, format="parquet").to_table()
        self.rows_of_table = table
        with_vector = pc.is_valid(table["object_vector_id"]).to_numpy(zero_copy_only=False)
        boxes = table.filter(pa.array(with_vector))
        self.objects = boxes.sort_by("object_vector_id")  # row i = object vector id i
        self.flag_columns = [c for c in OBJECT_FLAGS if c in self.objects.column_names]
        self.vectors = self._open_vectors(table)
        if self.vectors.n != self.objects.num_rows:
            raise SimilarError(f"run {self.run_id}: {self.objects.num_rows} boxes with a vector but "
                               f"{self.vectors.n} stored crop vectors")
        self._index = None
        log.info("opened run %s (object space, %d boxes)", self.run_id, self.objects.num_rows)

    def _open_vectors(self, table: pa.Table) -> VectorParts:
        folder = self.run.child(OBJECT_EMBEDDINGS_FOLDER)
        infos = folder.filesystem.get_file_info(pa.fs.FileSelector(folder.path, allow_not_found=True))
        files = [folder.child(i.base_name) for i in sorted(infos, key=lambda i: i.base_name)
                 if i.base_name.startswith("part-")]
        rows = np.concatenate([pq.read_table(f.path, columns=["object_row"], filesystem=f.filesystem)[
            "object_row"].to_numpy() for f in files]) if files else np.zeros(0, np.int64)
        ok = (table["status"].to_numpy(zero_copy_only=False) == "ok") & pc.is_valid(
            table["object_vector_id"]).to_numpy(zero_copy_only=False)
        keep = np.zeros(len(rows), bool)
        real = (rows >= 0) & (rows < table.num_rows)
        keep[real] = ok[rows[real]]
        return VectorParts(parquet_parts(files), keep=keep)

    def by_object(self, object_ids: list[str], *, k: int = 20, where: str | None = None) -> pa.Table:
        """Boxes like the run's boxes ``object_ids`` (their stored crop vectors; each box itself
        excluded): one row per hit (``OBJECT_HIT_SCHEMA``)."""
        import faiss

        if k < 1:
            raise SimilarError(f"-k: expected at least 1, got {k}")
        position = {oid: i for i, oid in enumerate(self.objects["object_id"].to_pylist())}
        missing = [oid for oid in object_ids if oid not in position]
        if missing:
            raise SimilarError(f"--object {missing[0]}: not a box of run {self.run_id} with a crop vector")
        own = np.array([position[oid] for oid in object_ids], np.int64)
        allowed = np.arange(self.objects.num_rows)
        if where:
            try:
                allowed = np.flatnonzero(where_mask(self.objects.drop_columns(["segmentation"]).to_pandas(), where))
            except ValueError as exc:
                raise SimilarError(f"--where: {exc}") from None
        base = np.ascontiguousarray(self.vectors.take(allowed), np.float32)
        index = faiss.IndexFlatIP(base.shape[1] if len(base) else self.vectors.dim)
        index.add(base)
        queries = np.ascontiguousarray(self.vectors.take(own), np.float32)
        sims, local = index.search(queries, min(k + 1, len(allowed))) if len(allowed) else (
            np.zeros((len(own), 0), np.float32), np.zeros((len(own), 0), np.int64))
        rows = []
        flags = {c: self.objects[c].to_numpy(zero_copy_only=False) for c in self.flag_columns}
        for q, query in enumerate(object_ids):
            rank = 0
            for j, s in zip(local[q], sims[q]):
                i = int(allowed[j]) if j >= 0 else -1
                if i < 0 or i == own[q] or rank == k:
                    continue
                rank += 1
                rows.append({"query": query, "rank": rank, "object_id": self.objects["object_id"][i].as_py(),
                             "uri": self.objects["uri"][i].as_py(), "bbox": self.objects["bbox"][i].as_py(),
                             "similarity": float(s), "label": self.objects["label"][i].as_py(),
                             "flags": [c.removeprefix("is_") for c in self.flag_columns if flags[c][i]]})
        return pa.Table.from_pylist(rows, schema=OBJECT_HIT_SCHEMA)
