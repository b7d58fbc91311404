"""What to label next: the ranking behind the ``to_label`` selection mode.

Given the vectors of the labelled items and of the candidates (unlabelled, eligible), pick
``budget`` candidates that buy the most model per label. Every rule is here, side by side, so
``benchmarks/active_learning.py`` measures exactly what the mode runs:

* ``random``: a seeded permutation (the baseline every rule must beat).
* ``uncertainty``: the label models' least confident suggestions first (lowest
  ``suggested_confidence``).
* ``coverage``: a farthest-first traversal (greedy k-center, the core-set rule) seeded by the
  labelled items: each pick is the candidate farthest from everything labelled or picked.
* ``typical``: TypiClust-style. The labelled items and the candidates are split into
  ``labelled + budget`` regions by spherical k-means; the regions that hold no labelled item
  are visited largest first and each gives its most typical candidate (typicality: the
  inverse of the kNN outlier score, so the picks are dense, central examples, not outliers).
  Once every region holds a label or a pick, the largest regions per label-or-pick give more.
* ``combined`` (the default): the ``typical`` regions and order; inside a region, the
  candidate with the best ``typicality * uncertainty`` -- a central example the label models
  are unsure of. Without suggestions (nothing labelled yet) it is ``typical``.

Regions are bounded (``MAX_REGIONS``) and k-means trains on a bounded sample, so the cost does
not grow with millions of candidates; the caller passes a bounded candidate sample.
"""

from __future__ import annotations

import numpy as np

from curation.cover import farthest_first

RULES = ("combined", "typical", "coverage", "uncertainty", "random")
MAX_REGIONS = 4096
KMEANS_POINTS_PER_REGION = 32  # k-means trains on at most this many points per region
KMEANS_ITERATIONS = 10
SEED = 1234


def rank_for_labelling(x: np.ndarray, labelled: np.ndarray, budget: int, *, typicality: np.ndarray,
                       uncertainty: np.ndarray | None = None, rule: str = "combined",
                       seed: int = SEED) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Pick up to ``budget`` rows of ``x`` that are not ``labelled``.

    Args:
        x: L2-normalised vectors, labelled items and candidates together (n, d).
        labelled: which rows are labelled (never picked; they count as covered).
        budget: how many to pick.
        typicality: per row, higher = more central (e.g. 1 - sparseness).
        uncertainty: per row in [0, 1], higher = the label models are less sure (e.g.
            1 - suggested_confidence); None when there are no suggestions.
        rule: one of :data:`RULES`.

    Returns:
        ``(rows, scores, reasons)``: picked row indices in order (best first), the score each
        was picked by, and a short reason each.
    """
    if rule not in RULES:
        raise ValueError(f"labelling rule: expected {' | '.join(RULES)}, got {rule!r}")
    labelled = np.asarray(labelled, bool)
    candidates = np.flatnonzero(~labelled)
    budget = int(min(budget, len(candidates)))
    if budget <= 0:
        return np.zeros(0, np.int64), np.zeros(0), []
    if rule == "random":
        rows = np.random.default_rng(seed).permutation(candidates)[:budget]
        return rows, np.zeros(budget), ["random pick"] * budget
    if rule == "uncertainty":
        if uncertainty is None:
            raise ValueError("labelling rule 'uncertainty' needs the label models' suggestions")
        order = candidates[np.argsort(-uncertainty[candidates], kind="stable")][:budget]
        return order, uncertainty[order], [f"uncertain: suggestion confidence {1 - uncertainty[r]:.2f}"
                                           for r in order]
    if rule == "coverage":
        return _coverage(x, labelled, candidates, budget)
    weight = typicality.astype(np.float64)
    if rule == "combined" and uncertainty is not None:
        weight = weight * np.clip(uncertainty, 0.0, 1.0)
    return _typical_regions(x, labelled, budget, weight, typicality, uncertainty if rule == "combined" else None,
                            seed)


def _coverage(x, labelled, candidates, budget):
    """Greedy k-center over the candidates, the labelled items already centres."""
    import faiss


    xc = np.ascontiguousarray(x[candidates], np.float32)
    if labelled.any():
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(np.ascontiguousarray(x[labelled], np.float32))
        sims, _ = index.search(xc, 1)
        picked, gaps = farthest_first(xc, budget, nearest=1.0 - sims[:, 0])
    else:  # nothing labelled: start at the most central candidate
        picked, gaps = farthest_first(xc, budget, start=int(np.argmax(xc @ xc.mean(axis=0))))
    rows = candidates[np.array(picked, np.int64)]
    return rows, np.array(gaps), [f"coverage: cosine distance {g:.3f} from everything labelled or picked"
                                  for g in gaps]


def regions(x: np.ndarray, n_regions: int, seed: int = SEED) -> np.ndarray:
    """Spherical k-means region of every row (trained on a bounded sample)."""
    import faiss

    n_regions = int(max(1, min(n_regions, MAX_REGIONS, len(x))))
    if n_regions == 1:
        return np.zeros(len(x), np.int64)
    data = np.ascontiguousarray(x, np.float32)
    km = faiss.Kmeans(data.shape[1], n_regions, niter=KMEANS_ITERATIONS, seed=seed, spherical=True,
                      max_points_per_centroid=KMEANS_POINTS_PER_REGION, min_points_per_centroid=1, verbose=False)
    km.train(data)
    _, assigned = km.index.search(data, 1)
    return assigned.ravel().astype(np.int64)


def _typical_regions(x, labelled, budget, weight, typicality, uncertainty, seed):
    owner = regions(x, int(labelled.sum()) + budget, seed)
    n_regions = int(owner.max()) + 1
    sizes = np.bincount(owner, minlength=n_regions).astype(np.float64)
    covered = np.bincount(owner[labelled], minlength=n_regions).astype(np.float64)
    # Candidates of every region, best weight first.
    cand = np.flatnonzero(~labelled)
    cand = cand[np.lexsort((-weight[cand], owner[cand]))]
    starts = np.searchsorted(owner[cand], np.arange(n_regions))
    ends = np.searchsorted(owner[cand], np.arange(n_regions), side="right")
    taken = starts.copy()
    rows, scores, reasons = [], [], []
    while len(rows) < budget:
        open_ = taken < ends
        if not open_.any():
            break
        # Largest region per label-or-pick first: uncovered regions (0 labels) come first of all.
        need = np.where(open_, sizes / (1.0 + covered), -np.inf)
        # Many regions at once, in that order, before the needs are recomputed.
        for region in np.argsort(-need, kind="stable")[: max(1, min(budget - len(rows), int(open_.sum())))]:
            if not np.isfinite(need[region]) or len(rows) >= budget:
                break
            row = int(cand[taken[region]])
            taken[region] += 1
            first = covered[region] == 0
            covered[region] += 1
            rows.append(row)
            scores.append(float(weight[row]))
            what = f"typical of region {region} ({int(sizes[region])} items, " + (
                "no labelled item yet)" if first else f"{int(covered[region]) - 1} labelled or picked)")
            if uncertainty is not None:
                what += f"; suggestion confidence {1 - uncertainty[row]:.2f}"
            reasons.append(what)
    return np.array(rows, np.int64), np.array(scores), reasons
