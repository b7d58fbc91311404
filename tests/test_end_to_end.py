"""The whole job on a planted demo set: local folders, and s3:// in and out of a real S3 server."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from curation.config import load_config
from curation.demo import demo_config, evaluate
from curation.job import run_job
from tests.conftest import upload_folder
from tests.contract import check_run_outputs

SELECTIONS = ["train", "edge_cases", "label_review", "clean"]


def _config(images: str, labels: str, output: str, storage: dict | None = None):
    data = demo_config("/unused", output, budget=60)
    data["input"] = {"images": images, "labels": labels}
    data["selections"][1]["budget"] = 10
    data["selections"][2]["budget"] = 40
    if storage:
        data["storage"] = storage
    return load_config(data=data)


@pytest.fixture(scope="module")
def local_run(ray_local, demo_set, tmp_path_factory):
    """Night 1 on local folders, over a copy of the demo set (night 2 changes its images)."""
    import shutil

    demo_root, truth = demo_set
    root = str(tmp_path_factory.mktemp("local-set"))
    shutil.copytree(os.path.join(demo_root, "images"), os.path.join(root, "images"))
    shutil.copy(os.path.join(demo_root, "labels.csv"), os.path.join(root, "labels.csv"))
    out = str(tmp_path_factory.mktemp("out"))
    config = _config(os.path.join(root, "images"), os.path.join(root, "labels.csv"), out)
    return run_job(config), out, truth, root


def test_local_run_meets_the_output_contract(local_run):
    result, out, truth, root = local_run
    samples = check_run_outputs(pafs.LocalFileSystem(), out, result.run_id,
                                images_uri=os.path.join(root, "images"), truth=truth, selection_names=SELECTIONS)
    assert samples.num_rows == result.run_info["counts"]["inputs"]
    # copies have their own graph, among the copy descriptors stored beside the vectors
    assert result.run_info["knn"]["copies"]["method"].startswith("exact")
    parts = pq.read_table(os.path.join(result.run_uri, "embeddings"))
    assert parts.schema.field("copy_vector").type.value_type == pa.float16()
    assert parts.schema.field("copy_vector").type.list_size == 256


def test_local_run_finds_planted_defects(local_run):
    result, out, truth, root = local_run
    import pyarrow.parquet as pq

    selections = {name: pq.read_table(f"{result.run_uri}/selections/{name}.parquet").to_pandas() for name in SELECTIONS}
    rows = {r["defect"]: r for r in evaluate(truth, result.samples.to_pandas(), selections, os.path.join(root, "images"))}
    # Thresholds well below what the demo set gives, so a regression fails without flakiness.
    assert rows["exact duplicate"]["recall"] == 1.0
    assert rows["near duplicate"]["recall"] >= 0.75
    assert rows["dark"]["recall"] == 1.0 and rows["dark"]["precision"] >= 0.9
    assert rows["bright"]["recall"] >= 0.8 and rows["bright"]["precision"] >= 0.8
    assert rows["blurry"]["recall"] >= 0.8 and rows["blurry"]["precision"] >= 0.8
    assert rows["flipped label in label_review"]["recall"] >= 0.8
    assert rows["corrupt (rejected)"]["recall"] == 1.0


def test_a_failed_rerun_moves_nothing_and_the_second_night_embeds_only_what_changed(local_run, monkeypatch):
    """A run that fails after its outputs started (a score raises) leaves no _SUCCESS and does
    not move latest; the next good run does, embeds only new and changed images (the store has
    the rest) and diffs itself against the last published run."""
    result, out, truth, root = local_run
    import json

    from curation.scores import REGISTRY

    latest = os.path.join(out, "latest")
    before = json.load(open(latest))
    assert before["run_id"] == result.run_id
    assert os.path.exists(os.path.join(result.run_uri, "_SUCCESS"))
    run_json = json.load(open(os.path.join(result.run_uri, "run.json")))
    assert run_json["embedder"]["model"] == "thumbnail" and run_json["embedder"]["warning"]
    assert run_json["config"]["output"]["uri"] == out

    def fail(ctx):
        raise RuntimeError("injected score failure")

    config = _config(os.path.join(root, "images"), os.path.join(root, "labels.csv"), out)
    config.output.run_id = "failed-run"
    monkeypatch.setattr(next(s for s in REGISTRY if s.name == "sparseness"), "compute", fail)
    with pytest.raises(RuntimeError, match="injected score failure"):
        run_job(config)
    assert os.path.isdir(os.path.join(out, "failed-run", "embeddings"))  # it had started writing
    assert not os.path.exists(os.path.join(out, "failed-run", "_SUCCESS"))
    assert json.load(open(latest)) == before

    monkeypatch.undo()
    second = _second_night(config, result)
    assert json.load(open(latest))["run_id"] == "night-2" == second.run_id


def test_s3_in_and_out_night_after_night(ray_local, s3, demo_set, caplog):
    """Both nights in and out of the S3 server: the output contract, no credential anywhere,
    and the second night's store reuse and diff."""
    root, truth = demo_set
    fs = s3.pyarrow_fs()
    fs.create_dir("curation-e2e")
    upload_folder(fs, root, "curation-e2e/raw")
    config = _config("s3://curation-e2e/raw/images", "s3://curation-e2e/raw/labels.csv",
                     "s3://curation-e2e/curation", storage=s3.storage())
    result = run_job(config)
    assert result.run_uri == f"s3://curation-e2e/curation/{result.run_id}"
    samples = check_run_outputs(fs, "curation-e2e/curation", result.run_id,
                                images_uri="s3://curation-e2e/raw/images", truth=truth, selection_names=SELECTIONS)
    assert all(u.startswith("s3://curation-e2e/raw/images/") for u in samples["uri"].to_pylist())
    from curation.io.filesystem import Resolver
    from curation.similar import similar

    some = samples.filter(pa.compute.equal(samples["status"], "ok"))["uri"][0].as_py()
    hits = similar(run="s3://curation-e2e/curation", uris=[some], k=3, space="copy", resolver=Resolver(config.storage))
    assert hits.num_rows == 3 and some not in hits["uri"].to_pylist()
    _second_night(config, result)
    # Credentials never reach any output (run.json, report, Parquet, store, index, diff) nor the log.
    import pyarrow.fs as pafs

    written = [info for info in fs.get_file_info(pafs.FileSelector("curation-e2e/curation", recursive=True))
               if info.type == pafs.FileType.File]
    assert sum(info.path.endswith("run.json") for info in written) == 2 and len(written) > 20
    for info in written:
        with fs.open_input_stream(info.path) as fh:
            data = fh.read()
        assert s3.secret_key.encode() not in data and s3.access_key.encode() not in data, info.path
    assert s3.secret_key not in caplog.text and s3.access_key not in caplog.text


def _second_night(config, first):
    """Night 2 over ``config.input.images`` after night 1 (``first``): 5% new images, 2% changed,
    1% deleted; returns the run after checking its store reuse and its diff."""
    import io

    from PIL import Image, ImageOps

    from curation.io.filesystem import Resolver, list_files, read_bytes, write_bytes

    resolver = Resolver(config.storage)
    root = resolver.resolve(config.input.images)
    names = sorted(f.path[len(root.path) + 1:] for f in list_files(root) if f.path.endswith(".jpg") and f.size > 1000)
    n = first.run_info["counts"]["inputs"]
    new, changed, deleted = round(0.05 * n), round(0.02 * n), round(0.01 * n)

    def image(name):
        return Image.open(io.BytesIO(read_bytes(root.child(name)))).convert("RGB")

    def save(img, name, quality):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        write_bytes(root.child(name), buf.getvalue())

    for i, name in enumerate(names[:new]):  # new images: mirrored versions under new names
        save(ImageOps.mirror(image(name)), f"{os.path.dirname(name)}/night2_{i}.jpg", 90)
    for name in names[new:new + changed]:  # same name, new content
        save(image(name).rotate(90), name, 70)
    gone = names[new + changed:new + changed + deleted]
    for name in gone:
        location = root.child(name)
        location.filesystem.delete_file(location.path)
    if config.input.labels:  # a deleted image leaves the labels file too (else it is a `missing` row)
        labels = resolver.resolve(config.input.labels)
        lines = read_bytes(labels).decode().splitlines(keepends=True)
        write_bytes(labels, "".join(line for line in lines if line.split(",", 1)[0] not in gone).encode())
    config.output.run_id = "night-2"
    second = run_job(config)
    diff = second.run_info["diff"]
    assert diff["previous_run"].endswith(first.run_id)
    assert diff["inputs"] == {"new": new, "changed": changed, "deleted": deleted}
    assert second.run_info["embedder"]["store"]["embedded"] == new + changed  # the rest came from the store
    assert second.run_info["counts"]["inputs"] == n + new - deleted
    fs = resolver.resolve(second.run_uri).filesystem
    train = pq.read_table(resolver.resolve(f"{second.run_uri}/diff/train.parquet").path, filesystem=fs).to_pandas()
    assert set(train.change) <= {"added", "removed"}
    assert len(train[train.change == "added"]) == diff["selections"]["train"]["added"]
    first_train = set(pq.read_table(resolver.resolve(f"{first.run_uri}/selections/train.parquet").path,
                                    filesystem=fs)["uri"].to_pylist())
    assert set(train[train.change == "removed"].uri) <= first_train
    assert "diff" not in first.run_info  # the first night has nothing to compare with
    return second


def _knn_rows(run_uri: str) -> dict:
    table = pq.read_table(os.path.join(run_uri, "knn"))
    return {r["uri"]: r for r in table.to_pylist()}


def test_similar_over_a_local_run_finds_copies_and_repeats_its_knn(local_run, capsys):
    """`curation similar` on the exact-search run: a planted copy's best copy-space hit is its
    original, an item's first knn.k hits are its knn/ row, an image file finds itself."""
    from curation.cli import main
    from curation.similar import RunSearch, similar

    result, out, truth, root = local_run
    images = os.path.join(root, "images")
    copies = RunSearch(out, space="copy")
    assert copies.method.startswith("exact")
    for planted in truth["exact_duplicate"][:3] + truth["near_duplicate"][:5]:
        hits = copies.by_uri([os.path.join(images, planted["item"])], k=3)
        assert hits["uri"][0].as_py() == os.path.join(images, planted["of"]), planted
    knn = _knn_rows(result.run_uri)
    search = RunSearch(result.run_uri)
    some = sorted(knn)[::40]
    hits = search.by_uri(some, k=15)
    for uri in some:
        mine = hits.filter(pa.compute.equal(hits["query"], uri))
        k = len(knn[uri]["neighbor_ids"])
        by_id = {r["input_id"]: r["uri"] for r in knn.values()}
        assert mine["uri"].to_pylist()[:k] == [by_id[i] for i in knn[uri]["neighbor_ids"]]
        assert max(abs(a - b) for a, b in zip(mine["similarity"].to_pylist()[:k],
                                               knn[uri]["neighbor_similarities"])) < 1e-5
        assert uri not in mine["uri"].to_pylist()
    # An image file, decoded and embedded as the run did, finds the item it is.
    file = some[0]
    found = similar(run=out, images=[file], k=1)
    assert found["uri"][0].as_py() == file and found["similarity"][0].as_py() > 0.999
    # --where filters first: every hit passes it, and k of them come back.
    label = knn[file]["uri"].split("/")[-2]
    assert main(["similar", "--run", out, "--uri", file, "-k", "5", "--where", f"label != '{label}'",
                 "--out", os.path.join(out, "hits.parquet")]) == 0
    written = pq.read_table(os.path.join(out, "hits.parquet"))
    assert written.num_rows == 5 and label not in written["label"].to_pylist()
    assert "rank" in capsys.readouterr().out
    # A run whose embedder this install cannot reproduce is refused, naming both ids.
    from curation.io.filesystem import Resolver
    from curation.stages.query import QueryImageError, embed_images

    info = search.info
    info.embedder = dict(info.embedder, model_id="thumbnail@other/32")
    with pytest.raises(QueryImageError, match="thumbnail@other/32.*but this install loads"):
        embed_images([file], info, space="embedding", resolver=Resolver())


def test_threshold_evidence_counts_what_moving_each_threshold_flags(local_run):
    """run.json has, per threshold, what nearby values would flag (equal to the flags at the
    configured value) and the items or pairs either side; the report shows them side by side."""
    import json

    result, out, truth, root = local_run
    info = json.load(open(os.path.join(result.run_uri, "run.json")))
    samples = pq.read_table(os.path.join(result.run_uri, "samples"))
    flags = {c: int(pa.compute.sum(pa.compute.fill_null(samples[c], False)).as_py() or 0)
             for c in ("is_dark", "is_suspected_mislabel", "is_low_information")}
    junk = info["scores"]["junk"]["thresholds"]
    assert junk["dark_highlights"]["flagged_at"][str(junk["dark_highlights"]["value"])] == flags["is_dark"]
    assert junk["low_information_std"]["flagged_at"][str(junk["low_information_std"]["value"])] == \
        flags["is_low_information"]
    quality = info["scores"]["label_quality"]["thresholds"]["label_quality_threshold"]
    at = quality["flagged_at"]
    assert at[str(quality["value"])] == flags["is_suspected_mislabel"] > 0
    assert list(at.values()) == sorted(at.values())  # a higher threshold flags more
    assert all(e["label_quality"] < quality["value"] for e in quality["flagged"])
    assert all(e["label_quality"] >= quality["value"] for e in quality["not_flagged"]) and quality["not_flagged"]
    copies = info["scores"]["duplicates"]["thresholds"]["copy_cosine"]
    assert list(copies["pairs_at"].values()) == sorted(copies["pairs_at"].values(), reverse=True)
    group = dict(zip(samples["uri"].to_pylist(), samples["dup_group"].to_pylist()))
    for pair in copies["flagged"]:  # a pair over the line is one duplicate group
        assert pair["similarity"] >= copies["value"] and group[pair["uri_a"]] == group[pair["uri_b"]] is not None
    assert copies["not_flagged"] and all(p["similarity"] < copies["value"] for p in copies["not_flagged"])
    page = open(os.path.join(result.run_uri, "report.html")).read()
    assert "Either side of copy_cosine" in page and "Either side of label_quality_threshold" in page
    assert "<h2>Thresholds</h2>" in page
