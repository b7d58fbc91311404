"""``curation similar``: images like these, searched in a published run's saved vectors.

:class:`RunSearch` opens a run once (for a notebook, or the command's one call): its ``samples``
(the columns a ``--where`` may name, the label and the flags), and the search structure of one
space:

* ``embedding``: the run's embeddings; ``copy``: its copy descriptors (images-mode runs only;
  an ``input.embeddings`` run has no pixels, so no copy space).
* The run's saved FAISS shards (``index/`` or ``index-copies/``, the sharded path) are loaded
  and searched with the run's own ``nprobe`` and refine factor; a run that found its
  neighbours exactly (no saved shards) is searched exactly over its stored vectors.
* Vectors are read from the files ``run.json`` names (``knn.vectors``) and mapped to items by
  ``samples.vector_id``; no folder is listed.

Queries are items of the run (``--uri``: their stored vector; the item itself is never a hit)
or image files (``--image``: decoded and embedded as the run did, with its recorded embedder;
a run whose ``model_id`` this install cannot reproduce is an error naming both ids). For an
item of the run the first ``knn.k`` hits are the run's own search, so they equal its ``knn/``
row. ``--where`` (the selections' safe checker) filters before the search: ``k`` hits come
back when that many items pass the filter.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pyarrow.dataset as ds

from curation.embedder_check import EmbedderError
from curation.io.filesystem import Location, Resolver, write_bytes_atomic
from curation.published_run import PublishedRun, shard_file
from curation.run_info import KnnRecord
from curation.schema import is_ok
from curation.scores import boolean_flag_columns
from curation.index.source import VectorParts, parquet_parts
from curation.index.shard import load_index, merge_shard_results
from curation.where import where_mask
from curation.stages.query import QueryImageError, embed_images
from curation.index.knn import drop_self

log = logging.getLogger(__name__)

SPACES = ("embedding", "copy")
EXACT_FILTER_MAX = 2_000_000  # a filter that leaves at most this many items is searched exactly over them
HIT_COLUMNS = ("query", "rank", "uri", "similarity", "label", "flags")


class SimilarError(ValueError):
    """The search cannot run as asked; the message names the run, option or image."""


class RunSearch:
    """A published run opened for similarity search.

    Args:
        run: a run URI, or an output URI meaning its latest published run.
        space: ``embedding`` or ``copy``.
        resolver: resolves ``s3://`` and local URIs (default: from the environment).

    Attributes:
        info: the run's ``run.json``.
        load_s: seconds the opening took (samples, vectors or index shards).
    """

    def __init__(self, run: str, *, space: str = "embedding", resolver: Resolver | None = None):
        t = time.perf_counter()
        if space not in SPACES:
            raise SimilarError(f"--space: expected {' | '.join(SPACES)}, got {space!r}")
        self.resolver = resolver or Resolver()
        published = PublishedRun.resolve(self.resolver.resolve(run))
        if published is None:
            raise SimilarError(f"--run {run}: no published run there (no _SUCCESS, and no latest naming one)")
        self.run = published.location
        self.published = published
        self.info = published.info
        self.space = space
        knn = self.info.knn if space == "embedding" else self.info.knn.copies
        if space == "copy" and (knn is None or knn.vectors is None):
            raise SimilarError(f"--space copy: run {self.info.run_id} has no copy descriptors "
                               f"(an input.embeddings run has no pixels); use --space embedding")
        if knn.vectors is None:
            raise SimilarError(f"run {self.info.run_id} does not say where its vectors are (run.json knn.vectors): "
                               f"it was made by an older version; rerun it to search it")
        self.k_run = self.info.knn.k
        # The run searched k neighbours and its margin (knn.incremental: auto keeps k/2 more).
        incremental = self.info.knn.incremental
        self.k_searched = self.k_run + (incremental.margin if incremental is not None else 0)
        self._read_samples()
        self._open_vectors(knn)
        self._open_index(knn)
        self.load_s = time.perf_counter() - t
        log.info("opened run %s (%s space, %d vectors, %s) in %.1fs", self.info.run_id, space, self.n,
                 self.method, self.load_s)

    # ------------------------------------------------------------------------------ opening

    def _read_samples(self) -> None:
        dataset = ds.dataset(self.run.child("samples").path, filesystem=self.run.filesystem, format="parquet")
        table = dataset.to_table()
        ok = is_ok(table["status"])
        table = table.filter(pa.array(ok))
        order = np.argsort(table["vector_id"].to_numpy(zero_copy_only=False), kind="stable")
        self.samples = table.take(pa.array(order))  # row i = vector id i
        self.flag_columns = [c for c in boolean_flag_columns() if c in self.samples.column_names]
        self._row_of_uri = None
        self._frame = None

    def _open_vectors(self, knn: KnnRecord) -> None:
        vectors = knn.vectors
        files = [self.resolver.resolve(uri) for uri in vectors.files]
        try:
            parts = parquet_parts(files)
        except OSError as exc:
            raise SimilarError(f"run {self.info.run_id}: cannot read its vectors ({exc})") from None
        keep = None
        if vectors.skips_rejected_rows:  # input.embeddings files: rejected rows hold no id
            every = pq.read_table(self.run.child("samples").path, filesystem=self.run.filesystem,
                                  columns=["input_id", "vector_id"]).sort_by("input_id")
            keep = pc.is_valid(every["vector_id"]).to_numpy(zero_copy_only=False)
        self.vectors = VectorParts(parts, column=vectors.column, keep=keep)
        self.n = self.vectors.n
        if self.n != self.samples.num_rows:
            raise SimilarError(f"run {self.info.run_id}: {self.samples.num_rows} ok items but {self.n} vectors")

    def _open_index(self, knn: KnnRecord) -> None:
        import faiss

        self.shards: list = []
        self.exact = None
        self._holds_vectors = False  # whether the shards give back the stored vectors exactly
        saved, shards = knn.saved_to, knn.shards
        if saved and shards:
            sizes = knn.shard_sizes
            self._bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64) if sizes else None
            self._holds_vectors = self._bounds is not None and knn.codec in ("flat", "pq-fastscan")
            folder = self.resolver.resolve(saved)
            refine = float(self.published.config.knn.refine_factor)
            for i in range(shards):
                index = load_index(shard_file(folder, i))
                if isinstance(index, faiss.IndexRefine):
                    index.k_factor = refine
                ivf = index.base_index if isinstance(index, faiss.IndexRefine) else index
                try:
                    lists = faiss.extract_index_ivf(ivf)
                    lists.nprobe = knn.nprobe or 1
                    if self._holds_vectors and isinstance(index, faiss.IndexIVF):
                        lists.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct by id
                except RuntimeError:
                    pass  # a flat shard has no lists
                self.shards.append(index)
            self.method = f"{shards} saved index shard(s) from {folder.uri}"
        else:
            _, x = self.vectors.read_all(0, self.n)
            self.exact = faiss.IndexFlatIP(x.shape[1])
            self.exact.add(x)
            self.method = "exact search over the stored vectors"

    # ------------------------------------------------------------------------------ queries

    def vector_ids_of(self, uris: list[str]) -> np.ndarray:
        """Vector ids of items of the run; :class:`SimilarError` naming an unknown or rejected uri."""
        if self._row_of_uri is None:
            self._row_of_uri = {uri: i for i, uri in enumerate(self.samples["uri"].to_pylist())}
        missing = [uri for uri in uris if uri not in self._row_of_uri]
        if missing:
            raise SimilarError(f"--uri {missing[0]}: not an ok item of run {self.info.run_id}")
        return np.array([self._row_of_uri[uri] for uri in uris], np.int64)

    def allowed(self, where: str | None) -> np.ndarray | None:
        """Vector ids that pass ``where`` (None: no filter)."""
        if not where:
            return None

        if self._frame is None:
            self._frame = self.samples.drop_columns([c for c in ("embedding",) if c in self.samples.column_names])
            self._frame = self._frame.to_pandas()
        try:
            return np.flatnonzero(where_mask(self._frame, where))
        except ValueError as exc:
            raise SimilarError(f"--where: {exc}") from None

    def by_uri(self, uris: list[str], *, k: int = 20, where: str | None = None) -> pa.Table:
        """Hits for items of the run, by their stored vectors (the item itself excluded)."""
        ids = self.vector_ids_of(uris)
        return self._hits(uris, self.stored_vectors(ids), k, where, own=ids)

    def stored_vectors(self, ids: np.ndarray) -> np.ndarray:
        """The vectors the run stored for ``ids``: from the loaded index when it holds them
        exactly (no read from storage per query), else read from the vector files."""
        ids = np.asarray(ids, np.int64)
        if self.exact is not None:
            return self.exact.reconstruct_batch(ids)
        if self._holds_vectors:
            shard = np.searchsorted(self._bounds, ids, side="right") - 1
            out = np.empty((len(ids), self.vectors.dim), np.float32)
            for j, (s, i) in enumerate(zip(shard, ids)):
                out[j] = self.shards[s].reconstruct(int(i))
            return out
        return self.vectors.take(ids)

    def by_image(self, images: list[str], *, k: int = 20, where: str | None = None) -> pa.Table:
        """Hits for image files (local paths or URIs), embedded as the run embedded its items."""
        try:
            vectors = embed_images(images, self.info, space=self.space, resolver=self.resolver)
        except (QueryImageError, EmbedderError) as exc:
            raise SimilarError(str(exc)) from None
        return self._hits(images, vectors, k, where, own=None)

    def _hits(self, queries: list[str], x: np.ndarray, k: int, where: str | None,
              own: np.ndarray | None) -> pa.Table:
        if k < 1:
            raise SimilarError(f"-k: expected at least 1, got {k}")
        allowed = self.allowed(where)
        sims, ids = self.search(x, k, allowed=allowed, own=own)
        rows = []
        uris = self.samples["uri"]
        labels = self.samples["label"]
        flags = {c: self.samples[c].to_numpy(zero_copy_only=False) for c in self.flag_columns}
        for q, query in enumerate(queries):
            for rank, (i, s) in enumerate(zip(ids[q], sims[q]), start=1):
                if i < 0:
                    break
                rows.append({"query": query, "rank": rank, "uri": uris[int(i)].as_py(), "similarity": float(s),
                             "label": labels[int(i)].as_py(),
                             "flags": [c.removeprefix("is_") for c in self.flag_columns if flags[c][i]]})
        schema = pa.schema([("query", pa.string()), ("rank", pa.int32()), ("uri", pa.string()),
                            ("similarity", pa.float32()), ("label", pa.string()), ("flags", pa.list_(pa.string()))])
        return pa.Table.from_pylist(rows, schema=schema)

    def search(self, x: np.ndarray, k: int, *, allowed: np.ndarray | None = None,
               own: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` ``(similarities, vector ids)`` of each row of ``x``, ``own[i]`` excluded
        from row i, only ``allowed`` ids when given."""
        x = np.ascontiguousarray(x, np.float32)
        extra = 0 if own is None else 1
        if allowed is not None:
            sims, ids = self._search_filtered(x, k + extra, allowed)
        else:
            sims, ids = self._search_all(x, k + extra)
            if own is not None and self.exact is None and 0 < self.k_run and k != self.k_searched:
                # The first knn.k hits are the run's own search, as wide as it was (another k
                # lets the approximate index refine other candidates, which could reorder them).
                head_s, head_i = self._search_all(x, self.k_searched + 1)
                head_s, head_i = drop_self(head_s, head_i, own, self.k_run)
                tail_s, tail_i = drop_self(sims, ids, own, k)
                return _merge_head(head_s, head_i, tail_s, tail_i, k)
        if own is None:
            return sims[:, :k], ids[:, :k]
        return drop_self(sims, ids, own, k)

    def _search_all(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.n)
        if self.exact is not None:
            return self.exact.search(x, k)
        results = []
        for index in self.shards:
            sims, ids = index.search(x, k)
            results.append((np.where(ids >= 0, sims, -np.inf).astype(np.float32), ids))
        return merge_shard_results(results)

    def _search_filtered(self, x: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Only the allowed items (the filter applies before the search, so every query gets
        ``k`` hits when that many pass). IVF shards are searched with an id selector and as
        many more lists as the filter is selective; a query that still comes back short, and
        every other index, is answered exactly over the allowed items (kept for the next query
        with the same filter); a filter that leaves more than :data:`EXACT_FILTER_MAX` items
        uses the exact index with an id selector."""
        import faiss

        if len(allowed) == 0:
            return np.full((len(x), 0), -np.inf, np.float32), np.full((len(x), 0), -1, np.int64)
        k = min(k, len(allowed))
        if self.shards and all(isinstance(index, faiss.IndexIVF) for index in self.shards):
            selector = faiss.IDSelectorBatch(allowed.astype(np.int64))
            results = []
            for index in self.shards:
                nprobe = int(min(index.nlist, np.ceil(index.nprobe * self.n / len(allowed))))
                sims, ids = index.search(x, k, params=faiss.SearchParametersIVF(sel=selector, nprobe=nprobe))
                results.append((np.where(ids >= 0, sims, -np.inf).astype(np.float32), ids))
            sims, ids = merge_shard_results(results)
            if (ids[:, k - 1] >= 0).all():
                return sims, ids
        if len(allowed) <= EXACT_FILTER_MAX:
            key = (len(allowed), int(allowed[:16].sum()), int(allowed[-16:].sum()))
            if getattr(self, "_filtered_key", None) != key:
                base = self.stored_vectors(allowed)
                self._filtered = faiss.IndexFlatIP(base.shape[1])
                self._filtered.add(np.ascontiguousarray(base, np.float32))
                self._filtered_key = key
            sims, local = self._filtered.search(x, k)
            return sims, np.where(local >= 0, allowed[np.maximum(local, 0)], -1)
        selector = faiss.IDSelectorBatch(allowed.astype(np.int64))
        params = faiss.SearchParameters(sel=selector)
        if self.exact is not None:
            return self.exact.search(x, k, params=params)
        raise SimilarError(f"--where leaves {len(allowed)} items: more than {EXACT_FILTER_MAX} filtered items "
                           f"can only be searched in a run that found its neighbours exactly")


def _merge_head(head_s, head_i, tail_s, tail_i, k):
    """The run's own top ``knn.k``, then the larger search's further hits (no repeats)."""
    out_s = np.full((len(head_i), k), -np.inf, np.float32)
    out_i = np.full((len(head_i), k), -1, np.int64)
    for q in range(len(head_i)):
        first = [(s, i) for s, i in zip(head_s[q], head_i[q]) if i >= 0]
        seen = {int(i) for _, i in first}
        rest = [(s, i) for s, i in zip(tail_s[q], tail_i[q]) if i >= 0 and int(i) not in seen]
        merged = (first + rest)[:k]
        for j, (s, i) in enumerate(merged):
            out_s[q, j], out_i[q, j] = s, i
    return out_s, out_i


def similar(*, run: str, images: list[str] | None = None, uris: list[str] | None = None, k: int = 20,
            space: str = "embedding", where: str | None = None, resolver: Resolver | None = None) -> pa.Table:
    """Images like ``images`` (files) or ``uris`` (items of the run): one row per hit
    (``query, rank, uri, similarity, label, flags``). Opens the run for this one call; keep a
    :class:`RunSearch` to ask many questions of one run."""
    if bool(images) == bool(uris):
        raise SimilarError("give either --image or --uri (one or more of one kind)")
    search = RunSearch(run, space=space, resolver=resolver)
    return search.by_image(list(images), k=k, where=where) if images else search.by_uri(list(uris), k=k, where=where)


def format_hits(table: pa.Table, *, width: int = 60) -> str:
    """The hits as a text table: rank, uri, similarity, label, flags (one block per query)."""
    lines = []
    for query in dict.fromkeys(table["query"].to_pylist()):
        lines.append(f"like {query}:")
        lines.append(f"  {'rank':>4}  {'similarity':>10}  {'label':<12}  {'uri':<{width}}  flags")
        for row in table.filter(pc.equal(table["query"], query)).to_pylist():
            uri = row["uri"] if len(row["uri"]) <= width else "…" + row["uri"][-(width - 1):]
            lines.append(f"  {row['rank']:>4}  {row['similarity']:>10.4f}  {str(row['label'] or '-'):<12}  "
                         f"{uri:<{width}}  {', '.join(row['flags']) or '-'}")
    return "\n".join(lines) if lines else "no hits"


def write_hits(table: pa.Table, location: Location) -> None:
    """The hits as one Parquet file, written whole or not at all (a temporary name renamed)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes_atomic(location, sink.getvalue().to_pybytes())
