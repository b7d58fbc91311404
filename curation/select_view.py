"""What every selection mode reads: the scored samples as one view (:class:`SampleView`: the
junk, kept and suspected masks from the scores' declared flags, labels, clusters, vectors), the
result types, and the budget helpers the modes share (:func:`allocate`, :func:`interleave`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from curation.config import ConfigError, ScoresConfig, SelectionConfig
from curation.index.source import as_source
from curation.schema import is_ok, vector_id_of_rows
from curation.scores import declared_flags, flag_columns
from curation.where import columns_of

log = logging.getLogger(__name__)


@dataclass
class SelectionResult:
    name: str
    mode: str
    table: pa.Table
    eligible: int
    note: str | None
    pending: int | None = None  # to_label: items kept from the previous run's queue
    details: dict | None = None  # validation: how well it mirrors the data, what it kept, leakage
    rows: np.ndarray | None = field(default=None, repr=False)  # samples rows picked (for disjoint_from)


@dataclass
class Ranked:
    """A mode's answer: rows best first, each row's score, and the text of its reason."""

    rows: np.ndarray
    scores: np.ndarray
    reasons: Sequence[str] | pa.Array | None = None  # None: the mode's ``reason(view, row, score)`` per returned row
    pending: int | None = None
    details: dict | None = None


def allocate(budget: int, capacity: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Integer quotas summing to min(budget, sum(capacity)), proportional to ``weights`` and
    capped by ``capacity`` (water-filling; largest remainders get the leftover units)."""
    capacity = np.asarray(capacity, np.int64)
    weights = np.where(capacity > 0, np.asarray(weights, np.float64), 0.0)
    quota = np.zeros(len(capacity), np.int64)
    remaining = min(int(budget), int(capacity.sum()))
    while remaining > 0:
        open_ = (quota < capacity) & (weights > 0)
        if not open_.any():
            break
        share = np.where(open_, weights, 0.0)
        ideal = remaining * share / share.sum()
        add = np.minimum(np.floor(ideal).astype(np.int64), capacity - quota)
        if add.sum() == 0:
            order = np.argsort(-(ideal - np.floor(ideal)) - open_ * 1e-9, kind="stable")
            for j in order:
                if remaining == 0:
                    break
                if open_[j] and quota[j] < capacity[j]:
                    quota[j] += 1
                    remaining -= 1
            continue
        quota += add
        remaining -= int(add.sum())
    return quota


def interleave(lists: Sequence[Sequence]) -> list:
    """Round-robin over ``lists`` (first of each, then second of each, ...), keeping each list's order."""
    out: list = []
    depth = 0
    while any(depth < len(lst) for lst in lists):
        out.extend(lst[depth] for lst in lists if depth < len(lst))
        depth += 1
    return out


def interleave_by(order: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """``order`` reordered round-robin over the values of ``groups[order]``."""
    buckets: dict = {}
    for idx in order:
        buckets.setdefault(groups[idx], []).append(idx)
    return np.array(interleave(list(buckets.values())), np.int64)


def _filled(column, value) -> np.ndarray:
    return pc.fill_null(column, value).to_numpy(zero_copy_only=False)


def _floats(column) -> np.ndarray:
    return column.to_numpy(zero_copy_only=False).astype(np.float64)


class SampleView:
    """The scored samples as the modes read them: the columns they need plus the shared masks.

    Only the columns the modes read, and those a ``where`` or ``balance_on`` names, are
    converted (strings stay Arrow-backed), so the view costs tens of bytes per item.

    Args:
        samples: the scored samples (one row per input).
        scores: thresholds (rare tail, label quality).
        vectors: the ok rows' vectors (a source in storage or a matrix); vector id of row r is
            ``vector_of_row[r]``.
        columns: extra columns to make available (named by ``where`` / ``balance_on``).
    """

    NEEDED = ("uri", "label", "status", "dup_of", "dup_group", "label_quality", "sparseness", "suggested_label",
              "suggested_confidence", "cluster", "label_source", "object_quality", "object_count")

    def __init__(self, samples: pa.Table, scores: ScoresConfig, vectors, columns: set[str] | frozenset = frozenset(),
                 previous: dict[str, pa.Table] | None = None):
        flags = flag_columns()  # every flag a score declares, whichever score it is
        keep = [c for c in samples.column_names if c in self.NEEDED or c in flags or c in columns]
        self.table = samples.select(keep)
        self.where_columns = [c for c in samples.column_names if c in columns]
        self._df: pd.DataFrame | None = None
        self.scores = scores
        self.vectors = as_source(vectors)
        self.ok = is_ok(samples["status"])
        self.vector_of_row = vector_id_of_rows(samples)
        table = self.table
        self.junk = self._any("junk")
        self.kept = ~self._any("duplicate")  # a copy that is not its group's kept item is not kept
        self.suspected = self._any("mislabel")
        self.quality = _floats(table["label_quality"])
        self.sparseness = _floats(table["sparseness"])
        # A detection run's image is labelled when the annotations list it (zero boxes included).
        labels = table["object_count"] if "object_count" in table.column_names else table["label"]
        self.labelled = labels.is_valid().to_numpy(zero_copy_only=False)
        # a detection run's boxes per image and strata (curation.select_boxes.object_strata), when a mode needs them
        self.object_classes = None
        self.object_strata: tuple[np.ndarray, list[str]] | None = None
        self.cluster = _floats(table["cluster"])
        self.previous = previous or {}  # the previous published run's selections, by name

    def _any(self, kind: str) -> np.ndarray:
        """Rows that any declared flag of ``kind`` marks (a flag the table lacks marks none)."""
        out = np.zeros(self.table.num_rows, bool)
        for declared in declared_flags(kind):
            out |= declared.mask(self.table)
        return out

    @property
    def df(self) -> pd.DataFrame:
        """The columns a ``where`` may name, as a DataFrame (built on first use)."""
        if self._df is None:
            self._df = self.table.select(self.where_columns).to_pandas()
        return self._df

    def groups(self, column: str, *, selection: str = "") -> tuple[np.ndarray, list[str]]:
        """``(code per row, value of each code)`` for grouping by ``column`` (null is ``'<null>'``)."""
        if column not in self.table.column_names:
            raise ConfigError(f"selection {selection!r} balance_on: no column {column!r} "
                              f"(columns: {', '.join(self.table.column_names)})")
        encoded = pc.dictionary_encode(self.table[column]).combine_chunks()
        names = [str(v) for v in encoded.dictionary.to_pylist()] + ["<null>"]
        codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.float64)
        return np.nan_to_num(codes, nan=len(names) - 1).astype(np.int64), names

    def cell(self, column: str, row: int):
        return self.table[column][int(row)].as_py()


def columns_named(selections: list[SelectionConfig], available: list[str]) -> set[str]:
    """Columns that the selections' ``where`` expressions or ``balance_on`` mention."""
    names = set()
    for sel in selections:
        if sel.balance_on:
            names.add(sel.balance_on)
        names |= columns_of(sel.where or "")
    return names & set(available)
