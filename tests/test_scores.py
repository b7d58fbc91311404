"""Each score on small constructed inputs with known answers."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from curation.config import ScoresConfig
from curation.index.knn import exact_knn
from curation.scores import run_scores
from curation.scores.clusters import choose_n_clusters, cluster_vectors
from curation.scores.duplicates import phash_pairs
from curation.scores.sparseness import rank_normalise


def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_samples(n, *, labels=None, status=None, brightness=None, contrast=None, sharpness=None,
                 content=None, pixel=None, phash=None, width=None, shadows=None, highlights=None):
    def col(v, default):
        return v if v is not None else default
    mean = np.asarray(col(brightness, [0.5] * n), np.float64)
    spread = 2 * np.asarray(col(contrast, [0.2] * n), np.float64)  # percentiles ~ mean -/+ 2 std
    return pa.table({
        "input_id": np.arange(n, dtype=np.int64),
        "uri": [f"/d/{i:03d}.jpg" for i in range(n)],
        "label": pa.array(col(labels, [None] * n), pa.string()),
        "status": col(status, ["ok"] * n),
        "reason": pa.nulls(n, pa.string()),
        "width": np.asarray(col(width, [100] * n), np.int32),
        "height": np.full(n, 100, np.int32),
        "brightness": np.asarray(col(brightness, [0.5] * n), np.float32),
        "contrast": np.asarray(col(contrast, [0.2] * n), np.float32),
        "sharpness": np.asarray(col(sharpness, [1.0] * n), np.float32),
        "shadows": np.asarray(col(shadows, np.clip(mean - spread, 0, 1)), np.float32),
        "highlights": np.asarray(col(highlights, np.clip(mean + spread, 0, 1)), np.float32),
        "content_hash": pa.array(col(content, [f"c{i}" for i in range(n)]), pa.string()),
        "pixel_hash": pa.array(col(pixel, [f"p{i}" for i in range(n)]), pa.string()),
        "phash": np.asarray(col(phash, np.random.default_rng(0).integers(-2**62, 2**62, n)), np.int64),
    })


def score(samples, emb, k=5, **cfg):
    ok = np.array(samples["status"].to_pylist()) == "ok"
    emb_ok = unit(emb)[ok]
    knn = exact_knn(emb_ok, k)
    out, _ = run_scores(samples, emb_ok, knn, ScoresConfig(**cfg))
    return out.to_pandas()


def blobs(n_per, centers, spread=0.05, seed=0, dim=16):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, dim))
    return np.concatenate([c[i] + spread * rng.normal(size=(n_per, dim)) for i in range(centers)])


def test_junk_flags():
    # under-exposed, over-exposed, washed out, blurry, clean, flat, a night shot (dark on average,
    # but its lights are bright), a snow scene (bright on average, with dark details), light sand
    # (no dark pixel, but a full range of light tones)
    df = score(make_samples(9, brightness=[0.05, 0.95, 0.75, 0.5, 0.5, 0.5, 0.1, 0.85, 0.78],
                            contrast=[0.03, 0.03, 0.03, 0.2, 0.2, 0.005, 0.15, 0.12, 0.08],
                            shadows=[0.0, 0.9, 0.68, 0.1, 0.1, 0.49, 0.0, 0.2, 0.6],
                            highlights=[0.15, 1.0, 0.85, 0.9, 0.9, 0.51, 0.95, 1.0, 0.95],
                            sharpness=[1, 1, 1, 0.01, 1, 0.0, 1, 1, 1]), blobs(9, 1, spread=1.0))
    assert df.is_dark.tolist() == [True, False, False, False, False, False, False, False, False]
    assert df.is_bright.tolist() == [False, True, True, False, False, False, False, False, False]
    assert df.is_blurry.tolist() == [False, False, False, True, False, False, False, False, False]  # flat: not blurry
    assert df.is_low_information.tolist() == [False, False, False, False, False, True, False, False, False]
    assert "dark" in df.reason[0] and pd_isna(df.reason[4]) and pd_isna(df.reason[6])


def test_exact_duplicates_by_bytes_and_by_pixels_keep_the_best():
    emb = blobs(8, 1, spread=1.0, seed=3)
    content = [f"c{i}" for i in range(8)]
    pixel = [f"p{i}" for i in range(8)]
    content[5] = content[1]  # same bytes
    pixel[6] = pixel[2]  # same pixels, different encoding
    df = score(make_samples(8, content=content, pixel=pixel, width=[100, 50, 100, 100, 100, 100, 100, 100]), emb)
    assert df.dup_group[1] == df.dup_group[5] == 1 and df.dup_group[2] == df.dup_group[6] == 2
    assert df.dup_of[1] == "/d/005.jpg" and pd_isna(df.dup_of[5])  # larger image kept
    assert df.dup_of[6] == "/d/002.jpg" and df.dup_kind[6] == "exact"
    assert df.dup_group[[0, 3, 4, 7]].isna().all()


def test_near_duplicates_by_embedding_chain_into_one_group():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(10, 32))
    emb[7] = emb[3] + 0.01 * rng.normal(size=32)
    emb[8] = emb[7] + 0.01 * rng.normal(size=32)
    df = score(make_samples(10), emb, near_duplicate_cosine=0.99)
    assert df.dup_group[3] == df.dup_group[7] == df.dup_group[8] == 3
    assert sorted(df.dup_of.dropna()) == ["/d/003.jpg", "/d/003.jpg"]
    assert df.dup_group.notna().sum() == 3


def test_near_duplicates_by_perceptual_hash_need_embedding_agreement():
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(6, 32))
    emb[1] = emb[0] + 0.4 * rng.normal(size=32)  # cosine ~0.9: below the embedding threshold
    hashes = rng.integers(-2**62, 2**62, 6)
    hashes[1] = hashes[0] ^ 0b111  # 3 bits apart
    hashes[3] = hashes[2] ^ 0b1  # hash collision between unrelated images
    df = score(make_samples(6, phash=hashes), emb, near_duplicate_cosine=0.99, near_duplicate_hamming=4)
    assert df.dup_group[0] == df.dup_group[1] == 0
    assert pd_isna(df.dup_group[2]) and pd_isna(df.dup_group[3])


def pd_isna(v):
    return v is None or v != v


def test_phash_pairs_radius():
    hashes = np.array([0, 0b1111, 0b1, -1], np.int64)
    left, right = phash_pairs(hashes, 1)
    assert sorted(zip(left.tolist(), right.tolist())) == [(0, 2)]


def test_rejected_items_get_no_scores():
    df = score(make_samples(6, status=["ok", "ok", "rejected", "ok", "ok", "ok"]), blobs(6, 1))
    assert df.cluster[2] == -1 and pd_isna(df.sparseness[2]) and not df.is_dark[2]
    assert df.sparseness.notna().sum() == 5


def test_sparseness_ranks_the_outlier_highest():
    emb = blobs(20, 1, spread=0.05, seed=4)
    emb[13] = -emb[0] * 3  # far away
    df = score(make_samples(20), emb)
    assert df.sparseness.idxmax() == 13 and df.sparseness.max() == 1.0 and df.sparseness.min() == 0.0
    np.testing.assert_allclose(rank_normalise(np.array([3.0, 1.0, 2.0])), [1.0, 0.0, 0.5])


def test_label_quality_flags_the_flipped_label():
    emb = blobs(15, 3, spread=0.35, seed=5)
    labels = ["a"] * 15 + ["b"] * 15 + ["c"] * 15
    labels[4] = "c"  # flipped
    df = score(make_samples(45, labels=labels), emb, k=8)
    assert df.label_quality.idxmin() == 4 and df.suggested_label[4] == "a"
    assert df.is_suspected_mislabel.tolist().count(True) == 1 and df.is_suspected_mislabel[4]
    assert df.label_quality.drop(4).min() > 0.5


def test_labels_unrelated_to_the_embedding_are_not_flagged_wholesale():
    """A non-semantic embedder spreads the votes over every class: low quality everywhere,
    and few confident suggestions, so far fewer suspected mislabels than without the floor."""
    rng = np.random.default_rng(11)
    emb = rng.normal(size=(300, 16))
    labels = [str(c) for c in rng.integers(0, 6, 300)]
    df = score(make_samples(300, labels=labels), emb, k=10)
    assert (df.label_quality < 0.3).mean() > 0.2  # the quality itself does say "unsure"
    loose = score(make_samples(300, labels=labels), emb, k=10, mislabel_min_confidence=0.0)
    assert loose.is_suspected_mislabel.mean() > 3 * df.is_suspected_mislabel.mean()  # measured: 0.80 vs 0.21


def test_a_duplicate_does_not_vote_for_its_twin():
    emb = blobs(12, 2, spread=0.35, seed=6)
    labels = ["a"] * 12 + ["b"] * 12
    emb[24 - 1] = emb[3] + 1e-4  # item 23 is a near copy of item 3 (cluster a) ...
    labels[3] = labels[23] = "b"  # ... and both carry the same wrong label
    df = score(make_samples(24, labels=labels), emb, k=6)
    assert df.dup_group[3] == df.dup_group[23]
    assert df.is_suspected_mislabel[3] and df.is_suspected_mislabel[23]
    assert df.suggested_label[3] == "a"


def test_rare_class_is_not_drowned_by_a_frequent_one():
    rng = np.random.default_rng(7)
    big = rng.normal(size=(1, 16)) + 0.3 * rng.normal(size=(60, 16))
    small = big[:1] + 1.0 * rng.normal(size=(1, 16)) + 0.3 * rng.normal(size=(6, 16))  # near the big class
    emb = np.concatenate([big, small])
    labels = ["big"] * 60 + ["rare"] * 6
    df = score(make_samples(66, labels=labels), emb, k=10)
    # Calibration keeps most of the rare class's own labels trusted.
    assert df.is_suspected_mislabel[60:].sum() <= 1
    assert (df.suggested_label[60:] == "rare").sum() >= 5


def test_unlabelled_items_have_null_label_quality():
    df = score(make_samples(10, labels=[None] * 5 + ["a"] * 5), blobs(10, 1))
    assert df.label_quality[:5].isna().all() and df.label_quality[5:].notna().all()
    nothing = score(make_samples(10), blobs(10, 1))  # nothing labelled: nothing to suggest
    assert nothing.suggested_label.isna().all() and nothing.suggested_confidence.isna().all()


def test_unlabelled_items_get_a_suggestion_and_its_confidence():
    """Pre-annotations: every ok item, labelled or not, gets the label models' suggestion and
    its calibrated probability; an unlabelled item is never a suspected mislabel."""
    emb = blobs(20, 3, spread=0.3, seed=9)
    truth = [c for c in "abc" for _ in range(20)]
    labels = [t if i % 20 < 10 else None for i, t in enumerate(truth)]  # half of each class unlabelled
    df = score(make_samples(60, labels=labels, status=["ok"] * 59 + ["rejected"]), emb, k=6)
    unlabelled = df[df.label.isna() & (df.status == "ok")]
    assert len(unlabelled) == 29 and unlabelled.label_quality.isna().all()
    assert (unlabelled.suggested_label == [truth[i] for i in unlabelled.index]).mean() >= 0.9
    assert unlabelled.suggested_confidence.between(1 / 3, 1.0).all()
    assert unlabelled.suggested_confidence.mean() > 0.6  # separated blobs: confident suggestions
    assert not unlabelled.is_suspected_mislabel.any()
    assert np.isnan(df.suggested_confidence[59]) and df.suggested_label.isna()[59]  # rejected: none
    labelled = df[df.label.notna()]
    assert labelled.suggested_confidence.notna().all()


def test_clusters_recover_separated_blobs():
    emb = unit(blobs(30, 3, spread=0.02, seed=8))
    labels, sims, _, _ = cluster_vectors(emb, 3)
    for start in (0, 30, 60):
        assert len(set(labels[start:start + 30])) == 1
    assert len(set(labels)) == 3 and sims.min() > 0.9
    assert choose_n_clusters(1) == 1 and choose_n_clusters(50) == 5 and choose_n_clusters(10**7) == 256
    assert choose_n_clusters(10**6, budget=40) == 40 and choose_n_clusters(10**6, budget=1) == 2
    assert choose_n_clusters(10**6, requested=300, budget=40) == 300  # an explicit k wins


def test_knn_excludes_self_even_among_identical_vectors():
    emb = unit(np.repeat(np.eye(4, dtype=np.float32), 3, axis=0))  # 4 groups of 3 identical vectors
    graph = exact_knn(emb, 4)
    for i in range(12):
        assert i not in graph.ids[i]
        group = set(range(i // 3 * 3, i // 3 * 3 + 3)) - {i}
        assert set(graph.ids[i][:2]) == group
    small = exact_knn(emb[:3], 10)  # k larger than N - 1: padded with -1
    assert (small.ids[:, 2:] == -1).all() and (small.ids[:, :2] >= 0).all()


@pytest.mark.parametrize("n", [0, 1])
def test_tiny_inputs(n):
    df = score(make_samples(n), np.ones((n, 4))) if n else None
    if n:
        assert df.cluster[0] == 0 and df.sparseness[0] == 0.5
