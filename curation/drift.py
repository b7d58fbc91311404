"""Drift between nights: a compact profile per run, compared with the previous published run's.

**The profile** (``profile.json`` and ``profile.parquet`` beside ``run.json``): the embedder's
``model_id``; label shares among the labelled ok items; the cluster centroids (each cluster's
normalised member mean) and shares; every declared flag's rate; the 1st percentile of the
items' k-th-neighbour similarity (so 99% of items have k neighbours at least this close); and
the vectors of a uniform sample of ``drift.sample_size`` ok items.

**The comparison** (``run.json`` → ``drift``; skipped, with the reason, on a first night, when
the previous run has no profile, or when the embedder's ``model_id`` changed):

* ``classes``: each label's share before and after, and their total-variation distance;
* ``clusters``: tonight's items assigned to yesterday's centroids, their shares against
  yesterday's (total variation, Jensen-Shannon divergence, the clusters that moved most);
* ``new_regions``: new items (a uri and fingerprint the previous run did not have) that are
  *far* (less similar to every old item than the previous run's 1st percentile of k-th-
  neighbour similarity) or *crowded by new items* (more new items among their k neighbours
  tonight than chance allows at tonight's share of new items), grouped by tonight's kNN edges
  among them. The graph rules out most new items at once (an old neighbour close enough); the
  rest are compared exactly with every old item, where the vectors are stored (Ray tasks), at
  most ``MAX_CANDIDATES`` of them (a uniform sample beyond, and the counts say so). Each
  region: its size, how many of it are far, the nearest previous cluster; every member is a
  row of ``drift.parquet`` (``uri, region, far, similarity_to_previous``);
* ``flags``: each flag's rate before and after;
* ``objects`` (detection runs): the ok annotated boxes' class and size shares before and after
  (:mod:`curation.object_profile`); a box class share that moved more than
  ``alarm_class_share_change`` fires the alarm;
* ``mmd``: a two-sample test between the two profiles' samples (maximum mean discrepancy, a
  Gaussian kernel with the median-distance bandwidth), with a permutation p-value; items in
  both samples are left out of tonight's. ``mmd_new_items``: the same test between the
  previous run's sample and tonight's new items alone (at least ``MIN_NEW_FOR_TEST``), which
  the items both nights share cannot dilute;
* ``alarm``: true when any rule fired; ``rules_fired`` says which, with the numbers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from curation.config import DriftConfig
from curation.drift_profile import SEED, Profile, build_profile, profile_sample_ids, shares_change  # noqa: F401 (public here too)
from curation.published_run import PublishedRun
from curation.index.source import CachedVectors, as_source, map_vectors
from curation.item_key import match_items
from curation.object_profile import box_profile, compare_boxes
from curation.schema import ok_rows_in_vector_order

log = logging.getLogger(__name__)

DRIFT_PARQUET = "drift.parquet"
MAX_CANDIDATES = 1024  # new items compared exactly with every old item (a uniform sample beyond)
CANDIDATE_BLOCK = 8192  # old vectors per matrix product in that comparison (bounded task memory)
PERMUTATION_BLOCK = 100
STOP_AFTER = 10  # permuted statistics at or above the observed one that end the test early
MIN_NEW_FOR_TEST = 20  # new items needed before they are tested on their own
REGIONS_LISTED = 20  # regions described in run.json (every member is in drift.parquet)
MIN_REGION_LISTED = 3  # a region is described from this many items (smaller ones are counted)
CROWDED_P = 1e-3  # binomial tail below which an item has too many new neighbours to be chance
CROWDED_MIN_SHARE = 0.7  # ... and at least this share of them new (an old class that grew keeps old neighbours)
EXAMPLES_PER_REGION = 6
MOVED_CLUSTERS_LISTED = 10


@dataclass
class DriftResult:
    """What the drift phase gives publication: tonight's profile, the ``run.json`` section and
    the new items in new regions (``drift.parquet``; None when the comparison was skipped)."""

    profile: Profile
    summary: dict
    new_region_items: pa.Table | None = None

    @property
    def alarm(self) -> bool:
        return bool(self.summary.get("alarm"))


# --------------------------------------------------------------------------- the comparison


def mmd_test(a: np.ndarray, b: np.ndarray, *, permutations: int = 200, seed: int = SEED) -> dict:
    """Maximum mean discrepancy between the rows of ``a`` and ``b`` (unit vectors): a Gaussian
    kernel whose bandwidth is the median squared distance, and a permutation p-value."""
    z = np.concatenate([a, b]).astype(np.float64)
    n, m = len(a), len(b)
    if n < 2 or m < 2:
        return {"statistic": None, "p_value": None, "permutations": 0, "note": "too few items"}
    gram = z @ z.T
    sq = np.diag(gram)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * gram, 0.0)
    off = d2[np.triu_indices(len(z), 1)]
    bandwidth = float(np.median(off)) or 1.0
    kernel = np.exp(-d2 / bandwidth).astype(np.float32)
    del gram, d2
    w = np.concatenate([np.full(n, 1.0 / n), np.full(m, -1.0 / m)]).astype(np.float32)
    statistic = float(w @ kernel @ w)
    rng = np.random.default_rng(seed)
    # Sequential (Besag-Clifford): stop once STOP_AFTER permuted statistics reach the observed
    # one; the p-value is then clearly above any alarm level, and a quiet night costs ~100
    # permutations instead of all of them.
    done = exceed = 0
    while done < permutations and exceed < STOP_AFTER:
        block = min(PERMUTATION_BLOCK, permutations - done)
        shuffled = np.stack([rng.permutation(w) for _ in range(block)], axis=1)
        exceed += int(np.sum(np.einsum("ip,ip->p", shuffled, kernel @ shuffled) >= statistic))
        done += block
    p_value = (1 + exceed) / (1 + done)
    return {"statistic": round(statistic, 6), "p_value": round(p_value, 6), "permutations": done,
            "bandwidth": round(bandwidth, 6), "items": [n, m]}


def _js(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence (natural log) of two distributions: scipy's distance, squared."""
    from scipy.spatial.distance import jensenshannon

    return float(jensenshannon(p, q) ** 2)


def _nearest_old(ids: np.ndarray, x: np.ndarray, queries: np.ndarray, is_new: np.ndarray) -> np.ndarray:
    """Per query, the best cosine to an old item (not new tonight) in this range of vectors."""
    best = np.full(len(queries), -np.inf, np.float32)
    old = ~is_new[ids]
    x = x[old]
    for start in range(0, len(x), CANDIDATE_BLOCK):
        block = x[start:start + CANDIDATE_BLOCK]
        if len(block):
            best = np.maximum(best, (queries @ block.T).max(axis=1))
    return best


def _graph_evidence(graph, is_new: np.ndarray, threshold: float, nearest_similarity: float):
    """What tonight's graph says of the new items (see :func:`find_new_regions`): their best
    similarity to an old neighbour, whether they are crowded by new items, and the far
    candidates to compare with every old item (at most ``MAX_CANDIDATES``, and how many there
    were)."""
    from scipy.stats import binom

    new_ids = np.flatnonzero(is_new)
    nb, sims = graph.ids[new_ids].astype(np.int64), graph.sims[new_ids]
    valid = nb >= 0
    neighbour_new = valid & is_new[np.maximum(nb, 0)]
    old_neighbour = valid & ~neighbour_new
    best_known = np.where(old_neighbour, sims, -np.inf).max(axis=1)
    close = best_known >= threshold
    # Crowded: this many new neighbours is unlikely at tonight's share of new items.
    share = float(is_new.mean())
    new_count, count = neighbour_new.sum(axis=1), np.maximum(valid.sum(axis=1), 1)
    tail = binom.sf(new_count - 1, count, share)
    crowded = (tail < CROWDED_P) & (new_count >= CROWDED_MIN_SHARE * count) & (best_known < nearest_similarity)
    candidates = new_ids[~close]
    total = len(candidates)
    if total > MAX_CANDIDATES:
        candidates = np.sort(np.random.default_rng(SEED).choice(candidates, MAX_CANDIDATES, replace=False))
    return best_known, crowded, candidates, total


def find_new_regions(graph, is_new: np.ndarray, threshold: float, vectors, *, nearest_similarity: float = 1.0,
                     previous_centroids: np.ndarray | None = None) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """New items in regions the previous run did not cover, grouped.

    A new item is in a new region when either
    * it is **far**: less similar than ``threshold`` (cosine) to every old item; or
    * it is **crowded by new items**: more of its k neighbours tonight are new than chance
      allows (binomial tail below ``CROWDED_P`` at tonight's share of new items), at least
      ``CROWDED_MIN_SHARE`` of them, and no old neighbour as close as the previous run's median
      nearest-neighbour similarity (``nearest_similarity``): an old class that grew overnight
      keeps close old neighbours. Far items are rare even for an unseen class (its nearest old
      item is usually closer than the previous run's loosest k-th neighbour), while an unseen
      class's neighbours are new.

    Returns ``(summary, member ids, their region, their best cosine to an old item: exact for
    the items compared with every old item, else the best among their graph neighbours, NaN
    when none is old)``; regions are numbered by size, largest first."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    source = as_source(vectors)
    new_ids = np.flatnonzero(is_new)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    summary = {"threshold_similarity": round(float(threshold), 6), "new_items": int(len(new_ids))}
    if len(new_ids) == 0 or (~is_new).sum() == 0:
        return {**summary, "far_items": 0, "crowded_items": 0, "regions": []}, *empty
    best_known, crowded, candidates, all_candidates = _graph_evidence(graph, is_new, threshold, nearest_similarity)
    summary["candidates"] = int(all_candidates)
    scale = all_candidates / max(len(candidates), 1) if all_candidates > len(candidates) else 1.0
    summary["candidates_searched"] = int(len(candidates))
    best = dict(zip(new_ids.tolist(), best_known.tolist()))
    far = np.zeros(0, np.int64)
    if len(candidates):
        exact = np.max(np.stack(map_vectors(source, _nearest_old, source.take(candidates), is_new)), axis=0)
        best.update(zip(candidates.tolist(), exact.tolist()))
        far = candidates[exact < threshold]
    summary["far_items"] = int(round(len(far) * scale))
    summary["crowded_items"] = int(crowded.sum())
    members = np.union1d(far, new_ids[crowded])
    if len(members) == 0:
        return {**summary, "regions": []}, *empty
    # Regions: members joined by tonight's kNN edges between them.
    position = np.full(len(is_new), -1, np.int64)
    position[members] = np.arange(len(members))
    nb = graph.ids[members].astype(np.int64)
    target = np.where(nb >= 0, position[np.maximum(nb, 0)], -1)
    keep = target >= 0
    rows = np.repeat(np.arange(len(members)), nb.shape[1])[keep.ravel()]
    edges = coo_matrix((np.ones(len(rows)), (rows, target.ravel()[keep.ravel()])), shape=(len(members),) * 2)
    _, component = connected_components(edges, directed=False)
    sizes = np.bincount(component)
    order = np.argsort(-sizes, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    region = rank[component]
    similarity = np.array([best.get(int(i), -np.inf) for i in members], np.float32)
    similarity[~np.isfinite(similarity)] = np.nan
    regions = []
    listed = [r for r in range(len(order)) if sizes[order[r]] >= MIN_REGION_LISTED][:REGIONS_LISTED]
    x_members = source.take(members[np.isin(region, listed)]) if listed else None
    listed_region = region[np.isin(region, listed)]
    for r in listed:
        inside = np.flatnonzero(region == r)
        entry = {"region": r, "items": int(len(inside)), "far": int(np.isin(members[inside], far).sum())}
        known = similarity[inside][np.isfinite(similarity[inside])]
        if len(known):
            entry["best_similarity_to_previous"] = round(float(known.max()), 4)
        if previous_centroids is not None and len(previous_centroids):
            mean = x_members[listed_region == r].mean(axis=0)
            mean /= max(float(np.linalg.norm(mean)), 1e-12)
            sims_c = previous_centroids @ mean
            entry["nearest_previous_cluster"] = int(np.argmax(sims_c))
            entry["nearest_previous_cluster_similarity"] = round(float(sims_c.max()), 4)
        regions.append(entry)
    summary["regions"] = regions
    summary["region_count"] = int(np.sum(sizes >= MIN_REGION_LISTED))
    return summary, members, region, similarity


def compare(previous: Profile, current: Profile, config: DriftConfig, *, on_previous: np.ndarray | None,
            regions: dict | None, new_sample: np.ndarray | None = None) -> dict:
    """The ``drift`` section: every statistic, then the alarm and the rules that fired."""
    classes, label_tv = shares_change(previous.label_shares, current.label_shares)
    out: dict = {"classes": {"labelled_before": previous.labelled, "labelled_after": current.labelled,
                             "tv": label_tv, "shares": classes}}
    fired = []
    if previous.labelled and current.labelled:
        moved = max(classes.items(), key=lambda kv: abs(kv[1]["change"]), default=None)
        if moved and abs(moved[1]["change"]) > config.alarm_class_share_change:
            fired.append(f"class {moved[0]!r} share moved {moved[1]['change']:+.3f} "
                         f"(more than {config.alarm_class_share_change})")
    if on_previous is not None and len(previous.cluster_shares):
        before = np.asarray(previous.cluster_shares, np.float64)
        after = on_previous / max(on_previous.sum(), 1)
        tv = 0.5 * float(np.abs(after - before).sum())
        moved = np.argsort(-np.abs(after - before), kind="stable")[:MOVED_CLUSTERS_LISTED]
        out["clusters"] = {"previous_clusters": len(before), "tv": round(tv, 6), "js": round(_js(before, after), 6),
                           "moved": [{"cluster": int(c), "before": round(float(before[c]), 6),
                                      "after": round(float(after[c]), 6)} for c in moved]}
        if tv > config.alarm_cluster_tv:
            fired.append(f"cluster shares moved by total variation {tv:.3f} (more than {config.alarm_cluster_tv})")
    flags, _ = shares_change(previous.flag_rates, current.flag_rates)
    out["flags"] = flags
    # Items in both samples are dropped from tonight's: the two nights share most of their
    # items, and shared rows would make the samples look alike whatever happened.
    shared = np.isin(np.asarray(current.sample_uris, dtype=object), np.asarray(previous.sample_uris, dtype=object))
    out["mmd"] = mmd_test(previous.sample, current.sample[~shared], permutations=config.permutations)
    p = out["mmd"].get("p_value")
    if p is not None and p < config.alarm_p_value:
        fired.append(f"tonight's items differ from the previous run's: MMD p-value {p:.2g} "
                     f"(below {config.alarm_p_value})")
    if new_sample is not None and len(new_sample) >= MIN_NEW_FOR_TEST:
        # The new arrivals alone against the previous run: old items do not dilute a change.
        out["mmd_new_items"] = mmd_test(previous.sample, new_sample, permutations=config.permutations)
        p = out["mmd_new_items"].get("p_value")
        if p is not None and p < config.alarm_p_value:
            fired.append(f"the new items differ from the previous run's: MMD p-value {p:.2g} "
                         f"(below {config.alarm_p_value})")
    if regions is not None:
        out["new_regions"] = regions
        big = [r for r in regions.get("regions", []) if r["items"] >= config.alarm_region_items]
        if big:
            fired.append(f"{len(big)} new region(s) of at least {config.alarm_region_items} items "
                         f"(largest {big[0]['items']})")
    if previous.objects and current.objects:  # a detection run's boxes: classes and sizes
        out["objects"], rules = compare_boxes(previous.objects, current.objects,
                                              alarm_class_share_change=config.alarm_class_share_change)
        fired += rules
    out["alarm"] = bool(fired)
    out["rules_fired"] = fired
    out["rules"] = {"alarm_p_value": config.alarm_p_value, "alarm_class_share_change": config.alarm_class_share_change,
                    "alarm_cluster_tv": config.alarm_cluster_tv, "alarm_region_items": config.alarm_region_items}
    return out


# ------------------------------------------------------------------------------- the phase


def new_item_mask(samples: pa.Table, previous: PublishedRun) -> np.ndarray:
    """Per vector id: the item is new tonight (its uri and fingerprint were not an ok item of
    the previous run)."""
    old = previous.items([])
    if old is None:
        raise OSError(f"cannot read the previous run's samples ({previous.uri})")
    return match_items(samples.take(pa.array(ok_rows_in_vector_order(samples), pa.int64())), old) < 0


def _new_sample_ids(is_new: np.ndarray, sample_size: int) -> np.ndarray:
    new_ids = np.flatnonzero(is_new)
    if len(new_ids) > sample_size:
        new_ids = np.sort(np.random.default_rng(SEED).choice(new_ids, sample_size, replace=False))
    return new_ids


def drift_phase(samples: pa.Table, vectors, graph, config: DriftConfig, *, model_id: str,
                previous: PublishedRun | None, centroids: np.ndarray | None = None,
                objects: pa.Table | None = None) -> DriftResult:
    """Tonight's profile and its comparison with the previous published run's (``objects``: a
    detection run's boxes, whose classes and sizes the profile keeps too)."""

    before = previous.profile() if previous is not None else None
    usable = before is not None and before.model_id == model_id
    source = as_source(vectors)
    is_new = None
    if usable and graph is not None and source.n:
        # Every vector this phase reads, in one read of the store: the profile's sample, the
        # new items' sample and the new-region candidates (the members are among them).
        is_new = new_item_mask(samples, previous)
        hints = [profile_sample_ids(source.n, config.sample_size), _new_sample_ids(is_new, config.sample_size)]
        if is_new.any() and (~is_new).any():
            _, crowded, candidates, _ = _graph_evidence(graph, is_new, before.kth_similarity, before.nearest_similarity)
            hints += [candidates, np.flatnonzero(is_new)[crowded]]
        vectors = CachedVectors(source, np.concatenate(hints))
    profile, on_previous = build_profile(samples, vectors, graph, model_id=model_id, sample_size=config.sample_size,
                                         previous_centroids=before.centroids if usable else None,
                                         centroids=centroids)
    profile.objects = box_profile(objects)
    if previous is None:
        return DriftResult(profile, {"skipped": "first night: no previous published run"})
    if before is None:
        return DriftResult(profile, {"skipped": f"the previous run ({previous.uri}) has no profile",
                                     "previous_run": previous.uri})
    if not usable:
        return DriftResult(profile, {"skipped": f"the embedder changed: {before.model_id!r} then, {model_id!r} now "
                                                f"(vectors of two embedders do not compare)",
                                     "previous_run": previous.uri})
    if is_new is None:
        is_new = new_item_mask(samples, previous)
    regions, members, region, best = find_new_regions(graph, is_new, before.kth_similarity, vectors,
                                                      nearest_similarity=before.nearest_similarity,
                                                  previous_centroids=before.centroids)
    new_ids = _new_sample_ids(is_new, config.sample_size)
    new_sample = as_source(vectors).take(new_ids) if len(new_ids) >= MIN_NEW_FOR_TEST else None
    summary = {"previous_run": previous.uri, **compare(before, profile, config, on_previous=on_previous,
                                                       regions=regions, new_sample=new_sample)}
    rows = ok_rows_in_vector_order(samples)[members]
    far = np.isfinite(best) & (best < before.kth_similarity)
    new_region_items = pa.table({"uri": samples["uri"].take(pa.array(rows, pa.int64())),
                                 "region": pa.array(region, pa.int32()), "far": pa.array(far),
                                 "similarity_to_previous": pa.array(best, pa.float32(), from_pandas=True)}).sort_by(
        [("region", "ascending"), ("similarity_to_previous", "ascending")])
    if summary["alarm"]:
        log.warning("drift alarm since %s: %s", previous.uri, "; ".join(summary["rules_fired"]))
    else:
        log.info("drift since %s: no alarm (MMD p=%s, %d new items in new regions)", previous.uri,
                 summary["mmd"].get("p_value"), len(members))
    return DriftResult(profile, summary, new_region_items)
