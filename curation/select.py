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

Every mode takes ``where`` (a pandas ``query`` over sample and metadata columns, applied
before selection) and ``balance_on`` (a column to balance over: for ``representative`` it
replaces ``label``; for the others ranks are interleaved round-robin over its values).
A budget larger than what is eligible returns what is eligible and says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa

from curation.config import ConfigError, ScoresConfig, SelectionConfig, parse_class_balance
from curation.schema import SELECTION_SCHEMA

log = logging.getLogger(__name__)

SEED = 1234
COVER_WORK = 2e9  # multiply-adds one farthest-first traversal may spend before a class is split into regions


@dataclass
class SelectionResult:
    name: str
    mode: str
    table: pa.Table
    eligible: int
    note: str | None


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


def _interleave(order: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Reorder ``order`` round-robin over the values of ``groups[order]``, keeping each group's order."""
    buckets: dict = {}
    for idx in order:
        buckets.setdefault(groups[idx], []).append(idx)
    out = []
    lists = list(buckets.values())
    depth = 0
    while len(out) < len(order):
        for lst in lists:
            if depth < len(lst):
                out.append(lst[depth])
        depth += 1
    return np.array(out, np.int64)


class Selector:
    """Builds every configured selection from the scored ``samples`` table.

    Args:
        samples: the scored samples (one row per input).
        embeddings_ok: L2-normalised embeddings of the ok rows (for coverage).
        scores: thresholds (rare tail).
    """

    def __init__(self, samples: pa.Table, scores: ScoresConfig, embeddings_ok: np.ndarray):
        self.df = samples.to_pandas()
        self.ok_rows = np.flatnonzero((self.df["status"] == "ok").to_numpy())
        self.row_to_ok = np.full(len(self.df), -1, np.int64)
        self.row_to_ok[self.ok_rows] = np.arange(len(self.ok_rows))
        self.embeddings = embeddings_ok
        self.scores = scores
        df = self.df
        ok = (df["status"] == "ok").to_numpy()
        junk = (df["is_dark"] | df["is_bright"] | df["is_blurry"] | df["is_low_information"]).to_numpy(bool)
        self.ok = ok
        self.junk = junk
        self.kept = df["dup_of"].isna().to_numpy()
        self.suspected = df["is_suspected_mislabel"].fillna(False).to_numpy(bool)
        # A training set takes no item whose own label its neighbours doubt, confident
        # suggestion or not (farthest-first coverage would otherwise seek such atypical items out).
        quality = df["label_quality"].to_numpy(np.float64)
        self.doubtful = np.isfinite(quality) & (quality < scores.label_quality_threshold)
        self.labelled = df["label"].notna().to_numpy()

    def _where(self, sel: SelectionConfig) -> np.ndarray:
        if not sel.where:
            return np.ones(len(self.df), bool)
        try:
            mask = self.df.eval(sel.where)
        except Exception as exc:
            raise ConfigError(f"selection {sel.name!r} where: cannot evaluate {sel.where!r} ({exc})") from None
        if not isinstance(mask, pd.Series) or mask.dtype != bool:
            raise ConfigError(f"selection {sel.name!r} where: {sel.where!r} is not a true/false condition")
        return mask.to_numpy(bool)

    def _group_values(self, sel: SelectionConfig, column: str) -> np.ndarray:
        if column not in self.df.columns:
            raise ConfigError(f"selection {sel.name!r} balance_on: no column {column!r} "
                              f"(columns: {', '.join(self.df.columns)})")
        return self.df[column].astype(object).where(self.df[column].notna(), "<null>").to_numpy()

    def eligible(self, sel: SelectionConfig) -> np.ndarray:
        """Rows ``sel`` may pick from (its ``where`` applied), before the budget."""
        base = self.ok & self._where(sel)
        if sel.mode == "representative":
            # Suspected mislabels are a subset of the doubtful labels.
            return base & ~self.junk & self.kept & ~self.doubtful & (
                self.df["sparseness"].fillna(1.0).to_numpy() <= self.scores.rare_tail_quantile)
        if sel.mode == "edge_cases":
            return base & ~self.junk & self.kept & ~self.suspected
        if sel.mode == "label_review":
            return base & self.labelled & self.kept & np.isfinite(self.df["label_quality"].to_numpy(np.float64))
        if sel.mode == "clean":
            return base & ~self.junk & self.kept
        raise ConfigError(f"selection {sel.name!r}: unknown mode {sel.mode!r}")  # validated at load time

    def build(self, sel: SelectionConfig) -> SelectionResult:
        eligible = self.eligible(sel)
        df = self.df
        if sel.mode == "representative":
            rows, score, reasons = self._representative(sel, np.flatnonzero(eligible))
        elif sel.mode == "edge_cases":
            idx = np.flatnonzero(eligible)
            rarity = df["sparseness"].to_numpy(np.float64)[idx]
            rows = idx[np.argsort(-rarity, kind="stable")]
            score = df["sparseness"].to_numpy(np.float64)
            reasons = lambda r: f"rare: sparseness {score[r]:.3f}"  # noqa: E731
        elif sel.mode == "label_review":
            quality = df["label_quality"].to_numpy(np.float64)
            idx = np.flatnonzero(eligible)
            rows = idx[np.argsort(quality[idx], kind="stable")]
            score = quality
            labels, suggested = df["label"].to_numpy(), df["suggested_label"].to_numpy()
            reasons = lambda r: f"label quality {quality[r]:.3f}: labelled {labels[r]!r}, suggested {suggested[r]!r}"  # noqa: E731
        elif sel.mode == "clean":
            idx = np.flatnonzero(eligible)
            typical = 1.0 - df["sparseness"].to_numpy(np.float64)
            rows = idx[np.argsort(-typical[idx], kind="stable")]
            score = typical
            reasons = lambda r: "ok: not junk, not a duplicate"  # noqa: E731

        if sel.balance_on and sel.mode != "representative":
            rows = _interleave(rows, self._group_values(sel, sel.balance_on))
        n_eligible = int(eligible.sum())
        note = None
        if sel.budget is not None:
            if sel.budget > len(rows):
                note = f"budget {sel.budget} exceeds the {len(rows)} eligible items; returned {len(rows)}"
            rows = rows[: sel.budget]
        if sel.mode == "representative":
            picked_scores = score
            picked_reasons = reasons
        else:
            picked_scores = score[rows] if len(rows) else np.empty(0)
            picked_reasons = [reasons(r) for r in rows]  # reasons only for the rows returned
        table = pa.table({
            "uri": pa.array(df["uri"].to_numpy()[rows], pa.string()),
            "label": pa.array(df["label"].astype(object).where(df["label"].notna(), None).to_numpy()[rows], pa.string()),
            "rank": pa.array(np.arange(1, len(rows) + 1, dtype=np.int32)),
            "score": pa.array(np.asarray(picked_scores, np.float32)[: len(rows)], pa.float32()),
            "reason": pa.array(list(picked_reasons)[: len(rows)], pa.string()),
        }, schema=SELECTION_SCHEMA)
        if note:
            log.warning("selection %s: %s", sel.name, note)
        return SelectionResult(sel.name, sel.mode, table, n_eligible, note)

    def _representative(self, sel: SelectionConfig, idx: np.ndarray):
        df = self.df
        alpha = parse_class_balance(sel.class_balance, key=f"selection {sel.name} class_balance")
        column = sel.balance_on or "label"
        groups = self._group_values(sel, column)
        groups = np.array([str(g) for g in groups], dtype=object)
        names, capacity = np.unique(groups[idx].astype(str), return_counts=True)
        quotas = allocate(sel.budget or len(idx), capacity, capacity.astype(np.float64) ** alpha)
        per_group: list[list[tuple[int, float]]] = []
        for name, quota in zip(names, quotas):
            members = idx[groups[idx] == name]
            per_group.append(self._cover(members, int(quota)))
        # Rank: round-robin over groups, so any prefix of the selection is balanced too.
        order: list[tuple[int, float]] = []
        depth = 0
        while any(depth < len(p) for p in per_group):
            for p in per_group:
                if depth < len(p):
                    order.append(p[depth])
            depth += 1
        rows = np.array([r for r, _ in order], np.int64)
        score = np.array([c for _, c in order], np.float64)
        clusters = df["cluster"].to_numpy()
        reasons = [f"representative of {column} {groups[r]!r} (coverage pick: cosine distance {c:.3f} from every "
                   f"earlier pick of its class; embedding cluster {clusters[r]})" for r, c in order]
        return rows, score, reasons

    def _cover(self, members: np.ndarray, quota: int) -> list[tuple[int, float]]:
        """``quota`` items covering ``members``: farthest-first traversal (greedy k-center) of
        their embeddings, seeded at the most central member. Returns (row, coverage distance),
        where the distance is how far the pick was from every earlier pick (largest first).

        When ``quota * len(members) * d`` exceeds ``COVER_WORK`` the class is first split into
        at most ``quota`` regions by spherical k-means; each region gets one pick and the rest
        of the quota in proportion to its size, and is traversed on its own, so the cost stays
        bounded at millions of items."""
        if quota <= 0 or len(members) == 0:
            return []
        if quota >= len(members):
            return [(int(r), 0.0) for r in members]
        x = np.ascontiguousarray(self.embeddings[self.row_to_ok[members]], dtype=np.float32)
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


def farthest_first(x: np.ndarray, count: int, *, start: int) -> tuple[list[int], list[float]]:
    """Greedy k-center over the rows of L2-normalised ``x``: each step takes the row farthest
    (cosine distance) from everything taken so far. Returns the rows and, for each, its distance
    to the nearest earlier pick at the time it was taken (the first gets its farthest row's distance)."""
    nearest = 1.0 - x @ x[start]
    chosen, gaps = [start], [float(nearest.max())]
    nearest[start] = -1.0
    for _ in range(count - 1):
        j = int(np.argmax(nearest))
        chosen.append(j)
        gaps.append(float(nearest[j]))
        np.minimum(nearest, 1.0 - x @ x[j], out=nearest)
        nearest[chosen] = -1.0
    return chosen, gaps


def build_selections(samples: pa.Table, scores: ScoresConfig, selections: list[SelectionConfig],
                     embeddings_ok: np.ndarray) -> list[SelectionResult]:
    selector = Selector(samples, scores, embeddings_ok)
    return [selector.build(sel) for sel in selections]
