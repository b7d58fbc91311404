"""Drift between nights: the statistics on profiles (false alarms on same-distribution nights,
an unseen class and a shifted mix detected) and one pair of published nights."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.config import DriftConfig, load_config
from curation.drift import build_profile, compare, find_new_regions

D = 32
CLASSES = 6
SAMPLE = 600  # the profiles' sample in these tests (2,000 by default)


def _centers():
    return np.random.default_rng(100).normal(size=(CLASSES + 1, D)) * 0.8


def _draw(rng, counts: dict[int, int], tag: str, *, iid: bool = False):
    """Items around each class centre; ``iid``: each item's class drawn at random with these
    proportions (else exactly these counts)."""
    centers = _centers()
    if iid:
        classes = list(counts)
        drawn = rng.multinomial(sum(counts.values()), np.array(list(counts.values())) / sum(counts.values()))
        counts = dict(zip(classes, drawn.tolist()))
    xs, labels, uris = [], [], []
    for c, n in counts.items():
        xs.append(centers[c] + 0.5 * rng.normal(size=(n, D)))
        labels += [str(c)] * n
        uris += [f"s3://lake/{tag}/{c}/{i}.jpg" for i in range(n)]
    x = np.concatenate(xs).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), labels, uris


def _night(x, labels, uris, centroids):
    """A night's samples (with clusters on ``centroids``) and kNN graph."""
    from curation.index.knn import exact_knn
    from curation.scores.clusters import assign

    cluster, _ = assign(None, x, centroids)
    samples = pa.table({"uri": uris, "label": labels, "status": ["ok"] * len(x),
                        "vector_id": pa.array(np.arange(len(x)), pa.int64()), "cluster": pa.array(cluster, pa.int32()),
                        "is_dark": pa.array(np.zeros(len(x), bool))})
    return samples, exact_knn(x, 10)


def _pair(seed: int, night2: dict[int, int] | None = None, *, keep: float = 0.95, new_same: float = 0.05):
    """Night 1, then night 2 = most of night 1 plus new items (``night2``: extra per class;
    default: 5% more from the same distribution, classes drawn at random)."""
    from curation.scores.clusters import train_centroids

    rng = np.random.default_rng(seed)
    x1, l1, u1 = _draw(rng, {c: 500 for c in range(CLASSES)}, f"n1-{seed}", iid=night2 is None)
    centroids = train_centroids(x1, 24)
    s1, g1 = _night(x1, l1, u1, centroids)
    first, _ = build_profile(s1, x1, g1, model_id="m", sample_size=SAMPLE)
    kept = np.sort(rng.choice(len(x1), int(keep * len(x1)), replace=False))
    extra = night2 or {c: int(new_same * 500) for c in range(CLASSES)}
    xn, ln, un = _draw(rng, extra, f"n2-{seed}", iid=night2 is None)
    x2 = np.concatenate([x1[kept], xn])
    l2 = [l1[i] for i in kept] + ln
    u2 = [u1[i] for i in kept] + un
    s2, g2 = _night(x2, l2, u2, centroids)
    second, on_previous = build_profile(s2, x2, g2, model_id="m", sample_size=SAMPLE,
                                        previous_centroids=first.centroids)
    is_new = np.r_[np.zeros(len(kept), bool), np.ones(len(xn), bool)]
    regions, far, region, _ = find_new_regions(g2, is_new, first.kth_similarity, x2,
                                               nearest_similarity=first.nearest_similarity,
                                               previous_centroids=first.centroids)
    new_sample = x2[is_new][:SAMPLE]
    drift = compare(first, second, DriftConfig(), on_previous=on_previous, regions=regions, new_sample=new_sample)
    return drift, far, region, len(kept)


def test_twenty_same_distribution_nights_raise_no_alarm():
    """The stated false-alarm rate: 0 of 20 nights whose new 5% come from the same distribution."""
    alarms, p_values = [], []
    for seed in range(20):
        drift, *_ = _pair(seed)
        alarms.append(drift["alarm"])
        p_values.append(drift["mmd_new_items"]["p_value"])
        assert drift["new_regions"]["regions"] == [] or drift["new_regions"]["regions"][0]["items"] < 20, drift
    assert sum(alarms) == 0, [d for d in alarms]
    # Under no change the new items' p-values spread over (0, 1]: not piled up at zero, not stuck at one.
    assert np.mean(np.array(p_values) < 0.05) <= 0.15 and np.mean(np.array(p_values) > 0.5) <= 0.8, p_values


def test_an_unseen_class_is_an_alarm_and_its_region_is_found():
    drift, members, region, n_old = _pair(1, {CLASSES: 120, 0: 20, 1: 20})
    assert drift["alarm"] and any("new region" in rule for rule in drift["rules_fired"])
    planted = np.arange(n_old + 0, n_old + 120)  # the unseen class comes first among the new items
    found = members[region == 0]
    assert len(set(found) & set(planted)) >= 0.95 * 120 and len(set(found) - set(planted)) <= 3
    assert drift["new_regions"]["regions"][0]["items"] == len(found)


def test_a_shifted_mix_is_an_alarm():
    """No new region, but class 0 grows from a sixth to over a quarter of the items."""
    drift, *_ = _pair(2, {0: 600}, keep=0.9)
    assert drift["alarm"], drift["rules_fired"]
    assert drift["classes"]["shares"]["0"]["change"] > 0.05
    assert not drift["new_regions"]["regions"] or drift["new_regions"]["regions"][0]["items"] < 20


def test_a_published_pair_of_nights_keeps_the_alarm_and_exits_3_when_asked(tmp_path, capsys):
    from curation.cli import main

    rng = np.random.default_rng(5)
    x1, l1, u1 = _draw(rng, {c: 200 for c in range(CLASSES)}, "a")
    path = tmp_path / "emb.parquet"

    def write(x, labels, uris):
        pq.write_table(pa.table({"uri": uris, "label": labels,
                                 "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), D)}), path)

    write(x1, l1, u1)
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"input": {"embeddings": str(path)}, "report": {"map_method": "pca"},
                                  "output": {"uri": str(tmp_path / "out")}, "drift": {"exit_code": True},
                                  "selections": [{"name": "clean", "mode": "clean"}]}))
    assert main(["run", "--config", str(config), "--quiet"]) == 0
    first = json.loads((tmp_path / "out" / "latest").read_text())["run_id"]
    info = json.loads((tmp_path / "out" / first / "run.json").read_text())
    assert info["drift"] == {"skipped": "first night: no previous published run"}
    assert (tmp_path / "out" / first / "profile.parquet").exists()
    xn, ln, un = _draw(rng, {CLASSES: 80}, "b")  # an unseen class arrives
    write(np.concatenate([x1, xn]), l1 + ln, u1 + un)
    assert main(["run", "--config", str(config), "--quiet"]) == 3
    assert "drift alarm" in capsys.readouterr().err
    second = json.loads((tmp_path / "out" / "latest").read_text())["run_id"]
    assert second != first  # published before exiting 3
    run = tmp_path / "out" / second
    info = json.loads((run / "run.json").read_text())
    assert info["drift"]["alarm"] and info["drift"]["previous_run"].endswith(first)
    far = pq.read_table(run / "drift.parquet")
    region0 = set(far.filter(pa.compute.equal(far["region"], 0))["uri"].to_pylist())
    assert len(region0 & set(un)) >= 76 and region0 <= set(un)
    assert "New since the previous run" in (run / "report.html").read_text()


def test_a_changed_embedder_skips_the_comparison_with_the_reason(tmp_path):
    from curation.drift import drift_phase
    from curation.io.filesystem import Resolver
    from curation.published_run import PublishedRun

    rng = np.random.default_rng(6)
    x, labels, uris = _draw(rng, {c: 50 for c in range(CLASSES)}, "c")
    from curation.scores.clusters import train_centroids

    samples, graph = _night(x, labels, uris, train_centroids(x, 6))
    run = Resolver().resolve(str(tmp_path / "run"))
    profile, _ = build_profile(samples, x, graph, model_id="resnet18@a/224", sample_size=100)
    profile.write(run)
    result = drift_phase(samples, x, graph, DriftConfig(), model_id="resnet50@b/224", previous=PublishedRun(run))
    assert "the embedder changed: 'resnet18@a/224' then, 'resnet50@b/224' now" in result.summary["skipped"]
    assert result.profile.model_id == "resnet50@b/224" and not result.alarm


@pytest.mark.parametrize("bad", [{"drift": {"alarm_p_value": 2}}, {"drift": {"sample_size": 1}},
                                 {"drift": {"permutations": 200}}])
def test_drift_keys_are_checked_at_load_time(bad):
    from curation.config import ConfigError

    with pytest.raises(ConfigError, match="drift"):
        load_config(data={"input": {"images": "/x"}, "output": {"uri": "/tmp/out"}, **bad})


def test_profile_round_trips(tmp_path):
    from curation.drift import Profile
    from curation.io.filesystem import Resolver

    rng = np.random.default_rng(7)
    x, labels, uris = _draw(rng, {0: 30, 1: 10}, "d")
    from curation.scores.clusters import train_centroids

    samples, graph = _night(x, labels, uris, train_centroids(x, 3))
    profile, _ = build_profile(samples, x, graph, model_id="m", sample_size=25)
    run = Resolver().resolve(str(tmp_path))
    profile.write(run)
    back = Profile.read(run)
    assert back.label_shares == pytest.approx({"0": 0.75, "1": 0.25}) and back.items == 40
    assert np.allclose(back.sample, profile.sample) and back.sample_uris == profile.sample_uris
    assert np.allclose(back.centroids, profile.centroids) and len(back.cluster_shares) == 3
    assert os.path.exists(tmp_path / "profile.json")
