"""The job's structure: sizing rules, the Ray decision, registries, preflight checks, failed runs
that publish nothing, and vectors that never reach the driver."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from curation.config import SELECTION_MODES, ConfigError, load_config
from curation.session import needs_ray


def test_needs_ray_is_decided_once_from_the_config_and_n():
    base = {"output": {"uri": "/o"}}
    images = load_config(data={**base, "input": {"images": "/i"}})
    emb = load_config(data={**base, "input": {"embeddings": "/e"}})
    assert needs_ray(images, 10)
    assert not needs_ray(emb, 10) and needs_ray(emb, 50_000)
    assert needs_ray(load_config(data={**base, "input": {"embeddings": "/e"}, "knn": {"shards": 2}}), 10)


def test_selection_modes_registry_matches_the_config():
    from curation.select import BOX_MODE, MODES

    # the image modes' registry, and box_review (over a detection run's boxes, not images)
    assert set(MODES) | {BOX_MODE} == set(SELECTION_MODES) and BOX_MODE not in MODES


def test_a_manifest_may_not_use_any_score_or_internal_column_name(tmp_path):
    from curation.io.filesystem import Resolver
    from curation.io.inputs import list_inputs
    from curation.schema import INTERNAL_COLUMNS
    from curation.scores import REGISTRY

    for name in [c for score in REGISTRY for c in score.columns] + ["vector_id", *INTERNAL_COLUMNS]:
        if name == "input_error":
            continue  # an input column itself: listing owns it
        pq.write_table(pa.table({"uri": ["a.jpg"], name: ["x"]}), tmp_path / "m.parquet")
        config = load_config(data={"input": {"manifest": str(tmp_path / "m.parquet")}, "output": {"uri": str(tmp_path)}})
        with pytest.raises(ConfigError, match=f"'{name}' clashes"):
            list_inputs(config, Resolver())


def test_manifest_column_named_like_a_score_column_is_refused(tmp_path):
    from curation.io.filesystem import Resolver
    from curation.io.inputs import list_inputs

    pq.write_table(pa.table({"uri": ["a.jpg"], "dup_kind": ["x"]}), tmp_path / "m.parquet")
    config = load_config(data={"input": {"manifest": str(tmp_path / "m.parquet")}, "output": {"uri": str(tmp_path)}})
    with pytest.raises(ConfigError, match="'dup_kind' clashes"):
        list_inputs(config, Resolver())


def test_precomputed_embeddings_column_named_like_an_output_column_is_refused(tmp_path):
    """The same rule for ``input.embeddings`` metadata (it used to be dropped silently)."""
    from curation.io.filesystem import Resolver
    from curation.io.inputs import embeddings_files

    vectors = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(8, np.float32)), 4)
    pq.write_table(pa.table({"uri": ["a", "b"], "embedding": vectors, "site": ["x", "y"], "cluster": [1, 2]}),
                   tmp_path / "e.parquet")
    config = load_config(data={"input": {"embeddings": str(tmp_path / "e.parquet")}, "output": {"uri": str(tmp_path)}})
    with pytest.raises(ConfigError, match="'input.embeddings': column 'cluster' clashes"):
        embeddings_files(config, Resolver())
    pq.write_table(pa.table({"uri": ["a", "b"], "embedding": vectors, "site": ["x", "y"]}), tmp_path / "e.parquet")
    assert embeddings_files(config, Resolver())[2] == 2  # metadata with its own name is welcome


@pytest.mark.parametrize("key, value, message", [
    ("decode.batch_size", 0, "'decode.batch_size': must be >= 1"),
    ("knn.exact_below", -1, "'knn.exact_below': must be >= 0"),
    ("scores.blurry_sharpness", -0.1, "'scores.blurry_sharpness': must be >= 0"),
    ("scores.low_information_std", 2, "'scores.low_information_std': must be in [0, 1]"),
    ("scores.n_clusters", -2, "'scores.n_clusters': must be >= 0"),
    ("report.map_points", -1, "'report.map_points': must be >= 0"),
])
def test_ranges_are_checked_at_load_time(key, value, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(data={"input": {"images": "/i"}, "output": {"uri": "/o"}}, overrides=[f"{key}={value}"])


def _images(tmp_path, n=6):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize("selection, message", [
    ({"name": "s", "mode": "clean", "where": "lable == 'cat'"}, "'selections[0].where'"),
    ({"name": "s", "mode": "clean", "balance_on": "site"}, "'selections[0].balance_on': no column 'site'"),
])
def test_bad_where_or_balance_on_fails_in_preflight(tmp_path, selection, message):
    from curation.io.filesystem import Resolver
    from curation.job import preflight

    config = load_config(data={"input": {"images": str(_images(tmp_path))}, "output": {"uri": str(tmp_path / "out")},
                               "embedder": {"model": "thumbnail", "weights": "none"}, "selections": [selection]})
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        preflight(config, Resolver())
    assert not (tmp_path / "out").exists()


def test_where_on_a_score_column_passes_preflight(tmp_path):
    from curation.io.filesystem import Resolver
    from curation.job import preflight

    config = load_config(data={"input": {"images": str(_images(tmp_path))}, "output": {"uri": str(tmp_path / "out")},
                               "embedder": {"model": "thumbnail", "weights": "none"},
                               "selections": [{"name": "s", "mode": "clean",
                                               "where": "label == 'a' and sparseness < 0.5 and width >= 10"}]})
    assert preflight(config, Resolver()).count == 6


def test_cluster_training_falls_back_to_faiss_without_cuml(monkeypatch):
    import builtins

    from curation.scores import clusters

    real_import = builtins.__import__

    def no_cuml(name, *args, **kwargs):
        if name.startswith("cuml"):
            raise ImportError("no cuML here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cuml)
    assert clusters.kmeans_backend() == "faiss"
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(50, 8)) + 6 * np.eye(8)[i] for i in range(3)]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels, sims, backend, _ = clusters.cluster_vectors(x, 3)
    assert backend == "faiss" and len(set(labels[:50])) == 1 and len(set(labels)) == 3 and (sims > 0.5).all()


def _embeddings_config_on(where: str, tmp_path, request, prefix: str):
    """A small embeddings-mode config whose output is local or on the test S3 server."""
    config = _embeddings_config(tmp_path, n=200)
    if where == "s3":
        s3 = request.getfixturevalue("s3")
        s3.pyarrow_fs().create_dir("shared-tests")  # one bucket, a prefix per test: buckets cost volumes
        config.output.uri = f"s3://shared-tests/{prefix}"
        config.storage.endpoint_url, config.storage.access_key_id = s3.url, s3.access_key
        config.storage.secret_access_key = s3.secret_key
    return config


def _embeddings_config(tmp_path, n=600, d=16, **knn):
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(4, d))
    x = np.concatenate([c + 0.3 * rng.normal(size=(n // 4, d)) for c in centers]).astype(np.float32)
    labels = [str(i // (n // 4)) for i in range(n)]
    table = pa.table({"uri": [f"s3://lake/{i}.jpg" for i in range(n)], "label": labels,
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), d)})
    pq.write_table(table, tmp_path / "emb.parquet", row_group_size=100)
    return load_config(data={"input": {"embeddings": str(tmp_path / "emb.parquet")}, "knn": knn,
                             "selections": [{"name": "train", "mode": "representative", "budget": 40},
                                            {"name": "clean", "mode": "clean"}],
                             "output": {"uri": str(tmp_path / "out")}})


def test_vectors_never_reach_the_driver_on_the_sharded_path(ray_local, tmp_path, monkeypatch):
    """Shards, query tasks, cluster assignment, the map sample and the representative's
    per-class fetches all read vectors in Ray workers: reading them in this (driver) process fails."""
    from curation.index import source
    from curation.job import run_job

    driver = os.getpid()

    def guarded(original):
        def call(*args, **kwargs):
            if os.getpid() == driver:
                raise AssertionError("vectors read on the driver")
            return original(*args, **kwargs)
        return call

    monkeypatch.setattr(source.VectorParts, "read", guarded(source.VectorParts.read))
    monkeypatch.setattr(source, "_take_rows", guarded(source._take_rows))
    result = run_job(_embeddings_config(tmp_path, exact_below=100, shards=2))
    assert result.run_info["knn"]["kind"] == "ivf"
    assert result.run_info["counts"]["ok"] == 600
    # no pixels: copies are judged by the embedding, and run.json says what that cannot see
    assert result.run_info["knn"]["copies"]["method"].startswith("none: input.embeddings has no pixels")
    assert result.run_info["scores"]["label_quality"]["probe"]["sample"] == 600  # the probe ran in tasks too
    train = pq.read_table(os.path.join(result.run_uri, "selections", "train.parquet"))
    assert train.num_rows == 40 and sorted(set(train["label"].to_pylist())) == ["0", "1", "2", "3"]
    assert result.samples["cluster"].null_count == 0 and min(result.samples["cluster"].to_pylist()) >= 0


def test_a_run_with_no_usable_item_publishes_nothing_and_keeps_latest(ray_local, tmp_path, capsys):
    """A good run publishes; a later run whose every input is corrupt fails, leaves no
    _SUCCESS and does not move latest; an empty input folder fails the same way."""
    from curation.job import NothingToPublish, run_job

    good = run_job(_embeddings_config(tmp_path))
    out = tmp_path / "out"
    before = json.loads((out / "latest").read_text())
    assert before["run_id"] == good.run_id

    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.jpg").write_bytes(b"<html>not an image</html>")
    config = load_config(data={"input": {"images": str(bad)}, "output": {"uri": str(out), "run_id": "all-bad"},
                               "embedder": {"model": "thumbnail", "weights": "none"}})
    with pytest.raises(NothingToPublish, match="no usable item: 3 inputs"):
        run_job(config)
    assert not (out / "all-bad" / "_SUCCESS").exists()
    assert json.loads((out / "latest").read_text()) == before

    empty = tmp_path / "empty"
    empty.mkdir()
    config = load_config(data={"input": {"images": str(empty)}, "output": {"uri": str(out), "run_id": "empty"},
                               "embedder": {"model": "thumbnail", "weights": "none"}})
    with pytest.raises(NothingToPublish, match="no input items"):
        run_job(config)
    assert json.loads((out / "latest").read_text()) == before

    # A labels file that names none of the listed files: one clear line, non-zero exit, latest kept.
    import yaml

    from curation.cli import main

    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (16, 16), (i * 60, 0, 0)).save(images / f"{i}.png")
    (tmp_path / "labels.csv").write_text("path,label\nother/0.png,a\nother/1.png,b\n")
    config_file = tmp_path / "labels-mismatch.yaml"
    config_file.write_text(yaml.safe_dump({
        "input": {"images": str(images), "labels": str(tmp_path / "labels.csv")},
        "output": {"uri": str(out), "run_id": "labels-mismatch"}, "embedder": {"model": "thumbnail", "weights": "none"}}))
    assert main(["run", "--config", str(config_file), "--quiet"]) != 0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "input.labels" in line and "none of them is among the 3 listed inputs" in line, line
    assert json.loads((out / "latest").read_text()) == before


@pytest.mark.parametrize("where", ["local", "s3"])
def test_retention_keeps_the_newest_complete_runs_and_never_latest_or_unfinished(where, tmp_path, request):
    import json
    import time

    import pyarrow.fs as pafs

    from curation.config import StorageConfig
    from curation.io.filesystem import Resolver, write_bytes
    from curation.io.outputs import remove_old_runs

    if where == "s3":
        s3 = request.getfixturevalue("s3")
        s3.pyarrow_fs().create_dir("shared-tests")
        resolver, out = Resolver(StorageConfig(**s3.storage())), "s3://shared-tests/retention"
    else:
        resolver, out = Resolver(), str(tmp_path / "out")
    for run_id in ["r1", "r2", "r3", "r4"]:
        write_bytes(resolver.resolve(f"{out}/{run_id}/samples/part-0.parquet"), b"x")
        write_bytes(resolver.resolve(f"{out}/{run_id}/_SUCCESS"), b"")
        time.sleep(1.1)  # S3 keeps modification times to the second
    write_bytes(resolver.resolve(f"{out}/r0-crashed/samples/part-0.parquet"), b"x")  # no _SUCCESS: unfinished
    write_bytes(resolver.resolve(f"{out}/embedding-store/CURRENT"), b"{}")
    write_bytes(resolver.resolve(f"{out}/latest"), json.dumps({"run_id": "r1"}).encode())  # a newer run lost the CAS
    location = resolver.resolve(out)
    assert remove_old_runs(location, 0) == []  # 0 keeps everything
    assert sorted(remove_old_runs(location, 2)) == ["r2"]  # r4, r3 newest; r1 is latest
    # what still holds objects (an S3 server may keep listing an emptied prefix as a folder)
    left = location.filesystem.get_file_info(pafs.FileSelector(location.path, recursive=True))
    holding = {info.path[len(location.path) + 1:].split("/")[0] for info in left if info.type == pafs.FileType.File}
    assert sorted(holding) == ["embedding-store", "latest", "r0-crashed", "r1", "r3", "r4"]


def test_a_run_applies_retention_after_publishing(ray_local, tmp_path):
    from curation.job import run_job

    config = _embeddings_config(tmp_path, n=200)
    config.output.keep_runs = 1
    first = run_job(config)
    config.output.run_id = "second"
    second = run_job(config)
    runs = sorted(p.name for p in (tmp_path / "out").iterdir() if (p / "_SUCCESS").exists())
    assert runs == ["second"] and first.run_id != second.run_id


@pytest.mark.parametrize("where", ["local", "s3"])
def test_compare_and_swap_of_latest(where, tmp_path, request):
    from curation.config import StorageConfig
    from curation.io.filesystem import PreconditionFailed, Resolver, read_tagged, write_if_unchanged

    storage = None
    if where == "s3":
        s3 = request.getfixturevalue("s3")
        s3.pyarrow_fs().create_dir("shared-tests")  # one bucket, a prefix per test: each bucket costs volumes
        storage = StorageConfig(**s3.storage())
        location = Resolver(storage).resolve("s3://shared-tests/cas-unit/latest")
    else:
        (tmp_path / "out").mkdir()
        location = Resolver().resolve(str(tmp_path / "out" / "latest"))
    assert read_tagged(location, storage) == (None, None)
    write_if_unchanged(location, b"A", None, storage)  # created: there was none
    with pytest.raises(PreconditionFailed):
        write_if_unchanged(location, b"B", None, storage)  # someone created it meanwhile
    data, tag = read_tagged(location, storage)
    assert data == b"A"
    write_if_unchanged(location, b"C", tag, storage)  # unchanged since read: swapped
    with pytest.raises(PreconditionFailed):
        write_if_unchanged(location, b"D", tag, storage)  # stale tag
    assert read_tagged(location, storage)[0] == b"C"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_of_two_runs_started_from_the_same_latest_exactly_one_publishes(where, ray_local, tmp_path, request):
    import json

    from curation.io.filesystem import Resolver, read_bytes
    from curation.job import PublishConflict, preflight, run_job

    config = _embeddings_config_on(where, tmp_path, request, "cas-runs")
    resolver = Resolver(config.storage)
    config.output.run_id = "slow"
    slow = preflight(config, resolver)  # starts first, sees no latest
    config.output.run_id = "fast"
    run_job(config)  # starts later, publishes first
    with pytest.raises(PublishConflict, match="another run \\(fast\\) published"):
        run_job(config, resolver=resolver, plan=slow)
    latest = resolver.resolve(f"{config.output.uri}/latest")
    assert json.loads(read_bytes(latest))["run_id"] == "fast"  # untouched by the loser
    assert resolver.resolve(f"{config.output.uri}/slow/_SUCCESS").filesystem.get_file_info(
        resolver.resolve(f"{config.output.uri}/slow/_SUCCESS").path).size == 0  # complete, just not published
    config.output.run_id = "rerun"
    assert run_job(config).run_id == "rerun"  # a rerun starts from the new latest and publishes
    assert json.loads(read_bytes(latest))["run_id"] == "rerun"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_killed_run_leaves_latest_and_a_rerun_publishes(where, ray_local, tmp_path, request, monkeypatch):
    import json

    from curation.io.filesystem import Resolver, read_bytes
    from curation.job import run_job
    from curation.scores import REGISTRY

    config = _embeddings_config_on(where, tmp_path, request, "killed")
    resolver = Resolver(config.storage)
    latest = resolver.resolve(f"{config.output.uri}/latest")
    config.output.run_id = "night-1"
    run_job(config)

    def killed(ctx):  # the process dies mid-run (after outputs started)
        raise SystemExit("killed")

    monkeypatch.setattr(next(s for s in REGISTRY if s.name == "sparseness"), "compute", killed)
    config.output.run_id = "night-2"
    with pytest.raises(SystemExit):
        run_job(config)
    assert json.loads(read_bytes(latest))["run_id"] == "night-1"
    success = resolver.resolve(f"{config.output.uri}/night-2/_SUCCESS")
    assert success.filesystem.get_file_info(success.path).type.name == "NotFound"
    monkeypatch.undo()
    config.output.run_id = "night-2-rerun"
    rerun = run_job(config)
    assert json.loads(read_bytes(latest))["run_id"] == "night-2-rerun"
    assert rerun.run_info["diff"]["previous_run"].endswith("night-1")  # diffed against the last published run


def test_clusters_summary_reports_the_backend_the_training_task_used(monkeypatch):
    """run.json's k-means backend is what the (remote) training used, not the driver's guess:
    on a GPU cluster the task trains with cuML while the driver has no GPU."""
    from curation.config import ScoresConfig
    from curation.index.knn import KnnGraph
    from curation.scores import clusters
    from curation.scores.base import Columns, ScoreContext

    x = np.eye(4, dtype=np.float32)
    monkeypatch.setattr(clusters, "cluster_vectors",
                        lambda vectors, k: (np.zeros(4, np.int32), np.ones(4, np.float32), "cuml", np.eye(1, 4)))
    from curation.index.source import as_source

    ctx = ScoreContext(Columns(pa.table({"status": ["ok"] * 4})), np.ones(4, bool), as_source(x),
                       KnnGraph(np.zeros((4, 1), np.int32), np.zeros((4, 1), np.float32)), ScoresConfig())
    score = clusters.ClustersScore()
    assert clusters.kmeans_backend() != "cuml"  # this machine has no GPU
    assert score.summary(score.compute(ctx))["kmeans_backend"] == "cuml"


def test_a_run_uri_or_an_output_uri_resolves_to_the_published_run(tmp_path):
    from curation.io.filesystem import Resolver
    from curation.published_run import PublishedRun, latest_run_id

    resolve_run = PublishedRun.resolve

    output = Resolver().resolve(str(tmp_path))
    assert resolve_run(output) is None  # nothing published yet
    (tmp_path / "r1").mkdir()
    (tmp_path / "r1" / "_SUCCESS").write_text("")
    (tmp_path / "r2").mkdir()  # a run still being written
    (tmp_path / "latest").write_text(json.dumps({"run_id": "r1"}))
    assert resolve_run(output).path == str(tmp_path / "r1")
    assert resolve_run(output.child("r1")).path == str(tmp_path / "r1")
    assert resolve_run(output.child("r2")) is None
    (tmp_path / "latest").write_text(json.dumps({"run_id": "r2"}))
    assert resolve_run(output) is None  # latest names an incomplete run
    assert latest_run_id(b"not json") is None and latest_run_id(None) is None and latest_run_id(b'{"run_id": 3}') is None


@pytest.mark.integration
def test_the_driver_does_not_import_torch(tmp_path):
    """torch (~300 MB) loads on the workers that decode and embed, never on the driver: not
    on import, nor in the preflight of an image run (whose model check needs no torch unless
    the model is one of torchvision's)."""
    import subprocess
    import sys

    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    probe = ("import sys, curation.cli, curation.job, curation.report, curation.similar, curation.export\n"
             "from curation.config import load_config\n"
             "from curation.preflight import preflight\n"
             f"c = load_config(data={{'input': {{'images': {str(tmp_path / 'images')!r}}}, "
             f"'output': {{'uri': {str(tmp_path / 'out')!r}}}, 'embedder': {{'model': 'thumbnail'}}}})\n"
             "from curation.io.filesystem import Resolver\n"
             "assert preflight(c, Resolver()).count == 1\n"
             "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr[-2000:]


def test_the_to_label_queue_and_the_validation_set_are_kept_from_night_to_night(tmp_path):
    """Night 1 queues items for labelling and holds out a validation set disjoint from the clean
    set; night 2 (nothing labelled since) keeps the same queue, in the same order, says how many
    are pending, and keeps the same validation set."""
    from curation.job import run_job

    config = _embeddings_config(tmp_path, n=400)
    table = pq.read_table(tmp_path / "emb.parquet")
    labels = [lab if i % 100 < 10 else None for i, lab in enumerate(table["label"].to_pylist())]  # 10% labelled
    pq.write_table(table.set_column(1, "label", pa.array(labels, pa.string())), tmp_path / "emb.parquet")
    config.selections = [s for s in config.selections if s.mode != "representative"]
    from curation.config import SelectionConfig

    config.selections.append(SelectionConfig(name="queue", mode="to_label", budget=12))
    config.selections.append(SelectionConfig(name="val", mode="validation", fraction=0.1, disjoint_from=["clean"]))
    config.report.map_method = "pca"  # the map is not what this test is about
    config.output.run_id = "night-1"
    first = run_job(config)
    queue = pq.read_table(os.path.join(first.run_uri, "selections", "queue.parquet"))
    assert queue.num_rows == 12 and queue["label"].null_count == 12
    assert next(s for s in first.info.selections if s.name == "queue").pending == 0
    config.output.run_id = "night-2"
    second = run_job(config)
    again = pq.read_table(os.path.join(second.run_uri, "selections", "queue.parquet"))
    assert again["uri"].to_pylist() == queue["uri"].to_pylist()
    assert next(s for s in second.info.selections if s.name == "queue").pending == 12
    by_name = {s["name"]: s for s in second.run_info["selections"]}
    assert by_name["queue"]["pending"] == 12  # in run.json too
    assert all(r.startswith("pending from the previous run") for r in again["reason"].to_pylist())
    val = [pq.read_table(os.path.join(run.run_uri, "selections", "val.parquet"))["uri"].to_pylist()
           for run in (first, second)]
    clean = pq.read_table(os.path.join(first.run_uri, "selections", "clean.parquet"))["uri"].to_pylist()
    assert len(val[0]) == 40 and set(val[0]) == set(val[1]) and not set(val[0]) & set(clean)
    details = by_name["val"]["details"]
    assert details["sticky"] == 40 and details["leakage"] == {"clean": 0} and details["label_tv"] <= 0.05


def test_copies_across_splits_are_reported(tmp_path):
    """Embeddings with a `split` column and five planted copies of train items in `val`: each
    copy is a cross-split pair in leakage.parquet and run.json counts them; a split column
    the inputs do not have is a config error before any work."""
    from curation.job import run_job

    rng = np.random.default_rng(8)
    n, d = 400, 16
    x = rng.normal(size=(n, d)).astype(np.float32)
    split = ["train" if i < 320 else "val" for i in range(n)]
    for j, i in enumerate(range(320, 325)):
        x[i] = x[j] + 1e-4 * rng.normal(size=d)  # val item i copies train item j
    table = pa.table({"uri": [f"s3://lake/{i}.jpg" for i in range(n)], "split": split,
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), d)})
    pq.write_table(table, tmp_path / "emb.parquet")
    config = load_config(data={"input": {"embeddings": str(tmp_path / "emb.parquet")},
                               "report": {"map_method": "pca"}, "output": {"uri": str(tmp_path / "out")},
                               "selections": [{"name": "clean", "mode": "clean"}]})
    result = run_job(config)
    leaks = pq.read_table(os.path.join(result.run_uri, "leakage.parquet")).to_pylist()
    pairs = {(r["uri_a"], r["uri_b"]) for r in leaks}
    assert {(f"s3://lake/{i}.jpg", f"s3://lake/{320 + i}.jpg") for i in range(5)} <= pairs
    assert all(r["split_a"] == "train" and r["split_b"] == "val" and r["similarity"] > 0.99 for r in leaks)
    info = result.run_info["leakage"]
    assert info["pairs_by_splits"] == {"train|val": len(leaks)} and info["split_from"] == "column 'split'"
    assert info["share_with_a_copy_elsewhere"]["val"] == pytest.approx(len({r["uri_b"] for r in leaks}) / 80)

    config.input.split_column = "fold"
    from curation.job import preflight
    from curation.io.filesystem import Resolver

    with pytest.raises(ConfigError, match=r"input.split_column': no column 'fold' in the inputs \(columns: split\)"):
        preflight(config, Resolver(config.storage))


def test_the_split_from_the_path_is_the_first_folder_under_the_images_root():
    from curation.leakage import split_values

    samples = pa.table({"uri": ["/data/train/cat/1.jpg", "/data/val/2.jpg", "/data/3.jpg", "/other/x.jpg"]})
    assert split_values(samples, column=None, images_root="/data").to_pylist() == ["train", "val", None, None]
    assert split_values(samples, column="split", images_root=None) is None


def test_label_corrections_are_applied_kept_and_a_wrong_one_is_disputed(tmp_path):
    """Night 1 flags planted flips; the annotators' answers (a CSV) correct four of them, tie on
    the fifth, name an unknown item, and "correct" a clean item to a wrong class. Night 2 applies
    the majority answers; night 3 keeps them without the file."""
    from curation.job import run_job

    from tests.conftest import FLIPS, flipped_labels_set

    data, uris = flipped_labels_set(tmp_path, review_budget=300)
    flips = list(FLIPS)
    first = run_job(load_config(data=data))
    review = lambda run: set(pq.read_table(os.path.join(run.run_uri, "selections", "label_review.parquet"))
                             .filter(pc.field("score") < 0.3)["uri"].to_pylist())  # noqa: E731
    assert {uris[i] for i in flips} <= review(first)
    answers = [(uris[i], "a") for i in flips[:4] for _ in range(2)]  # two annotators agree
    answers += [(uris[flips[4]], "a"), (uris[flips[4]], "b")]  # a tie: not applied
    answers += [("s3://lake/missing.jpg", "a"), (uris[150], "c"), (uris[150], "c")]  # unknown; a wrong one
    (tmp_path / "answers.csv").write_text("uri,label\n" + "".join(f"{u},{lab}\n" for u, lab in answers))
    data["input"]["label_corrections"] = str(tmp_path / "answers.csv")
    second = run_job(load_config(data=data))
    rows = {r["uri"]: r for r in second.samples.to_pylist()}
    for i in flips[:4]:
        assert (rows[uris[i]]["label"], rows[uris[i]]["label_source"], rows[uris[i]]["given_label"]) == (
            "a", "corrected", "b")
        assert not rows[uris[i]]["is_suspected_mislabel"] and not rows[uris[i]]["is_disputed"]
    assert rows[uris[flips[4]]]["label_source"] == "given" and rows[uris[0]]["label_source"] == "given"
    wrong = rows[uris[150]]
    assert wrong["label"] == "c" and wrong["is_disputed"] and wrong["suggested_label"] == "b"
    assert "disputed correction: given 'b', corrected to 'c', the label models suggest 'b'" in wrong["reason"]
    listed = set(pq.read_table(os.path.join(second.run_uri, "selections", "label_review.parquet"))["uri"].to_pylist())
    assert uris[150] in listed and not {uris[i] for i in flips[:4]} & listed
    counts = second.run_info["corrections"]
    assert (counts["applied"], counts["new"], counts["unknown_uri"], counts["conflicting"]) == (5, 5, 1, 1)
    listed_in_diff = second.run_info["diff"]["corrections"]
    assert listed_in_diff["new"] == len(listed_in_diff["listed"]) == 5
    assert {"uri": uris[150], "given_label": "b", "label": "c"} in listed_in_diff["listed"]

    del data["input"]["label_corrections"]  # night 3: the corrections live on with the runs
    third = run_job(load_config(data=data))
    assert third.run_info["corrections"]["applied"] == 5 and third.run_info["corrections"]["kept_from_previous_runs"] == 5
    assert {r["uri"]: r["label"] for r in third.samples.to_pylist()}[uris[3]] == "a"


def test_a_label_studio_export_is_read_as_one_answer_per_annotation(tmp_path):
    from curation.corrections import majority, read_answers
    from curation.io.filesystem import resolve

    export = [
        {"data": {"uri": "s3://b/1.jpg", "image": "s3://b/1.jpg"}, "annotations": [
            {"result": [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": ["cat"]}}]},
            {"result": [{"type": "choices", "value": {"choices": ["cat"]}}]},
            {"was_cancelled": True, "result": [{"type": "choices", "value": {"choices": ["dog"]}}]}]},
        {"data": {"uri": "s3://b/2.jpg"}, "annotations": [
            {"result": [{"type": "choices", "value": {"choices": ["cat"]}}]},
            {"result": [{"type": "choices", "value": {"choices": ["dog"]}}]}]},
        {"data": {"uri": "s3://b/3.jpg"}, "annotations": [{"result": []}]},
    ]
    (tmp_path / "export.json").write_text(json.dumps(export))
    answers = read_answers(resolve(str(tmp_path / "export.json")))
    assert answers == {"s3://b/1.jpg": ["cat", "cat"], "s3://b/2.jpg": ["cat", "dog"]}
    assert majority(answers) == ({"s3://b/1.jpg": "cat"}, ["s3://b/2.jpg"])
