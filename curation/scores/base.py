"""The common interface every score implements.

A score reads the :class:`ScoreContext` (decode-time statistics, embeddings, the kNN graph,
labels and the columns of the scores that ran before it) and returns a ``pyarrow.Table`` with
one row per sample and the columns it declares. It mutates nothing. An optional ``_reason``
column carries a human-readable explanation per row (null when there is nothing to say); the
runner merges those into ``samples.reason``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import numpy as np
import pyarrow as pa

from curation.config import ScoresConfig
from curation.index.knn import KnnGraph

REASON_COLUMN = "_reason"


@dataclass
class ScoreContext:
    """Everything a score may read. Arrays indexed by sample row unless named ``*_ok``.

    Attributes:
        columns: sample columns as numpy arrays (decode statistics, labels, hashes, and the
            outputs of earlier scores); length N.
        ok: boolean mask of rows with ``status == 'ok'``.
        embeddings_ok: (n_ok, d) L2-normalised embeddings of the ok rows, in row order.
        knn_ok: kNN graph among ok rows (ids index into the ok rows).
        config: score thresholds.
        budget: the largest ``representative`` budget, if any (sizes the clustering).
    """

    columns: dict[str, np.ndarray]
    ok: np.ndarray
    embeddings_ok: np.ndarray
    knn_ok: KnnGraph
    config: ScoresConfig
    budget: int | None = None
    ok_rows: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.ok_rows = np.flatnonzero(self.ok)

    @property
    def n(self) -> int:
        return len(self.ok)

    def column(self, name: str) -> np.ndarray:
        return self.columns[name]

    def with_columns(self, table: pa.Table) -> "ScoreContext":
        """A new context that also sees ``table``'s columns (the runner's merge step)."""
        merged = dict(self.columns)
        for name in table.column_names:
            if name != REASON_COLUMN:
                merged[name] = table[name].to_numpy(zero_copy_only=False)
        ctx = ScoreContext(merged, self.ok, self.embeddings_ok, self.knn_ok, self.config, self.budget)
        return ctx

    def scatter(self, values_ok: np.ndarray, fill, dtype) -> np.ndarray:
        """Expand an array over ok rows to all rows, ``fill`` elsewhere."""
        out = np.full(self.n, fill, dtype=dtype)
        out[self.ok_rows] = values_ok
        return out


class Score(Protocol):
    """A score: ``name``, declared output ``columns`` and ``compute(ctx) -> pa.Table``."""

    name: ClassVar[str]
    columns: ClassVar[tuple[str, ...]]

    def compute(self, ctx: ScoreContext) -> pa.Table: ...


def masked(values: np.ndarray, valid: np.ndarray, type_: pa.DataType) -> pa.Array:
    """Arrow array with nulls where ``valid`` is False."""
    return pa.array(values, type=type_, mask=~np.asarray(valid, dtype=bool))
