"""The common interface every score implements.

A score reads the :class:`ScoreContext` (decode-time statistics, the kNN graph, labels, the
columns of the scores that ran before it and, when it must, the vectors) and returns a
``pyarrow.Table`` with one row per sample and the columns it declares. It mutates nothing.
Vectors stay where they are stored: a score fetches a bounded sample (``vectors.take``) or runs
a function over every vector where the vectors are (``map_vectors``), never the whole matrix.

A score may also summarise itself for ``run.json`` (``summary(table) -> dict``); the job
collects those instead of knowing each score's flags. An optional ``_reason``
column carries a human-readable explanation per row (null when there is nothing to say); the
runner merges those into ``samples.reason``.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.config import ScoresConfig
from curation.index.knn import KnnGraph

REASON_COLUMN = "_reason"


class Columns(Mapping):
    """Sample columns by name, converted to numpy only when a score asks for one (and cached),
    so the driver never holds every column as Python objects. ``arrow(name)`` gives the column
    itself (strings stay in Arrow)."""

    def __init__(self, table: pa.Table):
        self.table = table
        self._cache: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._cache:
            if name not in self.table.column_names:
                raise KeyError(name)
            self._cache[name] = self.table[name].to_numpy(zero_copy_only=False)
        return self._cache[name]

    def __iter__(self):
        return iter(self.table.column_names)

    def __len__(self) -> int:
        return self.table.num_columns

    def arrow(self, name: str) -> pa.ChunkedArray:
        return self.table[name]

    def with_table(self, result: pa.Table) -> "Columns":
        """These columns plus (or replaced by) ``result``'s."""
        table = self.table
        for name in result.column_names:
            if name == REASON_COLUMN:
                continue
            if name in table.column_names:
                table = table.set_column(table.column_names.index(name), name, result[name])
            else:
                table = table.append_column(name, result[name])
        # The next score starts with an empty cache: numpy copies live only while one score runs.
        return Columns(table)


@dataclass
class ScoreContext:
    """Everything a score may read. Arrays indexed by sample row unless named ``*_ok``.

    Attributes:
        columns: sample columns (decode statistics, labels, hashes, and the outputs of earlier
            scores), length N, as numpy on access (:class:`Columns`).
        ok: boolean mask of rows with ``status == 'ok'``.
        vectors: the ok rows' L2-normalised vectors (a :class:`~curation.index.source.VectorParts`
            in storage or :class:`~curation.index.source.MemoryVectors`); vector id i is the
            sample row ``ok_rows[i]``.
        knn_ok: kNN graph among ok rows (ids are vector ids).
        config: score thresholds.
        budget: the largest ``representative`` budget, if any (sizes the clustering).
        copies: the ok rows' copy descriptors (same ids as ``vectors``), or None when the run
            has no pixels (``input.embeddings``).
        copy_knn: the kNN graph among the copy descriptors (None with ``copies``).
        previous: per score name, the state that score's ``load_previous`` read from the
            previous published run (only on a night whose graph updates that run's: the data
            barely moved); a score without state, or a night without one, finds nothing.
        flags: every flag the run's scores declare (see :meth:`any_flag`).
    """

    columns: Columns
    ok: np.ndarray
    vectors: Any
    knn_ok: KnnGraph
    config: ScoresConfig
    budget: int | None = None
    ok_rows: np.ndarray | None = None
    copies: Any = None
    copy_knn: KnnGraph | None = None
    previous: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    flags: tuple["Flag", ...] = ()

    def __post_init__(self) -> None:
        if self.ok_rows is None:
            self.ok_rows = np.flatnonzero(self.ok)

    @property
    def n(self) -> int:
        return len(self.ok)

    def column(self, name: str) -> np.ndarray:
        return self.columns[name]

    def any_flag(self, kind: str) -> np.ndarray:
        """Rows that any declared flag of ``kind`` marks, among the columns computed so far
        (a score that reads a kind declares it in ``needs``, so those ran first)."""
        table = self.columns.table
        out = np.zeros(self.n, bool)
        for declared in self.flags:
            if declared.kind == kind and declared.column in table.column_names:
                out |= declared.mask(table)
        return out

    def with_columns(self, table: pa.Table) -> "ScoreContext":
        """A new context that also sees ``table``'s columns (the runner's merge step)."""
        return dataclasses.replace(self, columns=self.columns.with_table(table))

    def scatter(self, values_ok: np.ndarray, fill, dtype) -> np.ndarray:
        """Expand an array over ok rows to all rows, ``fill`` elsewhere."""
        out = np.full(self.n, fill, dtype=dtype)
        out[self.ok_rows] = values_ok
        return out


@dataclass(frozen=True)
class Flag:
    """A boolean column a score writes, declared once: selections, the map, the galleries,
    the nightly diff and ``run.json`` walk these declarations instead of naming columns.

    Attributes:
        column: the ``is_*`` column (or, with ``boolean`` off, the column that is set on the
            flagged rows: ``dup_of``).
        kind: ``junk`` (excluded from ``clean``, ``representative`` and ``edge_cases``; one
            gallery each), ``mislabel`` (excluded from ``representative`` / ``edge_cases``) or
            ``duplicate`` (a copy that is not its group's kept item: excluded from ``clean``).
        title: the gallery's title in the report.
        order_by: the column that orders its gallery, most extreme first.
        ascending: whether smaller ``order_by`` values are more extreme.
        thresholds: the ``scores.*`` keys that decide it.
        boolean: the column is a boolean flag (counted in the drift profile's ``flag_rates`` and
            listed in ``curation similar``'s hits); off: flagged where the column is not null.
        name: its key in the nightly diff's ``newly_flagged`` (default: the column without
            ``is_``).
    """

    column: str
    kind: str
    title: str
    order_by: str
    ascending: bool
    thresholds: tuple[str, ...]
    boolean: bool = True
    name: str = ""

    @property
    def key(self) -> str:
        return self.name or self.column.removeprefix("is_")

    def mask(self, table: pa.Table) -> np.ndarray:
        """The flagged rows of ``table`` (a flag column the table lacks flags nothing)."""
        if self.column not in table.column_names:
            return np.zeros(table.num_rows, bool)
        values = table[self.column]
        marked = pc.fill_null(values, False) if self.boolean else pc.is_valid(values)
        return np.asarray(marked.to_numpy(zero_copy_only=False), bool)


class Score(Protocol):
    """A score: ``name``, declared output ``columns``, the :class:`Flag` s among them
    (``flags``), what it reads from other scores (``needs``: their columns, or ``"<kind> flags"``
    for every flag of a kind), ``compute(ctx) -> pa.Table`` and ``summary(table) -> dict`` (what
    ``run.json`` reports about it under ``scores.<name>``; counts of flagged items go under
    ``"flags"``, which ``run.json`` also merges into its ``flags``). The runner orders the
    scores by ``needs``; nothing else depends on the registry's order.

    A score that keeps state between nights also has ``load_previous(previous, samples)``
    (reads it from the previous :class:`~curation.published_run.PublishedRun`; what it returns
    is ``ctx.previous[name]``) and ``persist(table, run)`` (writes it into tonight's run folder);
    ``artifacts(table)`` hands later phases what they use of it (the clusters' centroids, for
    the drift profile). The job knows none of these by name."""

    name: ClassVar[str]
    columns: ClassVar[tuple[str, ...]]
    flags: ClassVar[tuple[Flag, ...]]
    needs: ClassVar[tuple[str, ...]]

    def compute(self, ctx: ScoreContext) -> pa.Table: ...

    def summary(self, table: pa.Table) -> dict: ...


def count_true(table: pa.Table, *names: str) -> dict[str, int]:
    """``{name: number of true rows}`` for boolean columns (a common summary)."""
    return {name: int(pc.sum(table[name]).as_py() or 0) for name in names}


def masked(values: np.ndarray, valid: np.ndarray, type_: pa.DataType) -> pa.Array:
    """Arrow array with nulls where ``valid`` is False."""
    return pa.array(values, type=type_, mask=~np.asarray(valid, dtype=bool))


# ------------------------------------------------------------------ evidence behind thresholds

EVIDENCE_KEY = b"threshold_evidence"
EVIDENCE_EXAMPLES = 6  # items (or pairs) shown on each side of a threshold


def nearby(value: float, step: float, low: float | None = None, high: float | None = None) -> list[float]:
    """The configured ``value`` and two steps either side (clipped to ``[low, high]``)."""
    out = []
    for k in (-2, -1, 0, 1, 2):
        v = round(value + k * step, 6)
        if (low is None or v >= low) and (high is None or v <= high):
            out.append(v)
    return out


def one_sided_counts(values: np.ndarray, eligible: np.ndarray, thresholds: list[float], *, below: bool) -> dict:
    """How many ``eligible`` items a ``value < t`` (``below``) or ``value > t`` rule flags at each t."""
    x = np.asarray(values, np.float64)[eligible]
    x = x[np.isfinite(x)]
    return {str(t): int((x < t).sum() if below else (x > t).sum()) for t in thresholds}


def with_evidence(table: pa.Table, evidence: dict) -> pa.Table:
    """``table`` carrying ``evidence`` (per threshold key: counts at nearby values and the items
    or pairs on either side) for its score's summary to report; never shared state."""
    meta = dict(table.schema.metadata or {})
    meta[EVIDENCE_KEY] = json.dumps(evidence, default=float).encode()
    return table.replace_schema_metadata(meta)


def evidence_of(table: pa.Table) -> dict:
    raw = (table.schema.metadata or {}).get(EVIDENCE_KEY)
    return json.loads(raw) if raw else {}


def side_by_side(values: np.ndarray, candidates: np.ndarray, threshold: float, *, flagged_below: bool) -> dict:
    """Rows of ``candidates`` just on the flagged side of ``threshold`` and just on the other
    side, closest to it first (``EVIDENCE_EXAMPLES`` each)."""
    x = np.asarray(values, np.float64)[candidates]
    keep = np.isfinite(x)
    candidates, x = candidates[keep], x[keep]
    flagged = x < threshold if flagged_below else x >= threshold
    distance = np.abs(x - threshold)
    out = {}
    for side, mask in (("flagged", flagged), ("not_flagged", ~flagged)):
        rows = candidates[mask][np.argsort(distance[mask], kind="stable")[:EVIDENCE_EXAMPLES]]
        out[side] = rows
    return out
