"""`curation similar` over a run's saved index shards, and its one-line errors."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.cli import main
from curation.config import load_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sharded_run(ray_local, tmp_path_factory):
    """An embeddings-mode run whose neighbours came from two saved IVF shards (a few rejected rows)."""
    from curation.job import run_job

    root = tmp_path_factory.mktemp("similar")
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(8, 24))
    x = np.concatenate([c + 0.4 * rng.normal(size=(500, 24)) for c in centers]).astype(np.float32)
    x[[7, 700]] = np.nan  # rejected: no vector id
    uris = [f"s3://lake/{'abcdefgh'[i // 500]}/{i:04d}.jpg" for i in range(len(x))]
    labels = pa.array([("abcdefgh"[i // 500] if i % 5 == 0 else None) for i in range(len(x))], pa.string())
    pq.write_table(pa.table({"uri": uris, "label": labels,
                             "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 24)}),
                   root / "emb.parquet", row_group_size=1000)
    config = load_config(data={"input": {"embeddings": str(root / "emb.parquet")}, "report": {"map_method": "pca"},
                               "output": {"uri": str(root / "out")},
                               "knn": {"index": "ivf", "shards": 2, "nlist": 32, "nprobe": 4, "codec": "pq-fastscan"},
                               "selections": [{"name": "queue", "mode": "to_label", "budget": 10}]})
    return run_job(config), root, uris


def test_first_knn_k_hits_are_the_runs_own_row_from_its_saved_shards(sharded_run):
    from curation.similar import RunSearch

    result, root, uris = sharded_run
    assert result.run_info["knn"]["shards"] == 2 and result.run_info["knn"]["vectors"]["skips_rejected_rows"]
    search = RunSearch(str(root / "out"))
    assert search.method.startswith("2 saved index shard(s)")
    knn = {r["uri"]: r for r in pq.read_table(os.path.join(result.run_uri, "knn")).to_pylist()}
    by_id = {r["input_id"]: r["uri"] for r in knn.values()}
    some = [uris[i] for i in range(0, len(uris), 97) if uris[i] in knn]
    hits = search.by_uri(some, k=25)
    for uri in some:
        mine = hits.filter(pa.compute.equal(hits["query"], uri))
        assert mine.num_rows == 25 and uri not in mine["uri"].to_pylist()
        row = knn[uri]
        assert mine["uri"].to_pylist()[:10] == [by_id[i] for i in row["neighbor_ids"]]
        assert np.allclose(mine["similarity"].to_numpy()[:10], row["neighbor_similarities"], atol=1e-5)
        sims = mine["similarity"].to_numpy()  # the run's own ten, then the larger search's next
        assert (np.diff(sims[:10]) <= 1e-6).all() and (np.diff(sims[10:]) <= 1e-6).all()
    # Filtered before the search: k hits that all pass, from a class the query is not in.
    filtered = search.by_uri([uris[3]], k=12, where="label == 'c'")
    assert filtered.num_rows == 12 and set(filtered["label"].to_pylist()) == {"c"}


@pytest.mark.parametrize("args, message", [
    (["--uri", "s3://lake/a/0001.jpg", "--where", "label.to_csv('/tmp/x')"], "--where: cannot evaluate"),
    (["--uri", "s3://lake/a/0001.jpg", "--where", "no_such_column > 1"], "--where: cannot evaluate"),
    (["--uri", "s3://lake/a/0001.jpg", "--space", "copy"], "--space copy: run "),
    (["--uri", "s3://lake/nowhere.jpg"], "--uri s3://lake/nowhere.jpg: not an ok item of run"),
    (["--uri", "s3://lake/a/0007.jpg"], "--uri s3://lake/a/0007.jpg: not an ok item"),  # rejected
])
def test_what_cannot_be_searched_is_one_line_and_exit_2(sharded_run, capsys, args, message):
    _, root, _ = sharded_run
    assert main(["similar", "--run", str(root / "out"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("curation: error: ") and message in err and "\n" not in err, err


def test_a_missing_run_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["similar", "--run", str(tmp_path / "nothing"), "--uri", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--run" in err and "no published run there" in err and "\n" not in err
