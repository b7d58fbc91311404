"""Nightly kNN graphs that cost what changed: night 2 updates night 1's graph, checked against a
full recompute of night 2 (exact path: equal; sharded IVF: a recall bound), a changed embedder
rebuilds and says so, and a deleted item is nobody's neighbour."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 (pa.compute)
import pyarrow.parquet as pq
import pytest

from curation.config import load_config

D = 16


def _vectors(rng, n):
    centers = np.random.default_rng(0).normal(size=(6, D))  # the same distribution every night
    x = centers[rng.integers(6, size=n)] + 0.6 * rng.normal(size=(n, D))
    return x.astype(np.float32)


def _write(path, uris, x, labels=None):
    columns = {"uri": uris, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), D)}
    if labels is not None:
        columns["label"] = labels
    pq.write_table(pa.table(columns), path)


def _nights(tmp_path, n=900, knn=None, storage=None, out=None):
    """Night 1, then night 2 with 5% new, 2% changed (same uri, new vector) and 2% deleted items;
    night 2 runs incrementally and again from scratch (knn.incremental off) for comparison."""
    from curation.job import run_job

    rng = np.random.default_rng(1)
    x = _vectors(rng, n)
    uris = [f"s3://lake/{i:05d}.jpg" for i in range(n)]
    labels = [str(i % 3) if i % 4 == 0 else None for i in range(n)]
    path = str(tmp_path / "emb.parquet")
    _write(path, uris, x, labels)
    data = {"input": {"embeddings": path}, "report": {"map_method": "pca"},
            "output": {"uri": out or str(tmp_path / "out")}, "knn": dict(knn or {}),
            "selections": [{"name": "clean", "mode": "clean"}, {"name": "review", "mode": "label_review", "budget": 30}]}
    if storage:
        data["storage"] = storage
    first = run_job(load_config(data=data))
    deleted = set(range(0, n, 50))
    changed = set(range(7, n, 50))
    keep = [i for i in range(n) if i not in deleted]
    x2 = x[keep].copy()
    moved = [j for j, i in enumerate(keep) if i in changed]
    x2[moved] = _vectors(rng, len(moved))  # same uri, another image of the same distribution
    new = _vectors(rng, n // 20)
    uris2 = [uris[i] for i in keep] + [f"s3://lake/new-{i:05d}.jpg" for i in range(len(new))]
    labels2 = [labels[i] for i in keep] + [None] * len(new)
    _write(path, uris2, np.concatenate([x2, new]), labels2)
    second = run_job(load_config(data=data))
    data["knn"] = {**data["knn"], "incremental": "off"}
    data["output"]["run_id"] = "night-2-whole"
    whole = run_job(load_config(data=data))
    return first, second, whole, {uris[i] for i in deleted}


def _graph(run_uri):
    table = pq.read_table(os.path.join(run_uri, "knn")).sort_by("input_id")
    return table["neighbor_ids"].to_pylist(), table["neighbor_similarities"].to_pylist(), table["uri"].to_pylist()


def test_night_two_updates_the_exact_graph_to_what_a_full_recompute_finds(tmp_path):
    first, second, whole, deleted = _nights(tmp_path)
    assert first.info.knn["incremental"] == {"used": False, "reason": "first night: no previous published run",
                                             "nights_since_rebuild": 0, "margin": 5}
    # Night 1 kept 5 neighbours past the k-th for the rows that lose one tonight.
    margin = pq.read_table(os.path.join(first.run_uri, "knn-margin"))
    assert margin.num_rows == first.info.counts.ok and set(pa.compute.list_value_length(margin["neighbor_ids"]).to_pylist()) == {5}
    update = second.info.knn["incremental"]
    assert update["used"] and update["nights_since_rebuild"] == 1 and update["new_or_changed"] == 45 + 18
    # Searched: what changed and the old items short of k neighbours once it is gone, not every
    # item; the rows that lost a neighbour and kept k are filled from their margin.
    assert update["searched"] == update["new_or_changed"] + update["short_of_k"] < second.info.counts.ok
    assert update["refilled_from_margin"] > 10 * update["short_of_k"]
    ids, sims, uris = _graph(second.run_uri)
    ids_w, sims_w, uris_w = _graph(whole.run_uri)
    assert uris == uris_w
    for a, b, sa, sb in zip(ids, ids_w, sims, sims_w):
        assert np.allclose(sa, sb, atol=1e-6)  # the same neighbours, up to the order of exact ties
        assert set(a) == set(b) or np.isclose(sa[-1], sa[-2], atol=1e-6)
    # Deleted items are nobody's neighbour; the flags and selections are those of the full recompute.
    input_of = dict(zip(pq.read_table(os.path.join(second.run_uri, "samples"))["uri"].to_pylist(),
                        pq.read_table(os.path.join(second.run_uri, "samples"))["input_id"].to_pylist()))
    assert not deleted & set(input_of)
    for name in ("clean", "review"):
        mine = pq.read_table(os.path.join(second.run_uri, "selections", f"{name}.parquet"))["uri"].to_pylist()
        theirs = pq.read_table(os.path.join(whole.run_uri, "selections", f"{name}.parquet"))["uri"].to_pylist()
        # The same items; their order may differ only where the label probe's scores are
        # within its convergence tolerance (the update's fits start from night 1's models).
        assert set(mine) == set(theirs), name
    quality = [pq.read_table(os.path.join(run.run_uri, "samples")).sort_by("uri") for run in (second, whole)]
    for column in (c for c in quality[0].column_names if c.startswith("is_")):
        assert quality[0][column].equals(quality[1][column]), column
    lq = [t["label_quality"].to_numpy(zero_copy_only=False).astype(float) for t in quality]
    assert np.nanmax(np.abs(lq[0] - lq[1])) < 2e-3
    assert whole.info.knn["incremental"]["reason"] == "knn.incremental is off"
    # The map keeps the previous layout: unchanged points where they were, new ones beside them.
    assert second.info.map["method"].startswith("the previous run's layout")
    before = pq.read_table(os.path.join(first.run_uri, "samples")).to_pandas().set_index("uri")
    after = pq.read_table(os.path.join(second.run_uri, "samples")).to_pandas().set_index("uri")
    both = before.index.intersection(after.index)
    both = [u for u in both if before.at[u, "fingerprint"] == after.at[u, "fingerprint"]
            and before.at[u, "x"] == before.at[u, "x"] and after.at[u, "x"] == after.at[u, "x"]]
    assert len(both) > 100 and all(before.at[u, "x"] == after.at[u, "x"] for u in both)
    assert whole.info.map["method"].startswith("PCA")
    # An updated night keeps the previous run's clusters (ids mean the same thing night to night).
    assert second.info.scores["clusters"]["kmeans_backend"] == "previous run's centroids"
    # Unchanged items keep their cluster and cosine (carried, not assigned again); the rest are
    # assigned to the same centroids: every item sits in the cluster of its most similar centroid.
    for column in ("cluster", "cluster_similarity"):
        assert all(before.at[u, column] == after.at[u, column] for u in both), column
    from curation.drift import Profile
    from curation.io.filesystem import resolve

    centroids = Profile.read(resolve(first.run_uri)).centroids
    vectors = pq.read_table(os.path.join(tmp_path, "emb.parquet"))
    x = np.array(vectors["embedding"].to_pylist(), np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    nearest = dict(zip(vectors["uri"].to_pylist(), np.argmax(x @ centroids.T, axis=1)))
    assert all(after.at[u, "cluster"] == nearest[u] for u in after.index if u in nearest)
    assert whole.info.scores["clusters"]["kmeans_backend"] != "previous run's centroids"
    # ... and the label probe's regularisation (refitted, not chosen again).
    probe = second.info.scores["label_quality"]["probe"]
    assert probe["C_chosen_by"] == "the previous run" and probe["C"] == first.info.scores["label_quality"]["probe"]["C"]
    assert whole.info.scores["label_quality"]["probe"]["C_chosen_by"].startswith("5-fold")
    # ... and its fits start from the models night 1 kept; the flags agree with the whole night.
    assert os.path.exists(os.path.join(first.run_uri, "label-probe.npz"))
    assert probe["fits_started_from"] == "the previous run's models"
    assert whole.info.scores["label_quality"]["probe"]["fits_started_from"] == "zero"


def test_a_changed_embedder_or_knn_setting_rebuilds_and_says_why(tmp_path):
    from curation.job import run_job

    rng = np.random.default_rng(2)
    x = _vectors(rng, 300)
    path = str(tmp_path / "emb.parquet")
    _write(path, [f"s3://l/{i}.jpg" for i in range(300)], x)
    data = {"input": {"embeddings": path}, "report": {"map_method": "pca"}, "output": {"uri": str(tmp_path / "out")},
            "selections": [{"name": "clean", "mode": "clean"}]}
    run_job(load_config(data=data))
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata({}).append_column("model_id", pa.array(["other-model"] * 300)), path)
    second = run_job(load_config(data=data))
    assert second.info.knn["incremental"]["reason"] == "the embedder changed"
    data["knn"] = {"k": 5}
    third = run_job(load_config(data=data))
    assert third.info.knn["incremental"]["reason"] == "knn settings changed: k"


@pytest.mark.integration
def test_sharded_night_two_reuses_the_trained_index_on_s3_within_a_recall_bound(ray_local, s3, tmp_path):
    fs = s3.pyarrow_fs()
    fs.create_dir("incremental")
    knn = {"index": "ivf", "shards": 2, "nlist": 16, "nprobe": 8}
    first, second, whole, deleted = _nights(tmp_path, n=3000, knn=knn, storage=s3.storage(),
                                            out="s3://incremental/out")
    update = second.info.knn["incremental"]
    assert update["used"], update
    assert second.info.knn["trained_from"].endswith("/index/trained.faissindex")
    assert "train_s" not in second.info.knn and update["searched"] < 0.5 * second.info.counts.ok
    # The shards start from night 1's saved ones, renumbered, with the new vectors added.
    assert "filled shards renumbered" in second.info.knn["method"], second.info.knn["method"]
    assert second.info.knn["add_from"].endswith(f"{update['new_or_changed']} new or changed vectors added")

    def graph(run_uri):
        table = pq.read_table(run_uri.removeprefix("s3://") + "/knn", filesystem=fs).sort_by("input_id")
        return [set(row) for row in table["neighbor_ids"].to_pylist()], table["uri"].to_pylist()

    mine, uris = graph(second.run_uri)
    theirs, uris_w = graph(whole.run_uri)
    assert uris == uris_w
    recall = np.mean([len(a & b) / max(len(b), 1) for a, b in zip(mine, theirs)])
    assert recall >= 0.98, recall
    samples = pq.read_table(second.run_uri.removeprefix("s3://") + "/samples", filesystem=fs)
    assert not deleted & set(samples["uri"].to_pylist())
    info = json.loads(fs.open_input_stream(second.run_uri.removeprefix("s3://") + "/run.json").read())
    assert info["knn"]["incremental"]["used"]


def test_an_item_without_a_fingerprint_is_never_taken_as_unchanged():
    """A manifest without fingerprints cannot show that a file is unchanged: its rows' keys match
    nothing in another run's, while rows with a fingerprint match on uri and fingerprint."""
    from curation.item_key import unchanged

    before = pa.table({"uri": ["a", "b", "c"], "fingerprint": ["1", None, "3"]})
    after = pa.table({"uri": ["a", "b", "c"], "fingerprint": ["1", None, "4"]})
    found = unchanged(after, before).tolist()
    assert found == [True, False, False]
