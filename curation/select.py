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
  non-kept duplicates excluded (their twin is reviewed). In a detection run: images by lowest
  ``object_quality`` (the image's least trusted box, see ``objects/``).
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

import dataclasses
import logging

import numpy as np
import pandas as pd
import pyarrow as pa

from curation.config import ConfigError, ScoresConfig, SelectionConfig
from curation.schema import SELECTION_SCHEMA
from curation.where import WhereError, where_mask
from curation.select_boxes import MODE as BOX_MODE, OBJECT_LABEL, ObjectClasses, balance_by_objects, box_review, \
    object_classes, object_strata
from curation.select_modes import MODES, blocked_by
from curation.select_view import SampleView, SelectionResult, columns_named, interleave_by

log = logging.getLogger(__name__)

WIDER_FIELD = 3  # balance_on object_label: the mode ranks this many times the budget to choose from


class Selector:
    """Builds every configured selection from the scored ``samples`` table.

    Args:
        samples: the scored samples (one row per input).
        scores: thresholds (rare tail, label quality).
        vectors: the ok rows' vectors (for coverage), a source in storage or a matrix.
    """

    def __init__(self, samples: pa.Table, scores: ScoresConfig, vectors,
                 selections: list[SelectionConfig] | None = None, previous: dict[str, pa.Table] | None = None,
                 object_classes: ObjectClasses | None = None):
        named = columns_named(selections or [], samples.column_names) if selections is not None else set(
            samples.column_names)
        self.view = SampleView(samples, scores, vectors, named, previous)
        self.object_classes = object_classes  # balance_on: object_label (a detection run's boxes per image)
        if object_classes is not None:  # validation's strata in a detection run: the images' main box class
            self.view.object_classes = object_classes
            self.view.object_strata = object_strata(object_classes, self.view.labelled)

    def _where(self, sel: SelectionConfig) -> np.ndarray:
        if not sel.where:
            return np.ones(self.view.table.num_rows, bool)
        return evaluate_where(self.view.df, sel)

    def eligible(self, sel: SelectionConfig, excluded: np.ndarray | None = None) -> np.ndarray:
        """Rows ``sel`` may pick from (its ``where`` applied, and not ``excluded`` by a selection
        it must stay disjoint from), before the budget."""
        if sel.balance_on == OBJECT_LABEL:  # (not a column: see build)
            sel = sel.model_copy(update={"balance_on": None})
        eligible = MODES[sel.mode].eligible(self.view, sel) & self._where(sel)
        return eligible if excluded is None else eligible & ~excluded

    def build(self, sel: SelectionConfig, excluded: np.ndarray | None = None) -> SelectionResult:
        if sel.balance_on == OBJECT_LABEL and getattr(MODES[sel.mode], "balances_itself", False):
            if sel.mode == "to_label":
                raise ConfigError(f"selection {sel.name!r} balance_on {OBJECT_LABEL}: not for mode to_label "
                                  f"(its images have no boxes yet)")
            return self._build(sel, excluded)  # validation stratifies by the images' box classes itself
        if sel.balance_on == OBJECT_LABEL:  # the mode ranks a wider field; the boxes' classes then pick the budget from it
            if self.object_classes is None:
                raise ConfigError(f"selection {sel.name!r} balance_on {OBJECT_LABEL}: needs boxes (input.annotations)")
            sel_in = sel.model_copy(update={"balance_on": None, "budget": sel.budget and WIDER_FIELD * sel.budget})
            result = self._build(sel_in, excluded)
            return self._by_objects(sel, result)
        return self._build(sel, excluded)

    def _by_objects(self, sel: SelectionConfig, result: SelectionResult) -> SelectionResult:
        positions, per_class = balance_by_objects(result.rows, self.object_classes, sel.budget)
        if sel.budget is not None:
            positions = positions[: sel.budget]
        table = result.table.take(pa.array(positions, pa.int64()))
        table = table.set_column(table.schema.get_field_index("rank"), "rank",
                                 pa.array(np.arange(1, len(positions) + 1, dtype=np.int32)))
        details = {**(result.details or {}), "objects_per_class": per_class}
        note = None
        if sel.budget is not None and sel.budget > len(positions):
            note = f"budget {sel.budget} exceeds the {result.eligible} eligible items; returned {len(positions)}"
        return dataclasses.replace(result, table=table, rows=result.rows[positions], details=details, note=note)

    def _build(self, sel: SelectionConfig, excluded: np.ndarray | None = None) -> SelectionResult:
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
                     vectors, *, previous: dict[str, pa.Table] | None = None,
                     objects: pa.Table | None = None) -> list[SelectionResult]:
    """Every configured selection; ``previous``: the previous published run's selections by name
    (``to_label`` keeps its still-pending items at the head); ``objects``: a detection run's
    boxes (``box_review`` selects among them, :mod:`curation.select_boxes`)."""
    results: dict[str, SelectionResult] = {}
    for sel in selections:
        if sel.mode == BOX_MODE:
            if objects is None:
                raise ConfigError(f"selection {sel.name!r}: mode {BOX_MODE} needs boxes (input.annotations)")
            results[sel.name] = box_review(objects, sel)
    order = [sel.name for sel in selections]
    selections = [sel for sel in selections if sel.mode != BOX_MODE]
    classes = object_classes(samples, objects) if objects is not None and any(
        sel.balance_on == OBJECT_LABEL or sel.mode in ("to_label", "validation") for sel in selections) else None
    selector = Selector(samples, scores, vectors, selections, previous, classes)
    by_name = {sel.name: sel for sel in selections}
    excluded: dict[str, np.ndarray] = {}
    blocked: dict[str, np.ndarray] = {}
    for sel in build_order(selections):
        results[sel.name] = result = selector.build(sel, excluded.get(sel.name))
        if sel.disjoint_from:
            blocked[sel.name] = blocked_by(selector.view, result.rows, sel.disjoint_cosine)
            for other in sel.disjoint_from:
                excluded[other] = excluded.get(other, np.zeros(samples.num_rows, bool)) | blocked[sel.name]
    for name, rows_blocked in blocked.items():  # what crosses a declared boundary: zero by construction
        results[name].details = {**(results[name].details or {}), "leakage": {
            other: int(rows_blocked[results[other].rows].sum()) for other in by_name[name].disjoint_from}}
    return [results[name] for name in order]


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
