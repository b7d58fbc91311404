"""Label quality and suggested label from similarity-weighted kNN votes.

For a labelled ok item i with neighbours j (labelled, not in i's duplicate group -- a copy
must not vote for its twin):

1. vote weights ``w_j = exp((sim_ij - max_j' sim_ij') / T)`` with ``T = TEMPERATURE``
   (closer neighbours count more; the closest usable neighbour weighs 1);
2. ``p_i(c) = (sum_j w_j [y_j = c] + PRIOR_WEIGHT * pi_c) / (sum_j w_j + PRIOR_WEIGHT)``, where
   ``pi_c`` is the class frequency (a neighbour-less item falls back to the prior);
3. per-class calibration (as in confident learning): ``t_c`` = mean ``p_i(c)`` over items
   labelled c, and ``q_i(c) = (p_i(c) / t_c) / sum_c' (p_i(c') / t_c')`` -- a rare class whose
   members see fewer same-class neighbours is not drowned by frequent ones;
4. ``label_quality = q_i(y_i)`` in [0, 1]; ``suggested_label = argmax_c q_i(c)``;
   ``is_suspected_mislabel`` when the suggestion differs, quality <
   ``scores.label_quality_threshold``, the suggestion's own calibrated probability is at least
   ``scores.mislabel_min_confidence`` (with a weak or non-semantic embedder votes spread over
   many classes: on CIFAR-10 with the thumbnail embedder this floor takes the flagged share from
   60% to 10%, while on MNIST it keeps 94 of 95.6% of the recall) and the item is not in the
   rarest tail (sparseness > ``scores.rare_tail_quantile``: isolated items have no peers to
   judge their label by).

Unlabelled items get nulls.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.scores.base import REASON_COLUMN, ScoreContext, count_true, masked

TEMPERATURE = 0.1
PRIOR_WEIGHT = 0.1
VOTE_BLOCK = 65536  # rows whose votes are materialised at once


def _block_votes(graph, codes: np.ndarray, group_vals: np.ndarray, prior: np.ndarray, lo: int, hi: int):
    """Votes of rows ``[lo, hi)``: the probability of the row's own label, and per neighbour
    column the class it names, whether it is that class's first column, that class's
    probability, and each row's prior share ``PRIOR_WEIGHT / total`` (times ``prior[c]``)."""
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
    total = weights.sum(axis=1) + PRIOR_WEIGHT
    cls = np.where(usable, neighbour_codes, -1)
    vote = np.zeros_like(weights)
    first = np.zeros_like(usable)
    for j in range(cls.shape[1]):
        same = (cls == cls[:, j:j + 1]) & usable
        vote[:, j] = np.where(usable[:, j], (weights * same).sum(axis=1), 0.0)
        first[:, j] = usable[:, j] & ~same[:, :j].any(axis=1)
    p_voted = (vote + PRIOR_WEIGHT * prior[np.maximum(cls, 0)]) / total[:, None]
    block_codes = codes[lo:hi]
    own_vote = np.where(cls == block_codes[:, None], vote, 0.0).max(axis=1, initial=0.0)
    own = (own_vote + PRIOR_WEIGHT * prior[np.maximum(block_codes, 0)]) / total
    return own, cls, first, p_voted, PRIOR_WEIGHT / total


class LabelQualityScore:
    name = "label_quality"
    columns = ("label_quality", "suggested_label", "is_suspected_mislabel")

    def compute(self, ctx: ScoreContext) -> pa.Table:
        n = ctx.n
        ok_rows = ctx.ok_rows
        n_ok = len(ok_rows)
        # Labels as dictionary codes (no per-row Python strings); -1 = unlabelled.
        encoded = pc.dictionary_encode(ctx.columns.arrow("label")).combine_chunks()
        classes = np.asarray(encoded.dictionary.to_pylist(), dtype=object)
        codes_all = np.nan_to_num(encoded.indices.to_numpy(zero_copy_only=False).astype(np.float64), nan=-1)
        codes_all = codes_all.astype(np.int64)
        codes = codes_all[ok_rows]
        labelled = codes >= 0
        quality_ok = np.full(n_ok, np.nan, np.float32)
        suggested_code_ok = np.full(n_ok, -1, np.int64)
        confidence_ok = np.zeros(n_ok, np.float64)
        if labelled.any():
            quality_ok, suggested_code_ok, confidence_ok = self._vote(ctx, codes, len(classes))
        quality = ctx.scatter(quality_ok, np.nan, np.float32)
        suggested_code = ctx.scatter(suggested_code_ok, -1, np.int64)
        has_quality = np.isfinite(quality)
        # An item in the rarest tail has no peers to vote on its label: it is an edge case,
        # not a suspected mislabel (its label_quality is still reported).
        rare = np.nan_to_num(ctx.column("sparseness").astype(np.float64), nan=1.0) > ctx.config.rare_tail_quantile
        confident = ctx.scatter(confidence_ok, 0.0, np.float64) >= ctx.config.mislabel_min_confidence
        suspected = (has_quality & ~rare & confident & (quality < ctx.config.label_quality_threshold)
                     & (suggested_code >= 0) & (suggested_code != codes_all))
        suggested = pa.DictionaryArray.from_arrays(pa.array(suggested_code, pa.int32(), mask=suggested_code < 0),
                                                   encoded.dictionary).cast(pa.string())
        reasons = np.empty(n, dtype=object)
        for i in np.flatnonzero(suspected):
            reasons[i] = (f"suspected mislabel: labelled {classes[codes_all[i]]!r}, neighbours suggest "
                          f"{classes[suggested_code[i]]!r} (label quality {quality[i]:.2f})")
        return pa.table({
            "label_quality": masked(quality, has_quality, pa.float32()),
            "suggested_label": suggested,
            "is_suspected_mislabel": suspected,
            REASON_COLUMN: pa.array(reasons, pa.string()),
        })

    @staticmethod
    def _vote(ctx: ScoreContext, codes: np.ndarray, n_classes: int):
        """Calibrated neighbour votes, kept sparse: only the (at most k) classes a row's neighbours
        name are materialised, every other class holds its prior share, so memory is O(k) per
        row whatever the number of classes, and rows are processed in blocks. Returns quality,
        suggested class code and its calibrated probability per ok row (NaN / -1 / 0 for
        unlabelled rows)."""
        n_ok = len(codes)
        labelled = codes >= 0
        prior = np.bincount(codes[labelled], minlength=n_classes) / labelled.sum()
        groups_ok = ctx.column("dup_group")[ctx.ok_rows]
        group_vals = np.nan_to_num(np.asarray(groups_ok, np.float64), nan=-1).astype(np.int64)
        blocks = [(lo, min(lo + VOTE_BLOCK, n_ok)) for lo in range(0, n_ok, VOTE_BLOCK)]
        # Pass 1: each labelled row's probability of its own label -> per-class calibration t_c.
        p_own = np.empty(n_ok, np.float64)
        for lo, hi in blocks:
            p_own[lo:hi] = _block_votes(ctx.knn_ok, codes, group_vals, prior, lo, hi)[0]
        counts = np.bincount(codes[labelled], minlength=n_classes)
        t = np.bincount(codes[labelled], weights=p_own[labelled], minlength=n_classes)
        t = np.maximum(np.where(counts > 0, t / np.maximum(counts, 1), 1.0), 1e-3)
        scaled_prior = prior / t
        prior_class = int(np.argmax(scaled_prior))
        # Pass 2: calibrated probabilities q_i(c) = (p_i(c) / t_c) / z_i.
        quality = np.full(n_ok, np.nan, np.float32)
        suggested = np.full(n_ok, -1, np.int64)
        confidence = np.zeros(n_ok, np.float64)
        for lo, hi in blocks:
            own, cls, first, p_voted, p_prior = _block_votes(ctx.knn_ok, codes, group_vals, prior, lo, hi)
            safe = np.maximum(cls, 0)
            named = np.where(first, p_voted / t[safe], 0.0)
            # Normaliser: named classes with their votes, every other class with its prior share.
            named_prior = np.where(first, p_prior[:, None] * scaled_prior[safe], 0.0).sum(axis=1)
            z = named.sum(axis=1) + p_prior * scaled_prior.sum() - named_prior
            block_codes = codes[lo:hi]
            quality[lo:hi] = np.where(block_codes >= 0, own / t[np.maximum(block_codes, 0)] / z, np.nan)
            # The most probable class: the best named class, or the best class by prior alone.
            best_col = np.argmax(named, axis=1)
            best_named = named[np.arange(hi - lo), best_col]
            prior_value = p_prior * scaled_prior[prior_class]
            use_prior = prior_value > best_named
            suggested[lo:hi] = np.where(use_prior, prior_class, cls[np.arange(hi - lo), best_col])
            confidence[lo:hi] = np.where(use_prior, prior_value, best_named) / z
        return (np.where(labelled, quality, np.nan).astype(np.float32), np.where(labelled, suggested, -1),
                np.where(labelled, confidence, 0.0))

    def summary(self, table: pa.Table) -> dict:
        return {"flags": count_true(table, "is_suspected_mislabel")}
