"""Selection modes: subsets of ``samples`` with a rank, a score and a reason per row.

* ``representative``: up to ``budget`` items balanced over classes (``class_balance``:
  ``uniform``, ``proportional`` or ``tempered:<alpha>``, quota ~ n_c^alpha); inside each class
  the quota is spent on coverage: a farthest-first traversal (greedy k-center, as in the
  core-set approach to active learning) of the class's eligible embeddings, seeded at its most
  central item, so no two picks are redundant and every mode of the class is reached (large
  classes are first split into k-means regions: one pick each, the rest by size). Excludes junk,
  non-kept duplicates, suspected mislabels, items whose label quality is below
  ``scores.label_quality_threshold`` and the rarest tail (sparseness >
  ``scores.rare_tail_quantile``), so the traversal spreads over the class without chasing
  outliers.
* ``edge_cases``: the rarest items (highest sparseness), excluding junk, non-kept duplicates
  and suspected mislabels.
* ``label_review``: labelled items by lowest label quality, with the suggested label;
  non-kept duplicates excluded (their twin is reviewed).
* ``clean``: every ok item except junk and non-kept duplicates, most typical first.
* ``validation``: ``budget`` (or ``fraction`` of the eligible) items that mirror the whole data:
  a stratified sample over label x cluster (or ``balance_on`` x cluster), excluding junk and
  non-kept duplicates. Sticky: members of the previous published run's validation selection
  that are still eligible stay in it. With ``disjoint_from: [names]`` it is built before those
  selections, which then exclude every item in a duplicate group with a member, and every item
  whose cosine to a member is at least ``disjoint_cosine`` (no leakage between the splits).
* ``to_label``: what to send to annotators next, for a labelling ``budget``. Eligible: ok,
  unlabelled, not junk, kept, not in a duplicate group that holds a labelled item (never pay to
  label a copy), not the rarest tail unless ``include_rare``. Ranked by
  :func:`curation.labelling.rank_for_labelling` (regions not yet covered by a label, largest
  first; in each, a typical item the label models are unsure of). Items the previous published
  run put in this selection that are still unlabelled and eligible keep their place at the head
  (``pending`` in ``run.json``).

Every mode takes ``where`` (a filter over sample and metadata columns in pandas ``query``
syntax, parsed and evaluated by :mod:`curation.where`, applied before selection) and ``balance_on`` (a column to balance over: for ``representative`` it
replaces ``label``; for the others ranks are interleaved round-robin over its values).
A budget larger than what is eligible returns what is eligible and says so.

Each mode is one class with ``eligible(view, sel)`` and ``rank(view, sel, rows)`` in the explicit
``MODES`` registry (as the scores are); :class:`Selector` applies what every mode shares
(``where``, ``balance_on``, the budget, the output table). ``where`` and ``balance_on`` are
checked against the known columns before any work (:func:`check_selection_columns`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, Sequence

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from curation.config import ConfigError, ScoresConfig, SelectionConfig, parse_class_balance
from curation.corrections import corrected_mask
from curation.cover import farthest_first
from curation.labelling import rank_for_labelling
from curation.index.source import as_source
from curation.schema import SELECTION_SCHEMA, is_ok, ok_rows_in_vector_order, vector_id_of_rows
from curation.scores import declared_flags, flag_columns
from curation.where import WhereError, columns_of, where_mask

log = logging.getLogger(__name__)

SEED = 1234
COVER_WORK = 2e9  # multiply-adds one farthest-first traversal may spend before a class is split into regions
COVER_WINDOW_BYTES = 1 << 30  # vectors of consecutive classes read from storage in one pass (in Ray's object store)
COVER_MAX_MEMBERS = 65_536  # a larger class is covered through a uniform sample of this many members


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
              "suggested_confidence", "cluster", "label_source")

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
        self.labelled = table["label"].is_valid().to_numpy(zero_copy_only=False)
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


class Mode(Protocol):
    """A selection mode: which rows it may pick and how it ranks them."""

    name: ClassVar[str]

    def eligible(self, view: SampleView, sel: SelectionConfig) -> np.ndarray: ...

    def rank(self, view: SampleView, sel: SelectionConfig, rows: np.ndarray) -> Ranked: ...

    def reason(self, view: SampleView, row: int, score: float) -> str: ...


class EdgeCases:
    name = "edge_cases"

    def eligible(self, view, sel):
        return view.ok & ~view.junk & view.kept & ~view.suspected

    def rank(self, view, sel, rows):
        order = rows[np.argsort(-view.sparseness[rows], kind="stable")]
        return Ranked(order, view.sparseness[order])

    def reason(self, view, row, score):
        return f"rare: sparseness {score:.3f}"


class LabelReview:
    name = "label_review"

    def eligible(self, view, sel):
        # A corrected label comes back for review only when it is disputed (a mislabel-kind flag).
        settled = corrected_mask(view.table) & ~view.suspected
        return view.ok & view.labelled & view.kept & np.isfinite(view.quality) & ~settled

    def rank(self, view, sel, rows):
        order = rows[np.argsort(view.quality[rows], kind="stable")]
        return Ranked(order, view.quality[order])

    def reason(self, view, row, score):
        return (f"label quality {score:.3f}: labelled {view.cell('label', row)!r}, "
                f"suggested {view.cell('suggested_label', row)!r}")


class Clean:
    name = "clean"

    def eligible(self, view, sel):
        return view.ok & ~view.junk & view.kept

    REASON = "ok: not junk, not a duplicate"

    def rank(self, view, sel, rows):
        typical = 1.0 - view.sparseness[rows]
        order = np.argsort(-typical, kind="stable")
        # Every row says the same: one Arrow value repeated, not one Python string per row.
        reasons = pa.array([self.REASON], pa.string()).take(pa.array(np.zeros(len(rows), np.int64)))
        return Ranked(rows[order], typical[order], reasons)

    def reason(self, view, row, score):
        return self.REASON


DOUBTFUL_READMIT = 2.0  # a class keeps at least this many times its share of the budget


class ToLabel:
    """What to label next (see :mod:`curation.labelling`); a stable queue across nights."""

    name = "to_label"
    balances_itself = True
    MAX_CANDIDATES = 65_536  # candidates (and labelled items) ranked through a uniform sample of this many

    def eligible(self, view, sel):
        rare = np.nan_to_num(view.sparseness, nan=1.0) > view.scores.rare_tail_quantile
        groups = _floats(view.table["dup_group"]) if "dup_group" in view.table.column_names else np.full(len(rare), np.nan)
        with_label = np.unique(groups[view.labelled & view.ok & np.isfinite(groups)])
        copy_of_labelled = np.isin(groups, with_label) & np.isfinite(groups)
        base = view.ok & ~view.labelled & ~view.junk & view.kept & ~copy_of_labelled
        return base if sel.include_rare else base & ~rare

    def rank(self, view, sel, rows):

        budget = sel.budget or len(rows)
        pending, ranks = previous_members(view, sel, rows)
        pending, ranks = pending[:budget], ranks[:budget]
        head = [f"pending from the previous run (its rank {r}): still unlabelled" for r in ranks]
        rest = np.setdiff1d(rows, pending)
        if len(rest) == 0 or len(pending) >= budget:  # nothing new to rank: no vector is fetched
            return Ranked(pending, np.ones(len(pending)), head, pending=len(pending))
        rng = np.random.default_rng(SEED)
        if len(rest) > self.MAX_CANDIDATES:
            rest = np.sort(rng.choice(rest, self.MAX_CANDIDATES, replace=False))
        known = np.flatnonzero(view.labelled & view.ok)
        if len(known) > self.MAX_CANDIDATES:
            known = np.sort(rng.choice(known, self.MAX_CANDIDATES, replace=False))
        pool = np.concatenate([known, rest])
        x = np.ascontiguousarray(view.vectors.take(view.vector_of_row[pool]), np.float32)
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        labelled = np.zeros(len(pool), bool)
        labelled[:len(known)] = True
        typicality = 1.0 - np.nan_to_num(view.sparseness[pool], nan=1.0)
        confidence = _floats(view.table["suggested_confidence"]) if "suggested_confidence" in view.table.column_names \
            else np.full(view.table.num_rows, np.nan)
        uncertainty = 1.0 - confidence[pool] if np.isfinite(confidence[rest]).any() else None
        if uncertainty is not None:
            uncertainty = np.nan_to_num(uncertainty, nan=1.0)
        picked, scores, reasons = rank_for_labelling(x, labelled, budget - len(pending), typicality=typicality,
                                                     uncertainty=uncertainty)
        new_rows = pool[picked]
        if sel.balance_on:
            codes, _ = view.groups(sel.balance_on, selection=sel.name)
            order = interleave_by(np.arange(len(new_rows)), codes[new_rows])
            new_rows, scores, reasons = new_rows[order], scores[order], [reasons[i] for i in order]
        return Ranked(np.concatenate([pending, new_rows]).astype(np.int64), np.concatenate([np.ones(len(pending)), scores]),
                      head + list(reasons), pending=len(pending))

    def reason(self, view, row, score):
        return "to label"


def previous_members(view: SampleView, sel: SelectionConfig, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ``rows`` that the previous published run's selection of this name held, in its rank
    order, and their ranks there (matched by uri in Arrow: no Python string per row)."""
    table = view.previous.get(sel.name)
    if table is None or not {"uri", "rank"} <= set(table.column_names) or len(rows) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    at = pc.index_in(view.table["uri"].take(pa.array(rows, pa.int64())).cast(pa.string()),
                     value_set=table["uri"].combine_chunks().cast(pa.string()))
    at = np.nan_to_num(at.to_numpy(zero_copy_only=False).astype(np.float64), nan=-1).astype(np.int64)
    held = rows[at >= 0]
    ranks = table["rank"].to_numpy()[at[at >= 0]].astype(np.int64)
    order = np.argsort(ranks, kind="stable")
    return held[order].astype(np.int64), ranks[order]


class Validation:
    """A held-out set that mirrors the data (stratified over label x cluster); sticky."""

    name = "validation"
    balances_itself = True

    def eligible(self, view, sel):
        return view.ok & ~view.junk & view.kept

    def rank(self, view, sel, rows):
        budget = sel.budget if sel.budget is not None else int(round((sel.fraction or 0.0) * len(rows)))
        budget = min(budget, len(rows))
        labels, names = view.groups(sel.balance_on or "label", selection=sel.name)
        cluster = np.nan_to_num(view.cluster, nan=-1).astype(np.int64)
        sticky = previous_members(view, sel, rows)[0][:budget]  # a shrunk budget keeps the earliest-ranked
        # Systematic sampling over the rows sorted by label, then cluster, then a random key: every
        # label's and every (label, cluster) cell's count is its share of the budget within one,
        # however many cells there are (a quota per cell would round most small cells to zero).
        free = np.setdiff1d(rows, sticky)
        need = budget - len(sticky)
        rng = np.random.default_rng(SEED)
        order = free[np.lexsort((rng.random(len(free)), cluster[free], labels[free]))]
        if need > 0 and len(order):
            step = len(order) / need
            chosen = order[np.minimum((rng.random() + np.arange(need)) * step, len(order) - 1).astype(np.int64)]
        else:
            chosen = np.zeros(0, np.int64)
        picked = np.concatenate([sticky, chosen]).astype(np.int64)
        column = sel.balance_on or "label"
        reasons = ["validation: kept from the previous run's validation set" for _ in sticky] + [
            f"validation: stratum {column} {names[labels[r]]!r} x cluster {cluster[r]}" for r in picked[len(sticky):]]
        details = {"sticky": int(len(sticky)),
                   f"{column}_tv": _tv(labels[rows], labels[picked]), "cluster_tv": _tv(cluster[rows], cluster[picked])}
        return Ranked(picked, np.zeros(len(picked)), reasons, details=details)

    def reason(self, view, row, score):
        return "validation"


def _tv(population: np.ndarray, sample: np.ndarray) -> float:
    """Total-variation distance between the value shares of ``sample`` and ``population``."""
    if len(sample) == 0 or len(population) == 0:
        return 0.0
    values, counts = np.unique(population, return_counts=True)
    share = np.array([np.sum(sample == v) for v in values]) / len(sample)
    return round(float(0.5 * np.abs(share - counts / counts.sum()).sum()), 4)


def blocked_by(view: SampleView, members: np.ndarray, cosine: float) -> np.ndarray:
    """Rows that would leak ``members`` into another selection: every row in a duplicate group
    with a member, and every ok row whose cosine to some member is at least ``cosine`` (scanned
    where the vectors are stored, a Ray task per range)."""
    from curation.index.source import map_vectors

    out = np.zeros(view.table.num_rows, bool)
    if len(members) == 0:
        return out
    out[members] = True
    if "dup_group" in view.table.column_names:
        groups = _floats(view.table["dup_group"])
        mine = np.unique(groups[members][np.isfinite(groups[members])])
        out |= np.isin(groups, mine) & np.isfinite(groups)
    x = view.vectors.take(view.vector_of_row[members]).astype(np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    near = np.concatenate([ids for ids in map_vectors(view.vectors, _near_any, x, float(cosine))] or
                          [np.zeros(0, np.int64)])
    row_of_vector = ok_rows_in_vector_order(view.table)
    out[row_of_vector[near]] = True
    return out


def _near_any(ids: np.ndarray, x: np.ndarray, members: np.ndarray, cosine: float) -> np.ndarray:
    """The ``ids`` whose vector has cosine >= ``cosine`` to some row of ``members``."""
    x = np.asarray(x, np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    index = faiss.IndexFlatIP(members.shape[1])
    index.add(np.ascontiguousarray(members))
    sims, _ = index.search(np.ascontiguousarray(x), 1)
    return np.asarray(ids)[sims[:, 0] >= cosine - 1e-6].astype(np.int64)


class Representative:
    """Coverage inside each class (or ``balance_on`` group), classes balanced by ``class_balance``."""

    name = "representative"
    balances_itself = True

    def eligible(self, view, sel):
        # A training set takes no suspected mislabel and no item whose own label the label model
        # doubts (the traversal would otherwise seek them out). With weak features (a pixel
        # descriptor) most of a class can be "doubtful" (70% of CIFAR-10 with `thumbnail`):
        # then the class's least doubtful items are let back in until it has
        # DOUBTFUL_READMIT x its share of the budget, so no class runs dry.
        rare = np.nan_to_num(view.sparseness, nan=1.0) > view.scores.rare_tail_quantile
        base = view.ok & ~view.junk & view.kept & ~view.suspected & ~rare
        doubtful = np.isfinite(view.quality) & (view.quality < view.scores.label_quality_threshold)
        return base & (~doubtful | self._readmitted(view, sel, base & doubtful, base & ~doubtful))

    @staticmethod
    def _readmitted(view, sel, candidates: np.ndarray, trusted: np.ndarray) -> np.ndarray:
        """The best ``candidates`` of each class, as many as it lacks to reach its floor."""
        codes, _ = view.groups(sel.balance_on or "label", selection=sel.name)
        present = np.unique(codes[candidates | trusted])
        if not sel.budget or len(present) == 0 or not candidates.any():
            return np.zeros(len(codes), bool)
        floor = int(np.ceil(DOUBTFUL_READMIT * sel.budget / len(present)))
        lacking = np.maximum(floor - np.bincount(codes[trusted], minlength=codes.max() + 1), 0)
        rows = np.flatnonzero(candidates)
        rows = rows[np.lexsort((-view.quality[rows], codes[rows]))]  # by class, best quality first
        starts = np.flatnonzero(np.r_[True, codes[rows[1:]] != codes[rows[:-1]]])
        rank = np.arange(len(rows)) - np.repeat(starts, np.diff(np.r_[starts, len(rows)]))
        out = np.zeros(len(codes), bool)
        out[rows[rank < lacking[codes[rows]]]] = True
        return out

    def rank(self, view, sel, rows):
        alpha = parse_class_balance(sel.class_balance, key=f"selection {sel.name} class_balance")
        column = sel.balance_on or "label"
        codes, names = view.groups(column, selection=sel.name)
        present, capacity = np.unique(codes[rows], return_counts=True)
        # Groups in the order of their values, so the interleave below is the same on every run.
        order = np.argsort([names[c] for c in present], kind="stable")
        present, capacity = present[order], capacity[order]
        quotas = allocate(sel.budget or len(rows), capacity, capacity.astype(np.float64) ** alpha)
        members = [rows[codes[rows] == code] for code in present]
        per_group = cover_groups(view, members, [int(q) for q in quotas])
        # Round-robin over groups, so any prefix of the selection is balanced too.
        picks = interleave(per_group)
        picked = np.array([r for r, _ in picks], np.int64)
        gaps = np.array([c for _, c in picks], np.float64)
        reasons = [self.reason(view, r, c, group=f"{column} {names[codes[r]]!r}") for r, c in picks]
        return Ranked(picked, gaps, reasons)

    def reason(self, view, row, score, *, group: str | None = None):
        group = group or f"label {view.cell('label', row)!r}"
        return (f"representative of {group} (coverage pick: cosine distance {score:.3f} from every earlier pick "
                f"of its class; embedding cluster {int(view.cluster[row])})")


MODES: dict[str, Mode] = {mode.name: mode for mode in (Representative(), EdgeCases(), LabelReview(), Clean(),
                                                      ToLabel(), Validation())}


def cover_groups(view: SampleView, groups: list[np.ndarray], quotas: list[int]) -> list[list[tuple[int, float]]]:
    """:func:`cover` for every group. The driver holds one group's vectors at a time; they are
    read from storage for as many consecutive groups as fit in ``COVER_WINDOW_BYTES`` in one pass
    (:meth:`~curation.index.source.VectorParts.take_groups`), so the store is read a few times,
    not once per class."""
    # A class larger than COVER_MAX_MEMBERS is covered through a uniform sample of its members:
    # the driver then holds at most that many of its vectors, however large the class grows.
    rng = np.random.default_rng(SEED)
    groups = [np.sort(rng.choice(g, size=COVER_MAX_MEMBERS, replace=False)) if len(g) > max(COVER_MAX_MEMBERS, q) else g
              for g, q in zip(groups, quotas)]
    needs = [i for i, (g, q) in enumerate(zip(groups, quotas)) if 0 < q < len(g)]
    out: list = [None] * len(groups)
    vectors = view.vectors.take_groups([view.vector_of_row[groups[i]] for i in needs], window_bytes=COVER_WINDOW_BYTES)
    for i, x in zip(needs, vectors):
        out[i] = cover(view, groups[i], quotas[i], x=x)
    return [out[i] if out[i] is not None else cover(view, groups[i], quotas[i]) for i in range(len(groups))]


def cover(view: SampleView, members: np.ndarray, quota: int, *, x: np.ndarray | None = None) -> list[tuple[int, float]]:
    """``quota`` rows covering ``members``: farthest-first traversal (greedy k-center) of their
    vectors, seeded at the most central member. Returns (row, coverage distance), where the
    distance is how far the pick was from every earlier pick (largest first).

    When ``quota * len(members) * d`` exceeds ``COVER_WORK`` the class is first split into at
    most ``quota`` regions by spherical k-means; each region gets one pick and the rest of the
    quota in proportion to its size, and is traversed on its own, so the cost stays bounded at
    millions of items."""
    if quota <= 0 or len(members) == 0:
        return []
    if quota >= len(members):
        return [(int(r), 0.0) for r in members]
    if x is None:
        x = view.vectors.take(view.vector_of_row[members])
    x = np.ascontiguousarray(x, dtype=np.float32)
    regions = int(min(quota, max(1, np.ceil(quota * len(members) * x.shape[1] / COVER_WORK))))
    if regions == 1:
        owner = np.zeros(len(members), np.int64)
        centroids = x.mean(axis=0, keepdims=True)
    else:
        km = faiss.Kmeans(x.shape[1], regions, niter=10, seed=SEED, spherical=True,
                          max_points_per_centroid=64, verbose=False)
        km.train(x)
        centroids = km.centroids
        _, assigned = km.index.search(x, 1)
        owner = assigned.ravel().astype(np.int64)
    sizes = np.bincount(owner, minlength=len(centroids))
    # One pick per region first (there are at most ``quota`` regions, so a small far-away
    # mode is never starved), the rest in proportion to region size.
    first = (sizes > 0).astype(np.int64)
    quotas = first + allocate(quota - int(first.sum()), sizes - first, sizes.astype(np.float64))
    picks: list[tuple[int, float]] = []
    for region in np.flatnonzero(quotas):
        local = np.flatnonzero(owner == region)
        chosen, gaps = farthest_first(x[local], int(quotas[region]), start=int(np.argmax(x[local] @ centroids[region])))
        picks.extend((int(members[local[j]]), g) for j, g in zip(chosen, gaps))
    picks.sort(key=lambda p: -p[1])  # any prefix covers the class as evenly as it can
    return picks


class Selector:
    """Builds every configured selection from the scored ``samples`` table.

    Args:
        samples: the scored samples (one row per input).
        scores: thresholds (rare tail, label quality).
        vectors: the ok rows' vectors (for coverage), a source in storage or a matrix.
    """

    def __init__(self, samples: pa.Table, scores: ScoresConfig, vectors,
                 selections: list[SelectionConfig] | None = None, previous: dict[str, pa.Table] | None = None):
        named = columns_named(selections or [], samples.column_names) if selections is not None else set(
            samples.column_names)
        self.view = SampleView(samples, scores, vectors, named, previous)

    def _where(self, sel: SelectionConfig) -> np.ndarray:
        if not sel.where:
            return np.ones(self.view.table.num_rows, bool)
        return evaluate_where(self.view.df, sel)

    def eligible(self, sel: SelectionConfig, excluded: np.ndarray | None = None) -> np.ndarray:
        """Rows ``sel`` may pick from (its ``where`` applied, and not ``excluded`` by a selection
        it must stay disjoint from), before the budget."""
        eligible = MODES[sel.mode].eligible(self.view, sel) & self._where(sel)
        return eligible if excluded is None else eligible & ~excluded

    def build(self, sel: SelectionConfig, excluded: np.ndarray | None = None) -> SelectionResult:
        view, mode = self.view, MODES[sel.mode]
        eligible = self.eligible(sel, excluded)
        ranked = mode.rank(view, sel, np.flatnonzero(eligible))
        rows, scores, reasons = ranked.rows, ranked.scores, ranked.reasons
        if sel.balance_on and not getattr(mode, "balances_itself", False):
            codes, _ = view.groups(sel.balance_on, selection=sel.name)
            order = interleave_by(np.arange(len(rows)), codes[rows])
            rows, scores = rows[order], scores[order]
        note = None
        if sel.budget is not None:
            if sel.budget > len(rows):
                note = f"budget {sel.budget} exceeds the {len(rows)} eligible items; returned {len(rows)}"
            rows, scores = rows[: sel.budget], scores[: sel.budget]
        if reasons is None:  # only for the rows returned
            reasons = [mode.reason(view, int(r), float(c)) for r, c in zip(rows, scores)]
        take = pa.array(rows, pa.int64())
        table = pa.table({
            "uri": view.table["uri"].take(take).cast(pa.string()),
            "label": view.table["label"].take(take).cast(pa.string()),
            "rank": pa.array(np.arange(1, len(rows) + 1, dtype=np.int32)),
            "score": pa.array(np.asarray(scores, np.float32), pa.float32()),
            "reason": (reasons.slice(0, len(rows)) if isinstance(reasons, pa.Array)
                       else pa.array(list(reasons)[: len(rows)], pa.string())),
        }, schema=SELECTION_SCHEMA)
        if note:
            log.warning("selection %s: %s", sel.name, note)
        return SelectionResult(sel.name, sel.mode, table, int(eligible.sum()), note, ranked.pending, ranked.details,
                               rows=np.asarray(rows, np.int64))


def evaluate_where(df: pd.DataFrame, sel: SelectionConfig) -> np.ndarray:
    """``sel.where`` over ``df`` as a boolean mask; :class:`ConfigError` naming the selection otherwise."""
    try:
        return where_mask(df, sel.where)
    except WhereError as exc:
        raise ConfigError(f"selection {sel.name!r} where: {exc}") from None


def check_selection_columns(selections: list[SelectionConfig], schema: pa.Schema) -> None:
    """Dry-run every ``where`` and ``balance_on`` against the columns ``samples`` will have
    (``schema``), before any work: a typo fails at once, naming the selection and the key."""
    empty = schema.empty_table().to_pandas()
    for i, sel in enumerate(selections):
        if sel.balance_on and sel.balance_on not in empty.columns:
            raise ConfigError(f"config key 'selections[{i}].balance_on': no column {sel.balance_on!r} "
                              f"(columns: {', '.join(empty.columns)})")
        if sel.where:
            try:
                evaluate_where(empty, sel)
            except ConfigError as exc:
                raise ConfigError(f"config key 'selections[{i}].where': {exc}") from None


def build_selections(samples: pa.Table, scores: ScoresConfig, selections: list[SelectionConfig],
                     vectors, *, previous: dict[str, pa.Table] | None = None) -> list[SelectionResult]:
    """Every configured selection; ``previous``: the previous published run's selections by name
    (``to_label`` keeps its still-pending items at the head)."""
    selector = Selector(samples, scores, vectors, selections, previous)
    by_name = {sel.name: sel for sel in selections}
    excluded: dict[str, np.ndarray] = {}
    blocked: dict[str, np.ndarray] = {}
    results: dict[str, SelectionResult] = {}
    for sel in build_order(selections):
        results[sel.name] = result = selector.build(sel, excluded.get(sel.name))
        if sel.disjoint_from:
            blocked[sel.name] = blocked_by(selector.view, result.rows, sel.disjoint_cosine)
            for other in sel.disjoint_from:
                excluded[other] = excluded.get(other, np.zeros(samples.num_rows, bool)) | blocked[sel.name]
    for name, rows_blocked in blocked.items():  # what crosses a declared boundary: zero by construction
        results[name].details = {**(results[name].details or {}), "leakage": {
            other: int(rows_blocked[results[other].rows].sum()) for other in by_name[name].disjoint_from}}
    return [results[sel.name] for sel in selections]


def build_order(selections: list[SelectionConfig]) -> list[SelectionConfig]:
    """Selections in config order, except that one named in another's ``disjoint_from`` comes
    after it (the config's validation rejects cycles)."""
    by_name = {sel.name: sel for sel in selections}
    done: dict[str, None] = {}

    def visit(sel: SelectionConfig) -> None:
        if sel.name in done:
            return
        for first in selections:  # everything that must be built before ``sel``
            if sel.name in first.disjoint_from and first.name not in done:
                visit(first)
        done[sel.name] = None

    for sel in selections:
        visit(sel)
    return [by_name[name] for name in done]
