"""The selection modes, one class each (``eligible(view, sel)`` and ``rank(view, sel, rows)``),
in the explicit ``MODES`` registry; see :mod:`curation.select` for what each one picks."""

from __future__ import annotations

import logging
from typing import ClassVar, Protocol

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.config import SelectionConfig, parse_class_balance
from curation.corrections import corrected_mask
from curation.cover import farthest_first
from curation.labelling import rank_for_labelling
from curation.schema import ok_rows_in_vector_order
from curation.select_boxes import OBJECT_LABEL, class_shares_tv
from curation.select_view import Ranked, SampleView, _floats, allocate, interleave, interleave_by
from curation.index.source import map_vectors

log = logging.getLogger(__name__)


SEED = 1234


COVER_WORK = 2e9  # multiply-adds one farthest-first traversal may spend before a class is split into regions


COVER_WINDOW_BYTES = 1 << 30  # vectors of consecutive classes read from storage in one pass (in Ray's object store)


COVER_MAX_MEMBERS = 65_536  # a larger class is covered through a uniform sample of this many members


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
        if "object_quality" in view.table.column_names:  # a detection run: images by their boxes
            return view.ok & view.kept & np.isfinite(self._objects(view))
        # A corrected label comes back for review only when it is disputed (a mislabel-kind flag).
        settled = corrected_mask(view.table) & ~view.suspected
        return view.ok & view.labelled & view.kept & np.isfinite(view.quality) & ~settled

    def rank(self, view, sel, rows):
        quality = self._objects(view) if "object_quality" in view.table.column_names else view.quality
        order = rows[np.argsort(quality[rows], kind="stable")]
        return Ranked(order, quality[order])

    @staticmethod
    def _objects(view) -> np.ndarray:
        return view.table["object_quality"].to_numpy(zero_copy_only=False).astype(np.float64)

    def reason(self, view, row, score):
        if "object_quality" in view.table.column_names:
            return f"object quality {score:.3f}: the image's least trusted box (see objects/)"
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
        by_objects = view.object_strata is not None and sel.balance_on in (None, OBJECT_LABEL)
        column = OBJECT_LABEL if by_objects else sel.balance_on or "label"
        labels, names = view.object_strata if by_objects else view.groups(column, selection=sel.name)
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
        reasons = ["validation: kept from the previous run's validation set" for _ in sticky] + [
            f"validation: stratum {column} {names[labels[r]]!r} x cluster {cluster[r]}" for r in picked[len(sticky):]]
        details = {"sticky": int(len(sticky)),
                   f"{column}_tv": _tv(labels[rows], labels[picked]), "cluster_tv": _tv(cluster[rows], cluster[picked])}
        if view.object_classes is not None:  # a detection run: the boxes the set holds, against the data's
            details["object_class_tv"] = class_shares_tv(view.object_classes, rows, picked)
            details["objects_per_class"] = dict(zip(view.object_classes.names, np.asarray(
                view.object_classes.counts[picked].sum(axis=0)).ravel().astype(int).tolist()))
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
