"""Scores: one module per score, one explicit registry, one runner.

What a score reads from another it declares (``Score.needs``: duplicates read every junk flag
to pick the kept item, label quality reads the duplicate groups so a copy never votes for its
twin, and the sparseness); the runner orders the registry by those declarations. Everything
that walks flags (selections, the map, the galleries, the nightly diff, drift, ``similar``,
``run.json``) reads them from the registry when it runs: a score added to ``REGISTRY`` needs no
other edit.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.config import ScoresConfig
from curation.index.knn import KnnGraph
from curation.index.source import as_source
from curation.scores.base import REASON_COLUMN, Columns, Flag, Score, ScoreContext
from curation.scores.clusters import ClustersScore
from curation.scores.duplicates import DuplicatesScore
from curation.scores.junk import JunkScore
from curation.scores.label_quality import LabelQualityScore
from curation.scores.sparseness import SparsenessScore
from curation.schema import SCHEMA_COLUMNS, is_ok, ok_rows_in_vector_order

log = logging.getLogger(__name__)

REGISTRY: tuple[Score, ...] = (
    JunkScore(),
    DuplicatesScore(),
    SparsenessScore(),
    LabelQualityScore(),
    ClustersScore(),
)


def declared_flags(kind: str | None = None) -> tuple[Flag, ...]:
    """Every flag the registered scores declare (see scores.base.Flag), or those of one
    ``kind`` (``junk``, ``mislabel``, ``duplicate``), read from ``REGISTRY`` now."""
    return tuple(flag for score in REGISTRY for flag in score.flags if kind is None or flag.kind == kind)


def flag_columns(kind: str | None = None) -> tuple[str, ...]:
    """The columns of every declared flag, or of one ``kind``."""
    return tuple(flag.column for flag in declared_flags(kind))


def boolean_flag_columns() -> tuple[str, ...]:
    """The ``is_*`` columns among the declared flags (rates and listings count these)."""
    return tuple(flag.column for flag in declared_flags() if flag.boolean)


def in_order(registry: tuple[Score, ...]) -> list[Score]:
    """``registry`` ordered so that every score runs after those providing what it ``needs``
    (a column, or ``"<kind> flags"``); otherwise in registry order. Raises on a circle."""
    providers: dict[str, set[str]] = {}
    for score in registry:
        for column in score.columns:
            providers.setdefault(column, set()).add(score.name)
        for flag in score.flags:
            providers.setdefault(f"{flag.kind} flags", set()).add(score.name)
    after = {score.name: {p for need in getattr(score, "needs", ()) for p in providers.get(need, ())} - {score.name}
             for score in registry}
    done: list[Score] = []
    pending = list(registry)
    while pending:
        ready = next((s for s in pending if after[s.name] <= {d.name for d in done}), None)
        if ready is None:
            raise RuntimeError(f"scores need each other: {', '.join(s.name for s in pending)}")
        done.append(ready)
        pending.remove(ready)
    return done


def reserved_columns() -> frozenset[str]:
    """Column names a manifest may not use: the output schema's and every score's."""
    return SCHEMA_COLUMNS | {name for score in REGISTRY for name in score.columns}


def merge_reasons(prior, explanations: list) -> pa.Array:
    """A row's rejection reason when it has one, else every score's explanation joined by '; '
    (null when none has anything to say). Python strings are made only for the rows with
    something to say."""
    prior = _one_array(pc.cast(prior, pa.string()))  # an all-null column may arrive typed null
    arrays = [_one_array(pc.cast(e, pa.string())) for e in explanations]
    said = np.zeros(len(prior), bool)
    for array in arrays:
        said |= array.is_valid().to_numpy(zero_copy_only=False)
    said &= ~prior.is_valid().to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(said)
    if len(rows) == 0:
        return prior
    picked = [array.take(pa.array(rows)).to_pylist() for array in arrays]
    texts = ["; ".join(t for t in parts if t) for parts in zip(*picked)]
    index = np.full(len(prior), -1, np.int64)
    index[rows] = np.arange(len(rows))
    merged = pa.array(texts, pa.string()).take(pa.array(index, mask=index < 0))
    return pc.coalesce(prior, merged)


def _one_array(values) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


# Ten parameters, kept: what every score may read (the ScoreContext's fields) arrives here once.
def run_scores(samples: pa.Table, vectors, knn_ok: KnnGraph, config: ScoresConfig,
               *, registry: tuple[Score, ...] | None = None, budget: int | None = None,
               copies=None, copy_knn: KnnGraph | None = None, previous=None,
               persist_to=None) -> tuple[pa.Table, dict]:
    """Run every registered score.

    Args:
        samples: one row per input; ok rows carry ``vector_id`` (else ok rows in row order are
            vector ids 0, 1, ...).
        vectors: the ok rows' vectors: a source in storage (``VectorParts``) or a matrix.
        knn_ok: the kNN graph among vector ids.
        copies, copy_knn: the copy descriptors (same ids) and their kNN graph; None when the
            run has no pixels (copies are then judged by the embedding).
        previous: the previous :class:`~curation.published_run.PublishedRun` when tonight's
            graph updates its graph (the data barely moved): each score with state reads its
            own from it (``load_previous``); None builds every score afresh.
        persist_to: tonight's run folder, where each score with state writes it (``persist``).

    Returns:
        ``samples`` with score columns added (and ``reason`` merged: the rejection reason for
        rejected rows, every score's explanation for ok rows), and a report
        ``{"timings_s": {score: seconds}, "summary": {score: its run.json summary},
        "artifacts": {score: what it hands later phases (the clusters' centroids)}}``.
    """
    registry = REGISTRY if registry is None else registry
    ok = is_ok(samples["status"])
    states = {}
    for score in registry if previous is not None else ():
        if hasattr(score, "load_previous") and (state := score.load_previous(previous, samples)) is not None:
            states[score.name] = state
    ctx = ScoreContext(Columns(samples), ok, as_source(vectors), knn_ok, config, budget,
                       ok_rows_in_vector_order(samples), as_source(copies) if copies is not None else None, copy_knn,
                       previous=states, flags=tuple(flag for score in registry for flag in score.flags))
    reasons: list[pa.ChunkedArray | pa.Array] = []
    timings: dict[str, float] = {}
    summary: dict[str, dict] = {}
    artifacts: dict[str, dict] = {}
    for score in in_order(registry):
        start = time.perf_counter()
        result = score.compute(ctx)
        missing = set(score.columns) - set(result.column_names)
        if missing or result.num_rows != samples.num_rows:
            raise RuntimeError(f"score {score.name} returned {result.num_rows} rows / columns "
                               f"{result.column_names}, expected {samples.num_rows} rows with {score.columns}")
        if REASON_COLUMN in result.column_names:
            reasons.append(result[REASON_COLUMN])
        ctx = ctx.with_columns(result.select(list(score.columns)))
        timings[score.name] = round(time.perf_counter() - start, 3)
        summary[score.name] = score.summary(result)
        if hasattr(score, "artifacts"):  # what a score hands later phases (not run.json)
            artifacts[score.name] = score.artifacts(result)
        if persist_to is not None and hasattr(score, "persist"):  # what the next night starts from
            score.persist(result, persist_to)
        log.info("score %s: %.2fs %s", score.name, timings[score.name], summary[score.name] or "")
    samples = ctx.columns.table
    samples = samples.set_column(samples.column_names.index("reason"), "reason",
                                 merge_reasons(samples["reason"], reasons))
    return samples, {"timings_s": timings, "summary": summary, "artifacts": artifacts}
