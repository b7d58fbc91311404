"""Label quality and suggested label from two label models: a linear probe's out-of-sample
probabilities and similarity-weighted kNN votes.

For a labelled ok item i:

1. the probe (:mod:`curation.scores.label_probe`): a K-fold logistic regression on the vectors
   gives ``probe_i(c)``, out of sample;
2. the vote, from i's neighbours j (labelled, not in i's duplicate group -- a copy must not vote
   for its twin): weights ``w_j = exp((sim_ij - max_j' sim_ij') / T)`` with
   ``T = TEMPERATURE`` (the closest usable neighbour weighs 1), and
   ``vote_i(c) = (sum_j w_j [y_j = c] + PRIOR_WEIGHT * pi_c) / (sum_j w_j + PRIOR_WEIGHT)``
   where ``pi_c`` is the class frequency (a neighbour-less item falls back to the prior);
3. ``p_i = w * probe_i + (1 - w) * vote_i`` with ``w = scores.label_probe_weight`` (0 turns the
   probe off);
4. per-class calibration (as in confident learning): ``t_c`` = mean ``p_i(c)`` over items
   labelled c, and ``q_i(c) = (p_i(c) / t_c) / sum_c' (p_i(c') / t_c')`` -- a rare class whose
   members get lower probabilities is not drowned by frequent ones;
5. ``label_quality = q_i(y_i)`` in [0, 1]; ``suggested_label = argmax_c q_i(c)`` and
   ``suggested_confidence = max_c q_i(c)``;
   ``is_suspected_mislabel`` when the suggestion differs, quality <
   ``scores.label_quality_threshold``, the suggestion's own calibrated probability is at least
   ``scores.mislabel_min_confidence`` (with a weak or non-semantic embedder the probabilities
   spread over many classes and nothing should be flagged) and the item is not in the rarest
   tail (sparseness > ``scores.rare_tail_quantile``: isolated items have no peers to judge
   their label by).

A class with fewer than ``MIN_CLASS_MEMBERS`` (5) labelled ok items is held out: its items are
scored as unlabelled (no ``label_quality``, never flagged or disputed) and it is never
suggested; ``run.json`` -> ``scores.label_quality`` names such classes (``held_out_classes``).

Unlabelled ok items get a suggestion too (pre-annotations for labelling, and the uncertainty
that ``to_label`` ranks by): the probe's probabilities for them are out of sample by
construction (the probe never trains on them), and their neighbours vote as for any item.
Their ``label_quality`` is null and they are never flagged. With no labelled item at all every
suggestion is null.

Rows are processed in blocks whose dense (rows x classes) probabilities stay under
``BLOCK_CELLS`` values.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.corrections import MIN_CLASS_MEMBERS, corrected_mask
from curation.scores.base import REASON_COLUMN, Flag, ScoreContext, count_true, evidence_of, masked, nearby, \
    one_sided_counts, side_by_side, with_evidence
from curation.scores.label_probe import (PROBE_SAMPLE, ProbeState, dense_probabilities, probe_keys,
                                        probe_probabilities, stratified_sample)
from curation.schema import ok_rows_in_vector_order
from curation.io.filesystem import write_bytes
from curation.run_layout import PROBE_FILE

log = logging.getLogger(__name__)

TEMPERATURE = 0.1
PRIOR_WEIGHT = 0.1
BLOCK_CELLS = 1 << 22  # rows x classes materialised at once (~32 MB of float64)


def _vote_block(graph, codes: np.ndarray, group_vals: np.ndarray, prior: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Rows ``[lo, hi)``'s neighbour-vote probabilities, dense (rows x classes)."""
    ids = graph.ids[lo:hi]
    valid = ids >= 0
    safe_ids = np.maximum(ids, 0)
    neighbour_codes = np.where(valid, codes[safe_ids], -1)
    own_group = group_vals[lo:hi, None]
    same_group = (own_group >= 0) & valid & (group_vals[safe_ids] == own_group)  # a copy never votes for its twin
    usable = valid & (neighbour_codes >= 0) & ~same_group
    sims = graph.sims[lo:hi].astype(np.float64)
    # Relative to each item's closest usable neighbour, so the prior's weight means the same in
    # dense and sparse regions.
    best = np.max(np.where(usable, sims, -np.inf), axis=1, keepdims=True)
    best = np.where(np.isfinite(best), best, 0.0)
    weights = np.where(usable, np.exp(np.where(usable, sims - best, 0.0) / TEMPERATURE), 0.0)
    votes = np.zeros((hi - lo, len(prior)))
    rows = np.repeat(np.arange(hi - lo), ids.shape[1])
    np.add.at(votes, (rows, np.maximum(neighbour_codes, 0).ravel()), weights.ravel())
    total = weights.sum(axis=1) + PRIOR_WEIGHT
    return (votes + PRIOR_WEIGHT * prior[None, :]) / total[:, None]


def _probe_block(top_classes: np.ndarray, top_p: np.ndarray, prior: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Rows ``[lo, hi)``'s probe probabilities, dense (see :func:`dense_probabilities`)."""
    return dense_probabilities(top_classes[lo:hi], top_p[lo:hi], prior)


def label_codes(labels) -> tuple[pa.DictionaryArray, np.ndarray, np.ndarray]:
    """Labels as dictionary codes (no per-row Python strings): the encoded column, the classes
    and every row's code (-1 = unlabelled)."""
    encoded = pc.dictionary_encode(labels).combine_chunks()
    classes = np.asarray(encoded.dictionary.to_pylist(), dtype=object)
    codes = np.nan_to_num(encoded.indices.to_numpy(zero_copy_only=False).astype(np.float64), nan=-1)
    return encoded, classes, codes.astype(np.int64)


def probe_sample_ids(samples: pa.Table) -> np.ndarray:
    """The vector ids the label probe will train on (its stratified sample), for a phase that
    reads vectors before the scores and can read these with them."""

    if "label" not in samples.column_names:
        return np.zeros(0, np.int64)
    _, _, codes = label_codes(samples["label"])
    rows = ok_rows_in_vector_order(samples)
    return np.sort(stratified_sample(codes[rows], PROBE_SAMPLE, keys=probe_keys(samples, rows)))


# The report's main mislabel gallery and the demo's table read this declaration.
SUSPECTED = Flag("is_suspected_mislabel", "mislabel", "Suspected mislabels", "label_quality", True,
                 ("label_quality_threshold", "mislabel_min_confidence", "rare_tail_quantile"))


class LabelQualityScore:
    name = "label_quality"
    flags = (SUSPECTED, Flag("is_disputed", "mislabel", "Disputed corrections", "label_quality", True,
                             ("dispute_min_confidence",)))
    columns = ("label_quality", "suggested_label", "suggested_confidence", "is_suspected_mislabel", "is_disputed")
    needs = ("sparseness", "dup_group")  # rare items keep their label; a copy never votes for its twin

    def compute(self, ctx: ScoreContext) -> pa.Table:
        n = ctx.n
        ok_rows = ctx.ok_rows
        n_ok = len(ok_rows)
        encoded, classes, codes_all = label_codes(ctx.columns.arrow("label"))
        codes = codes_all[ok_rows]
        # A class with too few labelled members (one typo'd correction, say) is held out: its
        # items count as unlabelled here, so it is never suggested, never calibrated (one
        # member's tiny t_c would inflate it for every item) and its items are never flagged.
        members = np.bincount(codes[codes >= 0], minlength=len(classes))
        held_out = np.append(members < MIN_CLASS_MEMBERS, False)  # the last slot: unlabelled rows' -1
        codes = np.where(held_out[codes], -1, codes)
        in_held_out = held_out[codes_all]
        labelled = codes >= 0
        quality_ok = np.full(n_ok, np.nan, np.float32)
        suggested_code_ok = np.full(n_ok, -1, np.int64)
        confidence_ok = np.zeros(n_ok, np.float64)
        info: dict = {"probe": "off"}
        state = None
        if labelled.any():
            quality_ok, suggested_code_ok, confidence_ok, info, state = self._vote(ctx, codes, classes)
        small = held_out[:-1] & (members > 0)
        if small.any():
            info["held_out_classes"] = [str(c) for c in classes[small]]
        quality = ctx.scatter(quality_ok, np.nan, np.float32)
        suggested_code = ctx.scatter(suggested_code_ok, -1, np.int64)
        confidence_all = ctx.scatter(confidence_ok, 0.0, np.float64)
        has_quality = np.isfinite(quality)
        # An item in the rarest tail has no peers to vote on its label: it is an edge case,
        # not a suspected mislabel (its label_quality is still reported).
        rare = np.nan_to_num(ctx.column("sparseness").astype(np.float64), nan=1.0) > ctx.config.rare_tail_quantile
        confident = confidence_all >= ctx.config.mislabel_min_confidence
        disagree = (suggested_code >= 0) & (suggested_code != codes_all)
        # An annotator's correction is not second-guessed like a given label: it is disputed only
        # when the label models are sure of another label.
        corrected = corrected_mask(ctx.columns.table) if "label_source" in ctx.columns else np.zeros(n, bool)
        suspected = (has_quality & ~rare & confident & (quality < ctx.config.label_quality_threshold)
                     & disagree & ~corrected)
        disputed = corrected & disagree & ~in_held_out & (confidence_all >= ctx.config.dispute_min_confidence)
        suggested = pa.DictionaryArray.from_arrays(pa.array(suggested_code, pa.int32(), mask=suggested_code < 0),
                                                   encoded.dictionary).cast(pa.string())
        reasons = np.empty(n, dtype=object)
        for i in np.flatnonzero(suspected):
            reasons[i] = (f"suspected mislabel: labelled {classes[codes_all[i]]!r}, the label models suggest "
                          f"{classes[suggested_code[i]]!r} (label quality {quality[i]:.2f})")
        given = ctx.columns.arrow("given_label").to_pylist() if "given_label" in ctx.columns else [None] * n
        for i in np.flatnonzero(disputed):
            reasons[i] = (f"disputed correction: given {given[i]!r}, corrected to {classes[codes_all[i]]!r}, the "
                          f"label models suggest {classes[suggested_code[i]]!r} (confidence {confidence_all[i]:.2f})")
        table = pa.table({
            "label_quality": masked(quality, has_quality, pa.float32()),
            "suggested_label": suggested,
            "suggested_confidence": masked(confidence_all.astype(np.float32), suggested_code >= 0, pa.float32()),
            "is_suspected_mislabel": suspected,
            "is_disputed": disputed,
            REASON_COLUMN: pa.array(reasons, pa.string()),
        }).replace_schema_metadata({"label_models": json.dumps(info),  # for summary()
                                    **({"probe_state": state.to_bytes()} if state is not None else {})})
        # Moving label_quality_threshold changes only which of these are flagged: labelled items
        # the label models confidently disagree with, outside the rare tail, not corrected.
        open_to_it = has_quality & ~rare & confident & disagree & ~corrected
        threshold = ctx.config.label_quality_threshold
        sides = side_by_side(quality, np.flatnonzero(open_to_it), threshold, flagged_below=True)
        uri = ctx.columns.arrow("uri")

        def described(rows):
            return [{"uri": uri[int(r)].as_py(), "label": str(classes[codes_all[r]]),
                     "suggested_label": str(classes[suggested_code[r]]), "label_quality": round(float(quality[r]), 4)}
                    for r in rows]

        return with_evidence(table, {"label_quality_threshold": {
            "value": threshold,
            "flagged_at": one_sided_counts(quality, open_to_it, nearby(threshold, 0.05, 0.0, 1.0), below=True),
            "flagged": described(sides["flagged"]), "not_flagged": described(sides["not_flagged"])}})

    @staticmethod
    def _vote(ctx: ScoreContext, codes: np.ndarray, classes: np.ndarray):
        """Calibrated probabilities from the probe and the vote. Returns quality (NaN for
        unlabelled rows), suggested class code and its calibrated probability per ok row, the
        models' description and the probe's state for the next night (or None)."""
        n_classes = len(classes)
        state = None
        n_ok = len(codes)
        labelled = codes >= 0
        prior = np.bincount(codes[labelled], minlength=n_classes) / labelled.sum()
        groups_ok = ctx.column("dup_group")[ctx.ok_rows]
        group_vals = np.nan_to_num(np.asarray(groups_ok, np.float64), nan=-1).astype(np.int64)
        weight = ctx.config.label_probe_weight
        probe, info = None, {"probe": "off"}
        if weight > 0 and len(np.unique(codes[labelled])) > 1:
            keys = probe_keys(ctx.columns.table, ctx.ok_rows)
            top_classes, top_p, info["probe"], state = probe_probabilities(
                ctx.vectors, codes, n_classes, ctx.previous.get(LabelQualityScore.name), keys=keys,
                class_names=classes)
            probe = (top_classes, top_p)
        step = max(1024, BLOCK_CELLS // max(1, n_classes))
        blocks = [(lo, min(lo + step, n_ok)) for lo in range(0, n_ok, step)]

        def probabilities(lo: int, hi: int) -> np.ndarray:
            p = _vote_block(ctx.knn_ok, codes, group_vals, prior, lo, hi)
            if probe is not None:
                p = weight * _probe_block(*probe, prior, lo, hi) + (1.0 - weight) * p
            return p

        # Pass 1: each labelled row's probability of its own label -> per-class calibration t_c.
        p_own = np.zeros(n_ok, np.float64)
        for lo, hi in blocks:
            block_codes = codes[lo:hi]
            p_own[lo:hi] = probabilities(lo, hi)[np.arange(hi - lo), np.maximum(block_codes, 0)]
        counts = np.bincount(codes[labelled], minlength=n_classes)
        t = np.bincount(codes[labelled], weights=p_own[labelled], minlength=n_classes)
        t = np.maximum(np.where(counts > 0, t / np.maximum(counts, 1), 1.0), 1e-3)
        # Pass 2: calibrated probabilities q_i(c) = (p_i(c) / t_c) / z_i.
        quality = np.full(n_ok, np.nan, np.float32)
        suggested = np.full(n_ok, -1, np.int64)
        confidence = np.zeros(n_ok, np.float64)
        for lo, hi in blocks:
            q = probabilities(lo, hi) / t[None, :]
            q /= q.sum(axis=1, keepdims=True)
            rows = np.arange(hi - lo)
            block_codes = codes[lo:hi]
            quality[lo:hi] = np.where(block_codes >= 0, q[rows, np.maximum(block_codes, 0)], np.nan)
            suggested[lo:hi] = np.argmax(q, axis=1)
            confidence[lo:hi] = q[rows, suggested[lo:hi]]
        return np.where(labelled, quality, np.nan).astype(np.float32), suggested, confidence, info, state

    def load_previous(self, previous, samples: pa.Table):
        """The label probe ``previous`` fitted: its regularisation (kept instead of chosen
        again) and its models from ``label-probe.npz`` when it kept them (each fit starts
        there); None when it fitted none."""
        info = previous.info_or_none()
        probe = ((info.scores.get("label_quality") or {}).get("probe") or {}) if info is not None else {}
        if not (isinstance(probe, dict) and probe.get("C")):
            return None
        data = previous.probe_state()
        if data is None:  # kept by a run before this file existed
            return ProbeState(float(probe["C"]))
        try:
            state = ProbeState.from_bytes(data)
        except (OSError, ValueError, KeyError) as exc:
            log.info("label probe: the previous run's models cannot be read (%s); the fits start from zero",
                     str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
            return ProbeState(float(probe["C"]))
        return state if abs(state.c - float(probe["C"])) < 1e-12 else ProbeState(float(probe["C"]))

    def persist(self, table: pa.Table, run) -> None:
        """The probe's models, as ``label-probe.npz`` in tonight's run: the next night's fits
        start from them."""
        state = (table.schema.metadata or {}).get(b"probe_state")
        if state:
            write_bytes(run.child(PROBE_FILE), state)

    def summary(self, table: pa.Table) -> dict:
        metadata = (table.schema.metadata or {}).get(b"label_models", b"{}")
        return {"flags": count_true(table, *(f.column for f in self.flags)), **json.loads(metadata),
                "thresholds": evidence_of(table)}
