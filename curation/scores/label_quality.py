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

from curation.scores.base import REASON_COLUMN, ScoreContext, count_true, masked

TEMPERATURE = 0.1
PRIOR_WEIGHT = 0.1


class LabelQualityScore:
    name = "label_quality"
    columns = ("label_quality", "suggested_label", "is_suspected_mislabel")

    def compute(self, ctx: ScoreContext) -> pa.Table:
        n = ctx.n
        ok_rows = ctx.ok_rows
        labels_all = ctx.column("label")
        labels = labels_all[ok_rows]
        labelled = np.array([lab is not None and lab == lab for lab in labels], bool)
        quality_ok = np.full(len(ok_rows), np.nan, np.float32)
        suggested_ok = np.empty(len(ok_rows), dtype=object)
        confidence_ok = np.zeros(len(ok_rows), np.float64)
        if labelled.any():
            classes, codes_l = np.unique(labels[labelled].astype(str), return_inverse=True)
            n_classes = len(classes)
            codes = np.full(len(ok_rows), -1, np.int64)
            codes[labelled] = codes_l
            prior = np.bincount(codes_l, minlength=n_classes) / len(codes_l)

            graph = ctx.knn_ok
            ids = graph.ids
            valid = ids >= 0
            neighbour_codes = np.where(valid, codes[np.maximum(ids, 0)], -1)
            groups_ok = ctx.column("dup_group")[ok_rows]
            has_group = np.array([g is not None and g == g for g in groups_ok], bool)
            group_vals = np.where(has_group, np.nan_to_num(groups_ok.astype(np.float64), nan=-1), -1).astype(np.int64)
            own_group = group_vals[:, None]
            their_group = np.where(valid, group_vals[np.maximum(ids, 0)], -1)
            same_group = (own_group >= 0) & (their_group == own_group)
            usable = valid & (neighbour_codes >= 0) & ~same_group
            sims = graph.sims.astype(np.float64)
            # Relative to each item's closest usable neighbour, so the prior's weight means the
            # same in dense and sparse regions.
            best = np.max(np.where(usable, sims, -np.inf), axis=1, keepdims=True)
            best = np.where(np.isfinite(best), best, 0.0)
            weights = np.where(usable, np.exp((sims - best) / TEMPERATURE), 0.0)

            votes = np.zeros((len(ok_rows), n_classes))
            rows = np.repeat(np.arange(len(ok_rows)), ids.shape[1])
            np.add.at(votes, (rows[usable.ravel()], neighbour_codes.ravel()[usable.ravel()]),
                      weights.ravel()[usable.ravel()])
            p = (votes + PRIOR_WEIGHT * prior) / (votes.sum(axis=1, keepdims=True) + PRIOR_WEIGHT)
            lab_idx = np.flatnonzero(labelled)
            thresholds = np.array([
                p[lab_idx[codes_l == c], c].mean() if np.any(codes_l == c) else 1.0 for c in range(n_classes)
            ])
            q = p / np.maximum(thresholds, 1e-3)
            q /= q.sum(axis=1, keepdims=True)
            quality_ok[lab_idx] = q[lab_idx, codes[lab_idx]]
            suggested_ok[lab_idx] = classes[np.argmax(q[lab_idx], axis=1)]
            confidence_ok[lab_idx] = q[lab_idx].max(axis=1)

        quality = ctx.scatter(quality_ok, np.nan, np.float32)
        suggested = ctx.scatter(suggested_ok, None, object)
        has_quality = np.isfinite(quality)
        # An item in the rarest tail has no peers to vote on its label: it is an edge case,
        # not a suspected mislabel (its label_quality is still reported).
        rare = np.nan_to_num(ctx.column("sparseness").astype(np.float64), nan=1.0) > ctx.config.rare_tail_quantile
        confident = ctx.scatter(confidence_ok, 0.0, np.float64) >= ctx.config.mislabel_min_confidence
        suspected = has_quality & ~rare & confident & (quality < ctx.config.label_quality_threshold) & np.array(
            [s is not None and s != lab for s, lab in zip(suggested, labels_all)], bool)
        reasons = np.empty(n, dtype=object)
        for i in np.flatnonzero(suspected):
            reasons[i] = (f"suspected mislabel: labelled {labels_all[i]!r}, neighbours suggest "
                          f"{suggested[i]!r} (label quality {quality[i]:.2f})")
        return pa.table({
            "label_quality": masked(quality, has_quality, pa.float32()),
            "suggested_label": pa.array(suggested, pa.string()),
            "is_suspected_mislabel": suspected,
            REASON_COLUMN: pa.array(reasons, pa.string()),
        })

    def summary(self, table: pa.Table) -> dict:
        return {"flags": count_true(table, "is_suspected_mislabel")}
