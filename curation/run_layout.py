"""The names in a run folder and its output folder that more than one module reads or writes
(the writer and :class:`~curation.published_run.PublishedRun`, the reader): spelled once here."""

from __future__ import annotations

SUCCESS = "_SUCCESS"  # written last: the run is complete
LATEST = "latest"  # in the output folder: the newest published run
PROBE_FILE = "label-probe.npz"  # the label probe's models, where the next night's fits start
CORRECTIONS_FILE = "corrections.parquet"  # the label corrections a run applied (kept for later nights)
TRAINED_INDEX = "trained.faissindex"  # a sharded index's trained, empty quantiser
OBJECTS_FOLDER = "objects"  # detection runs: one row per box (curation/objects.py)
OBJECT_EMBEDDINGS_FOLDER = "object-embeddings"  # detection runs: the box crops' vectors
OBJECT_KNN_FOLDER = "object-knn"  # detection runs: the crops' kNN graph
OBJECT_CORRECTIONS_FILE = "object-corrections.parquet"  # detection runs: the box corrections applied (kept)


def shard_file(index_folder, shard: int):
    """The saved FAISS shard ``shard`` of a run's ``index/`` (or ``index-copies/``) folder."""
    return index_folder.child(f"shard-{shard:05d}.faissindex")
