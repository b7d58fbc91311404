"""Sharded FAISS kNN over Ray actors against exact search."""

from __future__ import annotations

import numpy as np
import pytest

from curation.config import KnnConfig
from curation.index.knn import exact_knn
from curation.index.params import choose_params
from curation.index.knn import drop_self


def clustered(n, d=32, clusters=20, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, d))
    x = centers[rng.integers(clusters, size=n)] + spread * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def recall(approx, exact):
    hits = sum(len(set(a[a >= 0]) & set(e[e >= 0])) for a, e in zip(approx.ids, exact.ids))
    return hits / max(1, (exact.ids >= 0).sum())


def test_params_are_chosen_from_n():
    small = choose_params(10_000, 512, KnnConfig())
    assert small.kind == "flat"
    big = choose_params(1_000_000, 512, KnnConfig(), cpus=8)
    assert big.kind == "ivf" and big.nlist == 4000 and big.nprobe == 16 and big.shards == 4
    assert big.train_size == 160_000 and big.codec == "flat"
    huge = choose_params(10_000_000, 512, KnnConfig())
    assert huge.codec == "sq8"
    assert choose_params(100, 8, KnnConfig(index="ivf")).nlist == 2  # N smaller than the default nlist


def test_drop_self_handles_missing_self_and_padding():
    sims = np.array([[1.0, 0.9, 0.8], [0.95, 0.9, -np.inf]], np.float32)
    ids = np.array([[0, 5, 6], [3, 4, -1]])
    out_sims, out_ids = drop_self(sims, ids, np.array([0, 1]), 3)
    assert out_ids.tolist() == [[5, 6, -1], [3, 4, -1]]
    assert np.isneginf(out_sims[0, 2])


def test_flat_shards_equal_single_index_exactly(ray_local):
    from curation.index.sharded import sharded_knn
    from curation.index.params import IndexParams

    x = clustered(3000)
    x[10] = x[11]  # duplicate vectors
    exact = exact_knn(x, 10)
    for shards in (1, 2, 3):
        graph, timing = sharded_knn(x, 10, IndexParams("flat", "flat", 0, 0, 0, shards), query_batch=700)
        assert timing["shard_sizes"] == [len(p) for p in np.array_split(np.arange(3000), shards)]
        np.testing.assert_allclose(graph.sims, exact.sims, atol=1e-5)
        same = (graph.ids == exact.ids).mean()
        assert same > 0.999  # ids may swap only among exactly tied similarities
        assert not (graph.ids == np.arange(3000)[:, None]).any()  # self excluded


def test_shards_stream_their_partitions_from_parquet(ray_local, tmp_path):
    """Shards that read their vectors from Parquet files (several files, float16 in one,
    rejected rows skipped) build the same graph as shards fed by the driver."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curation.index.params import IndexParams
    from curation.index.source import VectorParts, parquet_parts
    from curation.io.filesystem import resolve
    from curation.index.sharded import sharded_knn

    x = clustered(2500, d=16, seed=3)
    rows = np.concatenate([x[:1000], np.zeros((1, 16), np.float32), x[1000:]])  # row 1000: a rejected vector
    keep = np.ones(len(rows), bool)
    keep[1000] = False
    files = []
    for i, (lo, hi, dtype) in enumerate([(0, 700, pa.float32()), (700, 1800, pa.float16()), (1800, 2501, pa.float32())]):
        values = pa.array(rows[lo:hi].ravel(), pa.float32()).cast(dtype)
        pq.write_table(pa.table({"embedding": pa.FixedSizeListArray.from_arrays(values, 16)}),
                       tmp_path / f"part-{i}.parquet", row_group_size=300)
        files.append(resolve(str(tmp_path / f"part-{i}.parquet")))
    source = VectorParts(parquet_parts(files), keep=keep)
    assert source.n == 2500 and source.rows == 2501
    params = IndexParams("flat", "flat", 0, 0, 0, 3)
    streamed, timing = sharded_knn(source, 8, params)
    assert timing["add_from"].startswith("storage")
    pushed, _ = sharded_knn(x, 8, params)
    np.testing.assert_allclose(streamed.sims, pushed.sims, atol=2e-3)  # float16 rounding in one file
    assert (streamed.ids == pushed.ids).mean() > 0.97
    # Groups of ids spread over every file, taken a window at a time (each file read once per
    # window), come back as take() gives them, in their own order.
    rng = np.random.default_rng(0)
    groups = [rng.permutation(2500)[:size] for size in (40, 900, 1, 300, 1200)]
    taken = list(source.take_groups(groups, window_bytes=64 * 1200 * 2))
    assert [len(t) for t in taken] == [40, 900, 1, 300, 1200]
    for ids, got in zip(groups, taken):
        np.testing.assert_array_equal(got, source.take(ids))
        np.testing.assert_allclose(got, x[ids], atol=2e-3)


def test_ivf_shards_reach_recall(ray_local):
    from curation.index.sharded import knn_graph

    x = clustered(20_000, d=64, clusters=100, spread=0.4, seed=1)
    exact = exact_knn(x, 10)
    graph, info = knn_graph(x, KnnConfig(k=10, index="ivf", shards=2))
    assert info["kind"] == "ivf" and info["shards"] == 2
    assert recall(graph, exact) >= 0.95


def test_nprobe_is_calibrated_to_the_target_recall(ray_local):
    """Unclustered vectors need many more lists probed than clustered ones for the same recall:
    calibration measures it on the filled shards and searches with the first nprobe that reaches
    the target; a fixed nprobe is kept as given."""
    from curation.index.sharded import knn_graph

    x = clustered(20_000, d=24, clusters=1, spread=1.0, seed=5)  # one blob: no cluster structure
    exact = exact_knn(x, 10)
    fixed, fixed_info = knn_graph(x, KnnConfig(k=10, index="ivf", shards=2, target_recall=0.0))
    assert fixed_info["nprobe"] == 16 and "nprobe_calibration" not in fixed_info
    graph, info = knn_graph(x, KnnConfig(k=10, index="ivf", shards=2, target_recall=0.95))
    measured = info["nprobe_calibration"]["recall_at"]
    assert info["nprobe"] > 16 and info["nprobe"] == int(list(measured)[-1])
    assert measured[str(info["nprobe"])] >= 0.95 and all(r < 0.95 for r in list(measured.values())[:-1])
    assert recall(fixed, exact) < 0.9 <= recall(graph, exact)
    assert abs(recall(graph, exact) - measured[str(info["nprobe"])]) < 0.05  # the sample speaks for all
    _, clustered_info = knn_graph(clustered(20_000, d=64, clusters=100, spread=0.4, seed=1),
                                  KnnConfig(k=10, index="ivf", shards=2, target_recall=0.95))
    assert clustered_info["nprobe"] == 16
    _, given = knn_graph(x, KnnConfig(k=10, index="ivf", shards=2, nprobe=8))
    assert given["nprobe"] == 8 and "nprobe_calibration" not in given


def test_pq_fastscan_codec_with_refinement_reaches_recall(ray_local, tmp_path):
    from curation.index.params import choose_params
    from curation.index.shard import load_index
    from curation.io.filesystem import resolve
    from curation.index.sharded import sharded_knn

    x = clustered(20_000, d=32, clusters=50, seed=4)
    params = choose_params(len(x), 32, KnnConfig(index="ivf", codec="pq-fastscan", shards=2))
    assert params.factory(32) == f"IVF{params.nlist},PQ16x4fs,RFlat"
    graph, _ = sharded_knn(x, 10, params, save_to=resolve(str(tmp_path)))
    assert recall(graph, exact_knn(x, 10)) >= 0.95
    unrefined, _ = sharded_knn(x, 10, params, refine_factor=1)
    assert recall(unrefined, exact_knn(x, 10)) < recall(graph, exact_knn(x, 10))
    assert load_index(resolve(str(tmp_path / "shard-00000.faissindex"))).ntotal == 10_000


def test_near_duplicates_are_found_by_the_ann_path(ray_local):
    """Near copies are each other's nearest neighbours, so they share a coarse list or sit in
    adjacent probed lists: the IVF graph must keep every planted near pair."""
    from curation.index.sharded import knn_graph

    rng = np.random.default_rng(4)
    x = clustered(20_000, d=64, clusters=100, spread=0.4, seed=2)
    sources = rng.choice(20_000, 200, replace=False)
    copies = x[sources] + 0.02 * rng.normal(size=(200, 64)).astype(np.float32)
    x = np.concatenate([x, copies / np.linalg.norm(copies, axis=1, keepdims=True)]).astype(np.float32)
    graph, _ = knn_graph(x, KnnConfig(k=10, index="ivf", shards=2, nprobe=8))
    found = sum(sources[i] in graph.ids[20_000 + i] for i in range(200))
    assert found == 200


@pytest.mark.parametrize("n, k", [(1, 5), (2, 5), (7, 20)])
def test_k_larger_than_n_and_tiny_shards(ray_local, n, k):
    from curation.index.sharded import sharded_knn
    from curation.index.params import IndexParams

    x = clustered(n, d=8)
    graph, _ = sharded_knn(x, k, IndexParams("flat", "flat", 0, 0, 0, min(3, n)))
    assert graph.ids.shape == (n, k)
    assert ((graph.ids >= 0).sum(axis=1) == n - 1).all()


def test_empty_shard(ray_local):
    from curation.index.sharded import sharded_knn
    from curation.index.params import IndexParams

    x = clustered(3, d=8)
    graph, timing = sharded_knn(x, 2, IndexParams("flat", "flat", 0, 0, 0, 4))
    assert 0 in timing["shard_sizes"]
    assert ((graph.ids >= 0).sum(axis=1) == 2).all()


def test_job_uses_the_sharded_path_and_saves_graph_and_index(ray_local, tmp_path):
    """Above knn.exact_below the job switches to sharded IVF, writes the kNN graph as Parquet
    and the trained index + shards, which load back and answer queries."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curation.config import load_config
    from curation.io.filesystem import resolve
    from curation.index.shard import load_index
    from curation.job import run_job

    x = clustered(3000, d=16, clusters=10, seed=5)
    table = pa.table({"uri": [f"s3://x/{i}.jpg" for i in range(3000)],
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 16)})
    pq.write_table(table, tmp_path / "emb.parquet")
    config = load_config(data={"input": {"embeddings": str(tmp_path / "emb.parquet")},
                               "knn": {"exact_below": 1000, "shards": 2},
                               "selections": [{"name": "clean", "mode": "clean"}],
                               "output": {"uri": str(tmp_path / "out")}})
    result = run_job(config)
    info = result.run_info["knn"]
    assert info["kind"] == "ivf" and info["shards"] == 2 and "Ray shard" in info["method"]
    graph = pq.read_table(f"{result.run_uri}/knn").to_pylist()
    assert len(graph) == 3000 and all(len(r["neighbor_ids"]) == 10 for r in graph)
    assert all(r["input_id"] not in r["neighbor_ids"] for r in graph)
    exact = exact_knn(x, 10)
    assert recall(type(exact)(np.array([r["neighbor_ids"] for r in graph]), np.zeros((3000, 10))), exact) > 0.95
    shards = [load_index(resolve(f"{result.run_uri}/index/shard-{i:05d}.faissindex")) for i in range(2)]
    assert sum(s.ntotal for s in shards) == 3000
    trained = load_index(resolve(f"{result.run_uri}/index/trained.faissindex"))
    assert trained.is_trained and trained.ntotal == 0


def test_a_shard_updated_in_place_answers_as_one_filled_from_scratch(tmp_path):
    """A previous run's saved shard, renumbered (deleted ids dropped) with new vectors added,
    answers every query as a shard filled afresh does."""
    import faiss

    from curation.index.shard import IndexShard, train_empty_index
    from curation.io.filesystem import resolve

    x = clustered(3000, d=16, seed=5)
    trained = faiss.serialize_index(train_empty_index(x, "IVF20,Flat"))
    before = IndexShard(trained, nprobe=6)
    before.add(np.arange(2500), x[:2500])
    saved = resolve(str(tmp_path / "shard-00000.faissindex"))
    before.save(saved)
    # Tonight: every 10th previous item is gone, the rest shifted down, 500 new ones at the end.
    keep = np.arange(2500) % 10 != 0
    new_id_of = np.full(2500, -1, np.int64)
    new_id_of[keep] = np.arange(keep.sum())
    tonight = np.concatenate([x[:2500][keep], x[2500:]])
    added = np.arange(keep.sum(), len(tonight))
    updated = IndexShard(saved, nprobe=6, renumber=new_id_of, added=added, added_vectors=tonight[added])
    fresh = IndexShard(trained, nprobe=6)
    fresh.add(np.arange(len(tonight)), tonight)
    assert updated.size() == fresh.size() == len(tonight)
    queries = np.concatenate([added[:200], np.arange(300)])  # new and old items
    a = updated.search(tonight[queries], 8)
    b = fresh.search(tonight[queries], 8)
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)
    assert (a[1] == b[1]).mean() > 0.99  # ties aside


def test_a_scan_finds_what_the_search_finds_and_the_reverse_pairs():
    """The shard's scan of the probed lists: its forward lists are the search's (same nprobe),
    and with every list probed its reverse pairs are exactly the (old row, new item) pairs that
    beat the row's threshold, by brute force; with fewer lists, a subset with the same
    similarities. A quantised codec cannot be scanned (the caller searches it)."""
    import faiss

    from curation.index.shard import IndexShard, train_empty_index

    x = clustered(4000, d=24, clusters=1, spread=1.0, seed=9)  # no structure: one-way pairs abound
    new = np.arange(3600, 4000)
    open_rows = np.ones(4000, bool)
    open_rows[new] = False
    open_rows[::7] = False  # rows searched anew take no candidates
    exact = exact_knn(x[:3600], 10)  # each old row's list among old items
    threshold = np.full(4000, np.inf, np.float32)
    threshold[:3600] = exact.sims[:, -1]
    trained = faiss.serialize_index(train_empty_index(x, "IVF16,Flat"))
    truth = {(r, c) for r, c in zip(*np.nonzero((x @ x[new].T > threshold[:, None]) & open_rows[:, None]))}
    truth = {(int(r), int(new[c])) for r, c in truth}
    assert len(truth) > 500
    queries = np.concatenate([new, np.arange(0, 3600, 9)])  # new items and some old rows searched anew
    is_new = np.isin(queries, new)
    for nprobe in (16, 3):
        shard = IndexShard(trained, nprobe=nprobe)
        shard.add(np.arange(4000), x)
        assert shard.can_scan()
        (sims, ids), (rows, cands, rsims) = shard.scan(x[queries], 11, 0, queries, is_new, threshold, open_rows,
                                                       chunk=150)
        searched_sims, searched_ids = shard.search(x[queries], 11)
        np.testing.assert_allclose(sims, searched_sims, atol=1e-5)
        assert (ids == searched_ids).mean() > 0.99  # ties aside
        found = set(zip(rows.tolist(), cands.tolist()))
        assert len(found) == len(rows)  # each pair once
        np.testing.assert_allclose(rsims, np.einsum("ij,ij->i", x[rows], x[cands]), atol=1e-5)
        if nprobe == 16:
            assert found == truth
        else:
            assert found < truth and len(found) > 0.5 * len(truth)
    quantised = IndexShard(faiss.serialize_index(train_empty_index(x, "IVF16,SQ8")), nprobe=4)
    assert not quantised.can_scan()
