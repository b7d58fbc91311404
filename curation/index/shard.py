"""One shard of a FAISS index: a plain class that the pipeline wraps as a Ray actor.

The trained, empty index arrives serialised or as its location in storage (trained once, in
a Ray task); the shard adds its
partition of the vectors with their global ids and answers top-k searches. Results from all
shards are merged with ``faiss.merge_knn_results``.
"""

from __future__ import annotations
import resource

import faiss
import numpy as np


class IndexShard:
    """Args:
        index_bytes: ``faiss.serialize_index`` of the trained empty index, or the
            :class:`~curation.io.filesystem.Location` it was written to (what a run passes, so
            that a restarted shard reads it from storage).
        nprobe: lists probed per query (IVF only).
        num_threads: OpenMP threads (match the actor's CPU reservation).
        partition: ``(source, lo, hi, batch_rows)``: fill the index with ids ``[lo, hi)`` of
            ``source`` here, in the constructor, so that an actor Ray restarts after its process
            died rebuilds its partition from storage by itself.
        renumber: when ``index_bytes`` is a previous run's filled shard, every id it holds
            becomes ``renumber[id]`` (those mapped to -1, the deleted and changed items, are
            removed) ...
        added: ... and ids ``added`` of ``source`` are added (``added_vectors`` when the caller
            has them, else read from ``source``).
    """

    # An actor's constructor arguments are what Ray replays to rebuild it after a restart: they
    # stay explicit (10), each a description passed by value.
    def __init__(self, index_bytes: np.ndarray, *, nprobe: int = 0, num_threads: int = 1, use_gpu: bool = False,
                 refine_factor: int = 16, partition: tuple[int, int, int] | None = None, source=None,
                 renumber: np.ndarray | None = None, added: np.ndarray | None = None,
                 added_vectors: np.ndarray | None = None):
        faiss.omp_set_num_threads(max(1, num_threads))
        if hasattr(index_bytes, "filesystem"):
            index = load_index(index_bytes)
        else:
            index = faiss.deserialize_index(np.asarray(index_bytes, dtype=np.uint8))
        if isinstance(index, faiss.IndexRefine):
            index.k_factor = float(refine_factor)
            use_gpu = False  # the fast-scan codes and the refine step run on CPU
        self.gpu = None
        if use_gpu and gpu_available():
            # GPU FAISS (faiss-gpu builds only): the same index, searched on the actor's GPU.
            self.gpu = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self.gpu, 0, index)
        self.is_ivf = isinstance(index, faiss.IndexIVF) or "IVF" in type(index).__name__
        # What holds the probed-list count: the IVF index itself, or the one a refine step wraps.
        self.lists = index.base_index if isinstance(index, faiss.IndexRefine) else index
        try:
            faiss.extract_index_ivf(self.lists)
        except RuntimeError:  # no lists (flat), unless a GPU IVF index, which is not a CPU IndexIVF
            self.lists = self.lists if "IVF" in type(self.lists).__name__ else None
        self.index = index if self.is_ivf else faiss.IndexIDMap2(index)
        self.nprobe = 0
        self.set_nprobe(nprobe)
        if partition is not None:  # (lo, hi, batch_rows) of ``source``: see add_from
            self.add_from(source, *partition)
        if renumber is not None:
            self.renumber(renumber)
        if added is not None and added_vectors is not None:
            self.add(np.asarray(added, np.int64), added_vectors)
        elif added is not None:
            batch_rows = partition[2] if partition is not None else 16384
            for start in range(0, len(added), batch_rows):
                ids = np.asarray(added[start:start + batch_rows], np.int64)
                self.add(ids, source.take(ids, local=True))

    def renumber(self, new_id_of: np.ndarray) -> int:
        """Rewrite every stored id in place (an IVF index's inverted lists) as ``new_id_of[id]``
        and remove those that map to -1. Returns the vectors removed."""
        ivf = faiss.extract_index_ivf(self.index)
        lists = ivf.invlists
        for number in range(ivf.nlist):
            size = lists.list_size(number)
            if size:
                ids = faiss.rev_swig_ptr(lists.get_ids(number), size)  # the list's own storage
                inside = (ids >= 0) & (ids < len(new_id_of))
                ids[:] = np.where(inside, new_id_of[np.where(inside, ids, 0)], -1)
        return int(self.index.remove_ids(faiss.IDSelectorRange(-1, 0)))

    def size(self) -> int:
        """Vectors held (a rebuilt shard must hold its whole partition again)."""
        return int(self.index.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> int:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
        return int(self.index.ntotal)

    def add_from(self, source, lo: int, hi: int, batch_rows: int) -> int:
        """Stream ids ``[lo, hi)`` of a :class:`curation.index.source.VectorParts` from storage
        into the index, ``batch_rows`` at a time. Returns the vectors now held."""
        for ids, vectors in source.read(lo, hi, batch_rows=batch_rows):
            self.add(ids, vectors)
        return int(self.index.ntotal)

    def set_nprobe(self, nprobe: int) -> None:
        """Lists probed per query from now on (IVF only; 0 keeps the current number)."""
        if not nprobe or nprobe == self.nprobe or self.lists is None:
            return
        try:
            faiss.extract_index_ivf(self.lists).nprobe = int(nprobe)
        except RuntimeError:  # a GPU IVF index is not a CPU IndexIVF; it has its own nprobe
            self.lists.nprobe = int(nprobe)
        self.nprobe = int(nprobe)

    def search(self, queries: np.ndarray, k: int, nprobe: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (similarities, global ids); missing results are (-inf, -1). ``nprobe``: lists
        probed (IVF), given with every call so that a restarted shard searches as the others do."""
        self.set_nprobe(nprobe)
        sims, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        sims = np.where(ids >= 0, sims, -np.inf).astype(np.float32)
        return sims, ids

    def can_scan(self) -> bool:
        """Whether :meth:`scan` can read this shard's stored vectors (IVF Flat on CPU)."""
        if self.lists is None or self.gpu is not None:
            return False
        ivf = faiss.extract_index_ivf(self.lists)
        return ivf.code_size == 4 * ivf.d

    def scan(self, queries: np.ndarray, k: int, nprobe: int = 0, query_ids: np.ndarray | None = None,
             is_new: np.ndarray | None = None, threshold: np.ndarray | None = None,
             open_rows: np.ndarray | None = None, chunk: int = 32768) -> tuple[tuple[np.ndarray, np.ndarray], tuple | None]:
        """The search of ``queries`` in both directions, one matrix product per probed list.

        FAISS's search keeps each query's own top k of the items it scores. A nightly update
        also needs the other direction: the stored items a new item is closer to than their
        own last neighbour. A near new item is often not in its neighbour's top k
        (high-dimensional embeddings are full of such one-way pairs: on ``thumbnail`` vectors a
        new item's 30-wide list held 59% of the old items it enters). Here every pair the
        search scores -- each query against every item in the lists it probes -- is scored
        once, as a product of the list's stored vectors with its queries, and serves both.

        Args:
            queries: ``(m, d)`` float32.
            k: neighbours per query (as :meth:`search`; the query's own id may be among them).
            nprobe: lists probed (0: the shard's).
            query_ids, is_new, threshold, open_rows: the reverse direction (with
                ``threshold``): for the queries with ``is_new``, also every stored item of an
                open row (``open_rows[id]``) whose ``threshold[id]`` the pair beats.

        Returns:
            ``((sims, ids), (rows, candidates, sims) or None)``; the first as :meth:`search`
            returns it (the same neighbours, up to ties).
        """
        ivf = faiss.extract_index_ivf(self.lists)
        d = ivf.d
        nprobe = max(1, min(nprobe or self.nprobe or ivf.nprobe, ivf.nlist))
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        m = len(queries)
        out_sims = np.full((m, k), -np.inf, np.float32)
        out_ids = np.full((m, k), -1, np.int64)
        rev_rows, rev_cands, rev_sims = [], [], []
        reverse = threshold is not None
        for lo in range(0, m, chunk):
            block = queries[lo:lo + chunk]
            _, probed = ivf.quantizer.search(block, nprobe)
            flat = probed.ravel()
            order = np.argsort(flat, kind="stable")
            who = order // nprobe  # the queries probing each list, lists in order
            starts = np.searchsorted(flat[order], np.arange(ivf.nlist + 1))
            if reverse:
                block_new = np.asarray(is_new[lo:lo + chunk], bool)
            heap = faiss.ResultHeap(len(block), k, keep_max=True)  # FAISS's own top-k heaps
            for number in np.flatnonzero(np.diff(starts)):
                size = ivf.invlists.list_size(int(number))
                if not size:
                    continue
                ids = faiss.rev_swig_ptr(ivf.invlists.get_ids(int(number)), size)
                stored = faiss.rev_swig_ptr(ivf.invlists.get_codes(int(number)), size * 4 * d).view(np.float32)
                members = who[starts[number]:starts[number + 1]]
                scores = block[members] @ stored.reshape(size, d).T  # (queries of this list, size)
                heap.add_result_subset(members, scores, np.ascontiguousarray(ids, np.int64))
                if reverse and block_new[members].any():
                    inside = (ids >= 0) & (ids < len(threshold))
                    safe = np.where(inside, ids, 0)
                    hit = ((scores > threshold[safe][None, :]) & (inside & open_rows[safe])[None, :]
                           & block_new[members][:, None])
                    hit_query, hit_row = np.nonzero(hit)
                    if len(hit_row):
                        rev_rows.append(ids[hit_row].astype(np.int64))
                        rev_cands.append(np.asarray(query_ids, np.int64)[lo + members[hit_query]])
                        rev_sims.append(scores[hit_query, hit_row].astype(np.float32))
            heap.finalize()
            filled = heap.I >= 0
            out_sims[lo:lo + len(block)] = np.where(filled, heap.D, -np.inf)
            out_ids[lo:lo + len(block)] = np.where(filled, heap.I, -1)
        result = None
        if reverse:
            result = ((np.concatenate(rev_rows), np.concatenate(rev_cands), np.concatenate(rev_sims)) if rev_rows
                      else (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)))
        return (out_sims, out_ids), result

    def save(self, location) -> int:
        """Stream the filled index to ``location`` (a :class:`curation.io.filesystem.Location`)
        without building the whole serialised blob in memory. Returns the vectors saved."""
        index = faiss.index_gpu_to_cpu(self.index) if self.gpu is not None else self.index
        parent = location.path.rsplit("/", 1)[0]
        location.filesystem.create_dir(parent, recursive=True)
        with location.filesystem.open_output_stream(location.path) as fh:
            faiss.write_index(index, faiss.PyCallbackIOWriter(fh.write))
        return int(index.ntotal)

    def memory_bytes(self) -> int:
        """Peak resident set of this process (includes pages of Ray's shared object store it read)."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def private_bytes(self) -> int:
        """Memory now held by this process alone (USS): the index and working buffers, without
        the shared object-store pages every shard maps while reading query batches. Linux
        ``/proc/self/smaps_rollup``; elsewhere the peak RSS."""
        try:
            with open("/proc/self/smaps_rollup") as fh:
                fields = dict(line.split(":", 1) for line in fh if ":" in line)
            return sum(int(fields[key].split()[0]) * 1024 for key in ("Private_Clean", "Private_Dirty"))
        except (OSError, KeyError, ValueError):
            return self.memory_bytes()


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def load_index(location) -> faiss.Index:
    """Read an index written by :meth:`IndexShard.save` (or the trained empty index),
    streamed: a filled shard is never held twice in memory."""
    if getattr(location, "local_path", None):  # FAISS reads a local file itself, without Python in the loop
        return faiss.read_index(location.local_path)
    with location.filesystem.open_input_stream(location.path) as fh:
        return faiss.read_index(faiss.PyCallbackIOReader(fh.read))


def train_empty_index(sample: np.ndarray, factory: str) -> faiss.Index:
    """Build and train (on ``sample``) an empty inner-product index."""
    d = sample.shape[1]
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    return index


def merge_shard_results(results: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard top-k lists (each sorted by decreasing similarity) into a global top-k."""
    if len(results) == 1:
        return results[0]
    sims = np.stack([r[0] for r in results])
    ids = np.stack([r[1] for r in results])
    return faiss.merge_knn_results(sims, ids, keep_max=True)
