"""Ingestion end to end: a bad-input corpus, manifests with metadata and precomputed embeddings
against the S3 server, and the incremental embedding store."""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.config import load_config
from curation.demo import render_scene
from curation.job import run_job
from tests.conftest import upload_folder


def _jpeg(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _png(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", **kw)
    return buf.getvalue()


def _config(images, output, **extra):
    data = {"input": {"images": images}, "output": {"uri": output},
            "embedder": {"model": "thumbnail", "image_size": 32, "batch_size": 32},
            "selections": [{"name": "clean", "mode": "clean"}]}
    for key, value in extra.items():
        section, name = key.split("__")
        data.setdefault(section, {})[name] = value
    return load_config(data=data)


def _samples(result) -> dict:
    """uri -> its first row (a repeated labels row is a second, rejected row with the same uri)."""
    rows: dict = {}
    for row in result.samples.to_pylist():
        rows.setdefault(row["uri"], row)
    return rows


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus") / "images"
    root.mkdir()
    rng = np.random.default_rng(3)
    photo = render_scene("tomato", rng, size=120)
    upright = photo.crop((0, 0, 120, 80))
    files = {
        "good.jpg": _jpeg(photo),
        "empty.jpg": b"",
        "truncated.jpg": _jpeg(render_scene("leaf", rng, size=300))[:3000],
        "page.jpg": b"<!DOCTYPE html><html><body>Access denied</body></html>",
        "photo.heic.jpg": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64),
        "huge.png": _png(Image.new("L", (2000, 1500), 128)),
        "cmyk.jpg": _jpeg(photo.convert("CMYK")),
        "palette.png": _png(photo.convert("P")),
        "grey16.png": _png(Image.fromarray(np.asarray(photo.convert("L"), np.uint16) * 257)),
        "rgba.png": _png(photo.convert("RGBA")),
        "grey.jpg": _jpeg(photo.convert("L")),
        "notes.txt": b"not an image",
        "upright.png": _png(upright),
    }
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    files["rotated.jpg"] = _jpeg(upright.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())
    gif = io.BytesIO()
    frames = [photo.convert("P"), render_scene("sky", rng, size=120).convert("P")]
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    files["animated.gif"] = gif.getvalue()
    for name, data in files.items():
        (root / name).write_bytes(data)
    labels = root.parent / "labels.csv"
    labels.write_text("path,label\ngood.jpg,tomato\nghost.jpg,tomato\ngood.jpg,leaf\n")
    return root, labels, files


def test_bad_input_corpus_every_row_present_with_specific_reasons(ray_local, bad_corpus, tmp_path):
    root, labels, files = bad_corpus
    config = _config(str(root), str(tmp_path / "out"), input__labels=str(labels), decode__max_pixels=2_000_000)
    result = run_job(config)
    rows = _samples(result)
    uri = lambda name: str(root / name)  # noqa: E731
    # every listed file + the labels row with no file + the repeated labels row
    assert result.run_info["counts"]["inputs"] == len(files) + 2 == result.samples.num_rows
    expected = {
        "empty.jpg": "corrupt: empty file", "truncated.jpg": "corrupt: truncated JPEG",
        "page.jpg": "not an image: looks like HTML", "photo.heic.jpg": "unsupported format: HEIC",
        "huge.png": "too many pixels: 2000x1500", "notes.txt": "not an image: extension '.txt'",
        "ghost.jpg": "missing: object does not exist",
    }
    for name, reason in expected.items():
        assert rows[uri(name)]["status"] == "rejected", name
        assert rows[uri(name)]["reason"].startswith(reason), (name, rows[uri(name)]["reason"])
    for name in ("good.jpg", "cmyk.jpg", "palette.png", "grey16.png", "rgba.png", "grey.jpg", "animated.gif",
                 "rotated.jpg", "upright.png"):
        assert rows[uri(name)]["status"] == "ok", (name, rows[uri(name)]["reason"])
    assert rows[uri("good.jpg")]["label"] == "tomato"
    duplicate_row = [r for r in result.samples.to_pylist() if r["reason"] and r["reason"].startswith("duplicate labels row")]
    assert len(duplicate_row) == 1 and duplicate_row[0]["uri"] == uri("good.jpg")
    assert (rows[uri("rotated.jpg")]["width"], rows[uri("rotated.jpg")]["height"]) == (120, 80)
    # The EXIF-rotated file embeds like the upright image (JPEG vs PNG: nearly, not bit-exact).
    emb = pq.read_table(os.path.join(result.run_uri, "embeddings")).to_pylist()
    vectors = {r["uri"]: np.asarray(r["embedding"]) for r in emb}
    assert vectors[uri("rotated.jpg")] @ vectors[uri("upright.png")] > 0.995
    assert vectors[uri("rotated.jpg")] @ vectors[uri("good.jpg")] < 0.99


def test_manifest_with_metadata_on_s3(ray_local, s3, demo_set):
    root, truth = demo_set
    fs = s3.pyarrow_fs()
    fs.create_dir("manifest-e2e")
    upload_folder(fs, os.path.join(root, "images", "sky"), "manifest-e2e/raw/sky")
    names = sorted(os.listdir(os.path.join(root, "images", "sky")))[:40]
    uris = [f"s3://manifest-e2e/raw/sky/{n}" for n in names] + ["s3://manifest-e2e/raw/sky/gone.jpg", "sky/" + names[0]]
    manifest = pa.table({
        "uri": uris,
        "label": ["sky"] * len(uris),
        "site": [f"site-{i % 3}" for i in range(len(uris))],
        "captured_at": pa.array(np.arange(len(uris), dtype=np.int64) * 1000),
    })
    with fs.open_output_stream("manifest-e2e/raw/index.parquet") as fh:
        pq.write_table(manifest, fh)
    config = load_config(data={
        "input": {"manifest": "s3://manifest-e2e/raw/index.parquet"}, "storage": s3.storage(),
        "embedder": {"model": "thumbnail", "image_size": 32},
        "selections": [{"name": "by_site", "mode": "clean", "balance_on": "site", "where": "captured_at >= 0",
                        "budget": 9}],
        "output": {"uri": "s3://manifest-e2e/out"},
    })
    result = run_job(config)
    samples = pq.read_table(f"manifest-e2e/out/{result.run_id}/samples", filesystem=fs)
    assert samples.num_rows == len(uris)
    assert samples["site"].to_pylist() == manifest["site"].to_pylist()
    assert samples["captured_at"].to_pylist() == manifest["captured_at"].to_pylist()
    assert samples.schema.field("captured_at").type == pa.int64()
    rows = {r["uri"]: r for r in samples.to_pylist()}
    assert rows["s3://manifest-e2e/raw/sky/gone.jpg"]["reason"].startswith("missing")
    # a relative uri resolves against the manifest's folder: the same object listed twice
    assert rows[f"s3://manifest-e2e/raw/sky/{names[0]}"]["status"] == "ok"
    assert sum(1 for u in samples["uri"].to_pylist() if u == f"s3://manifest-e2e/raw/sky/{names[0]}") == 2
    # metadata balance in run.json: the site column overall and inside the balanced selection
    site = result.run_info["balance"]["site"]
    ok_sites = [r["site"] for r in samples.to_pylist() if r["status"] == "ok"]
    assert sum(site["ok"]["counts"].values()) == len(ok_sites)
    assert site["selections"]["by_site"]["counts"] == {"site-0": 3, "site-1": 3, "site-2": 3}
    assert site["selections"]["by_site"]["max_min_ratio"] == 1.0
    assert result.run_info["balance"]["label"]["ok"]["counts"] == {"sky": len(ok_sites)}


@pytest.mark.parametrize("knn", [{}, {"exact_below": 50, "shards": 2}], ids=["exact", "sharded"])
def test_precomputed_embeddings_on_s3(ray_local, s3, knn):
    """Also on the sharded path: the shard actors stream the vectors from the S3 input files
    themselves (skipping the rejected row) and save their indexes back to S3."""
    rng = np.random.default_rng(9)
    centers = rng.normal(size=(3, 24))
    vectors = np.concatenate([c + 0.6 * rng.normal(size=(40, 24)) for c in centers]).astype(np.float32)
    labels = [c for c in "abc" for _ in range(40)]
    labels[3] = "c"
    n = len(labels)
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 24)
    embedding = pa.array([None if i == 7 else embedding[i].as_py() for i in range(n)], pa.list_(pa.float32()))
    table = pa.table({"uri": [f"s3://lake/img/{i}.jpg" for i in range(n)], "embedding": embedding, "label": labels})
    fs = s3.pyarrow_fs()
    fs.create_dir("emb-e2e")
    with fs.open_output_stream("emb-e2e/vectors/part-0.parquet") as fh:
        pq.write_table(table, fh)
    config = load_config(data={
        "input": {"embeddings": "s3://emb-e2e/vectors/"}, "storage": s3.storage(),
        "selections": [{"name": "review", "mode": "label_review", "budget": 5}],
        "output": {"uri": f"s3://emb-e2e/out-{len(knn)}"}, "knn": knn,
    })
    result = run_job(config)
    rows = {r["uri"]: r for r in result.samples.to_pylist()}
    assert result.run_info["counts"] == {"inputs": n, "ok": n - 1, "rejected": 1}
    assert rows["s3://lake/img/7.jpg"]["reason"] == "corrupt: null embedding"
    assert rows["s3://lake/img/3.jpg"]["is_suspected_mislabel"] and rows["s3://lake/img/3.jpg"]["suggested_label"] == "a"
    review = pq.read_table(f"emb-e2e/out-{len(knn)}/{result.run_id}/selections/review.parquet", filesystem=fs)
    assert review["uri"][0].as_py() == "s3://lake/img/3.jpg"
    if knn:
        info = result.run_info["knn"]
        assert info["kind"] == "ivf" and info["add_from"].startswith("storage") and sum(info["shard_sizes"]) == n - 1
        saved = fs.get_file_info(pafs.FileSelector(f"emb-e2e/out-{len(knn)}/{result.run_id}/index"))
        assert sorted(f.base_name for f in saved) == ["shard-00000.faissindex", "shard-00001.faissindex",
                                                     "trained.faissindex"]


def test_incremental_store_embeds_only_new_and_changed(ray_local, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(5)
    for i in range(100):
        (images / f"{i:03d}.jpg").write_bytes(_jpeg(render_scene("grape" if i % 2 else "sand", rng, size=48)))
    out = str(tmp_path / "out")

    first = run_job(_config(str(images), out))
    assert first.run_info["embedder"]["store"] == {"reused": 0, "embedded": 100, "rejected": 0}
    second = run_job(_config(str(images), out))
    assert second.run_info["embedder"]["store"] == {"reused": 100, "embedded": 0, "rejected": 0}
    assert "decode_embed" not in second.run_info["timings_s"]  # no Ray work at all

    for i in range(100, 105):  # 5% new
        (images / f"{i:03d}.jpg").write_bytes(_jpeg(render_scene("leaf", rng, size=48)))
    for i in (10, 11):  # 2% changed
        (images / f"{i:03d}.jpg").write_bytes(_jpeg(render_scene("sky", rng, size=64)))
    for i in (20, 21, 22):  # deleted
        os.remove(images / f"{i:03d}.jpg")
    third = run_job(_config(str(images), out))
    assert third.run_info["embedder"]["store"] == {"reused": 95, "embedded": 7, "rejected": 0}
    uris = set(third.samples["uri"].to_pylist())
    assert str(images / "020.jpg") not in uris and len(uris) == 102

    # Reused vectors are the stored ones; changed files got new vectors.
    def vectors(result):
        return {r["uri"]: np.asarray(r["embedding"]) for r in pq.read_table(os.path.join(result.run_uri, "embeddings")).to_pylist()}
    v1, v3 = vectors(first), vectors(third)
    np.testing.assert_array_equal(v1[str(images / "050.jpg")], v3[str(images / "050.jpg")])
    assert v1[str(images / "010.jpg")] @ v3[str(images / "010.jpg")] < 0.99
    store = os.path.join(out, "embedding-store")
    (model_dir,) = os.listdir(store)
    current = json.load(open(os.path.join(store, model_dir, "CURRENT")))
    assert current["rows"] == 102

    # A different embedder never reuses these vectors.
    other = run_job(_config(str(images), out, embedder__image_size=24))
    assert other.run_info["embedder"]["store"]["reused"] == 0
    shutil.rmtree(out)


def test_embeddings_can_be_stored_as_float16(tmp_path):
    from curation.io.filesystem import resolve
    from testkit.vectors import write_embeddings

    vectors = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    samples = pa.table({"uri": ["a", "b", "c", "d"], "status": ["ok", "rejected", "ok", "ok"],
                        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 8)})
    write_embeddings(resolve(str(tmp_path / "emb")), samples, model_id="m@x/32px", store_dtype="float16")
    table = pq.read_table(tmp_path / "emb")
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), 8)
    assert table["uri"].to_pylist() == ["a", "c", "d"] and set(table["model_id"].to_pylist()) == {"m@x/32px"}
    stored = np.array(table["embedding"].to_pylist(), np.float32)
    np.testing.assert_allclose(stored, vectors[[0, 2, 3]], atol=2e-3)
