"""Detection runs night after night: an image whose boxes changed re-embeds only the changed
crops (and its background squares, which avoid its boxes); unchanged images are neither decoded
nor embedded; every copied crop vector is the one the first night embedded. Box selections,
their diff by object_id, and image selections balanced over the boxes' classes."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.config import load_config
from testkit.detection import make_detection_set
from tests.test_objects import detection_config, read_objects_folder


def crop_vectors(run_uri: str) -> dict[str, np.ndarray]:
    """object_id -> its crop vector, for the run's ok boxes."""
    objects = read_objects_folder(run_uri)
    stored = pq.read_table(os.path.join(run_uri, "object-embeddings"))
    vectors = np.stack(stored["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    by_row = {int(r): vectors[i] for i, r in enumerate(stored["object_row"].to_numpy()) if r >= 0}
    return {row["object_id"]: by_row[i] for i, row in enumerate(objects.to_pylist()) if row["status"] == "ok"}


def store_counts(run_uri: str) -> dict:
    return json.load(open(os.path.join(run_uri, "run.json")))["embedder"]["store"]


@pytest.fixture(scope="module")
def two_nights(ray_local, tmp_path_factory):
    """Night 1 on a shapes set; night 2 with one box moved and one added on image A, and image
    B's file rewritten (a night with nothing changed: tests/test_label_studio.py's third)."""
    from curation.job import run_job

    root = str(tmp_path_factory.mktemp("nightly-detection"))
    make_detection_set(root, n_images=8, seed=11, source="shapes")
    out = str(tmp_path_factory.mktemp("nightly-out"))
    annotations = os.path.join(root, "annotations.json")
    data = detection_config(os.path.join(root, "images"), annotations, out)
    data["report"]["map_points"] = 0  # (no map: not what these tests are about)
    data["selections"] = [{"name": "boxes", "mode": "box_review", "budget": 6, "where": "area > 0"},
                          {"name": "label_review", "mode": "label_review", "budget": 4},
                          {"name": "even", "mode": "clean", "budget": 3, "balance_on": "object_label"}]
    config = load_config(data=data)
    first = run_job(config)
    doc = json.load(open(annotations))
    image_a, image_b = doc["images"][0], doc["images"][1]
    boxes_a = [a for a in doc["annotations"] if a["image_id"] == image_a["id"]]
    moved = boxes_a[0]
    moved["bbox"] = [moved["bbox"][0] + 6, moved["bbox"][1] + 4, moved["bbox"][2], moved["bbox"][3]]
    added = dict(boxes_a[-1], id=max(a["id"] for a in doc["annotations"]) + 1,
                 bbox=[2, 2, 24, 24], area=576.0)
    doc["annotations"].append(added)
    json.dump(doc, open(annotations, "w"))
    path_b = os.path.join(root, "images", image_b["file_name"])
    with Image.open(path_b) as image:
        image.load()
        image.transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(path_b + ".tmp", format=image.format)
    shutil.move(path_b + ".tmp", path_b)
    second = run_job(config)
    prefix = os.path.join(root, "images") + "/"
    return first, second, {"a": prefix + image_a["file_name"], "b": prefix + image_b["file_name"],
                                  "boxes_b": sum(a["image_id"] == image_b["id"] for a in doc["annotations"])}


def test_a_changed_box_re_embeds_only_its_crops(two_nights):
    first, second, changed = two_nights
    before, after = crop_vectors(first.run_uri), crop_vectors(second.run_uri)
    objects = read_objects_folder(second.run_uri).to_pylist()
    uri_of = {r["object_id"]: r["uri"] for r in objects}
    kept = set(before) & set(after)
    new = set(after) - set(before)
    # the moved box and the added box are new objects; image B's boxes keep their ids (same
    # geometry) but their image changed, so their crops are new vectors
    assert {uri_of[o] for o in new} == {changed["a"]} and len(new) == 2
    for object_id in kept:
        same = np.array_equal(before[object_id], after[object_id])
        assert same == (uri_of[object_id] != changed["b"]), (object_id, uri_of[object_id])
    counts = store_counts(second.run_uri)
    samples = pq.read_table(os.path.join(second.run_uri, "samples"))
    ok_images = sum(s == "ok" for s in samples["status"].to_pylist())
    assert counts["embedded"] == 1 and counts["reused"] == ok_images - 1  # image B only; A's vector is copied
    background = pq.read_table(os.path.join(second.run_uri, "object-embeddings"))["object_row"].to_numpy()
    backgrounds_of_a_and_b = sum(1 for r, i in zip(background, pq.read_table(
        os.path.join(second.run_uri, "object-embeddings"))["input_id"].to_numpy())
        if r < 0 and samples["uri"][int(i)].as_py() in (changed["a"], changed["b"]))
    # cut tonight: the two new boxes, image B's boxes, and the background squares of A and B
    assert counts["crops_embedded"] == 2 + changed["boxes_b"] + backgrounds_of_a_and_b
    assert counts["crops_copied"] == len(background) - counts["crops_embedded"]


def test_box_review_selects_boxes_lowest_quality_first_and_the_diff_keys_them_by_object_id(two_nights):
    first, second, changed = two_nights
    chosen = pq.read_table(os.path.join(first.run_uri, "selections", "boxes.parquet")).to_pylist()
    objects = read_objects_folder(first.run_uri)
    annotated = [r for r in objects.to_pylist() if r["source"] == "annotation" and r["status"] == "ok"]
    lowest = sorted(annotated, key=lambda r: r["box_quality"])[:6]
    assert len(chosen) == 6 and [r["object_id"] for r in chosen] == [r["object_id"] for r in lowest]
    assert [r["rank"] for r in chosen] == list(range(1, 7)) and chosen[0]["reason"].startswith("box quality")
    info = json.load(open(os.path.join(first.run_uri, "run.json")))
    assert next(s for s in info["selections"] if s["name"] == "boxes")["eligible"] == len(annotated)
    # night 2 against night 1, box by box: the moved box is a new object and its old self is gone
    diff = json.load(open(os.path.join(second.run_uri, "run.json")))["diff"]
    assert diff["objects"]["new"] == 2 and diff["objects"]["gone"] == 1
    rows = pq.read_table(os.path.join(second.run_uri, "diff", "boxes.parquet"))
    assert "object_id" in rows.column_names
    before = {r["object_id"] for r in chosen}
    after = {r["object_id"] for r in pq.read_table(os.path.join(second.run_uri, "selections", "boxes.parquet"))
             .to_pylist()}
    changes = {(r["object_id"], r["change"]) for r in rows.to_pylist()}
    assert changes == {(o, "added") for o in after - before} | {(o, "removed") for o in before - after}
    # drift sees the boxes: one more annotated box tonight, its class's share up
    boxes = json.load(open(os.path.join(second.run_uri, "run.json")))["drift"]["objects"]
    annotated_after = [r for r in read_objects_folder(second.run_uri).to_pylist()
                       if r["source"] == "annotation" and r["status"] == "ok"]
    assert boxes["boxes_before"] == len(annotated) and boxes["boxes_after"] == len(annotated_after)
    assert set(boxes["classes"]["shares"]) == {r["label"] for r in annotated_after}
    assert sum(s["after"] for s in boxes["sizes"]["shares"].values()) == pytest.approx(1.0, abs=1e-5)


def test_box_review_and_box_corrections_are_checked_before_any_work(tmp_path):
    from curation.config import ConfigError
    from curation.io.filesystem import Resolver
    from curation.preflight import preflight

    root = str(tmp_path / "set")
    make_detection_set(root, n_images=3, seed=2, source="shapes")
    images, annotations = os.path.join(root, "images"), os.path.join(root, "annotations.json")
    data = detection_config(images, annotations, str(tmp_path / "out"))
    data["selections"] = [{"name": "boxes", "mode": "box_review", "where": "no_such_column > 1"}]
    with pytest.raises(ConfigError, match=r"selections\[0\].where"):
        preflight(load_config(data=data), Resolver())
    data["selections"] = [{"name": "boxes", "mode": "box_review", "where": "box_quality < 0.5 and label == 'x'"}]
    preflight(load_config(data=data), Resolver())  # box columns are known to it
    plain = {"input": {"images": images}, "output": {"uri": str(tmp_path / "out")}, "embedder": {"model": "thumbnail"},
             "selections": data["selections"]}
    with pytest.raises(ConfigError, match="box_review selects boxes; it needs input.annotations"):
        preflight(load_config(data=plain), Resolver())
    doc = json.load(open(annotations))
    name = doc["images"][0]["file_name"]
    export = [{"data": {"uri": os.path.join(images, name), "width": 192, "height": 144, "objects": []},
               "annotations": [{"result": [{"type": "rectanglelabels", "original_width": 192, "original_height": 144,
                                            "value": {"x": 1, "y": 1, "width": 10, "height": 10, "rotation": 0,
                                                      "rectanglelabels": ["no such class"]}}]}]}]
    json.dump(export, open(tmp_path / "export.json", "w"))
    data["input"]["label_corrections"] = str(tmp_path / "export.json")
    with pytest.raises(ConfigError, match="label_corrections.*no such class"):
        preflight(load_config(data=data), Resolver())
    json.dump([{"data": {"uri": "x"}}], open(tmp_path / "export.json", "w"))  # an image-choice export
    with pytest.raises(ConfigError, match="data.objects"):
        preflight(load_config(data=data), Resolver())
    assert not (tmp_path / "out").exists()


def test_balance_on_object_label_brings_box_classes_as_evenly_as_images_allow():
    from scipy import sparse

    from curation.select_boxes import ObjectClasses, balance_by_objects

    # 12 images ranked best first; the best ones hold only class a (3 boxes each), then mixed,
    # then class c alone: the top 4 by rank would be 12 a-boxes and nothing else
    rows = [{"a": 3}] * 6 + [{"a": 1, "b": 1}] * 3 + [{"c": 2}] * 3
    names = ["a", "b", "c"]
    counts = sparse.csr_matrix(np.array([[r.get(n, 0) for n in names] for r in rows], float))
    order = np.arange(len(rows))
    positions, per_class = balance_by_objects(order, ObjectClasses(names, counts), 4)
    assert sorted(positions.tolist()) == list(range(12))  # a permutation: nothing dropped
    picked = positions[:4]
    totals = counts[picked].sum(axis=0).A1
    assert per_class == dict(zip(names, totals.astype(int).tolist()))
    # the best whole images allow is 3 a, 3 b, 2 c (three mixed images and one c); by rank: 12 a
    assert totals.tolist() == [3, 3, 2]
    assert picked[0] == 6  # the rarest class first, its best-ranked image


def test_an_image_selection_balanced_over_box_classes_reports_its_boxes_per_class(two_nights):
    first = two_nights[0]
    info = json.load(open(os.path.join(first.run_uri, "run.json")))
    even = next(s for s in info["selections"] if s["name"] == "even")
    chosen = set(pq.read_table(os.path.join(first.run_uri, "selections", "even.parquet"))["uri"].to_pylist())
    assert len(chosen) == 3  # the budget stays in images
    objects = [r for r in read_objects_folder(first.run_uri).to_pylist()
               if r["uri"] in chosen and r["source"] == "annotation" and r["status"] == "ok"]
    counted = {}
    for r in objects:
        counted[r["label"]] = counted.get(r["label"], 0) + 1
    assert {k: v for k, v in even["details"]["objects_per_class"].items() if v} == counted


def test_box_corrections_hold_while_their_image_is_unchanged_and_the_newer_one_wins():
    from curation.box_corrections import STORE_SCHEMA, apply_box_corrections, kept_corrections
    from curation.item_key import object_ids

    inputs = pa.table({"uri": ["a.jpg", "b.jpg"], "fingerprint": ["1", "2"]})
    box = [10.0, 10.0, 20.0, 20.0]
    oid = object_ids(pa.array(["a.jpg"]), pa.array([box], pa.list_(pa.float64(), 4)))[0].as_py()
    row = {"uri": "a.jpg", "fingerprint": "1", "object_id": oid, "change": "relabelled", "label": "dog",
           "bbox": box, "width": 100, "height": 80, "given_label": "cat", "given_bbox": box, "run_id": "r1"}
    stored = pa.Table.from_pylist([row, dict(row, uri="b.jpg", fingerprint="old", object_id="x")], schema=STORE_SCHEMA)
    kept = kept_corrections(None, stored, inputs, "r2")
    assert kept["uri"].to_pylist() == ["a.jpg"]  # b.jpg's file changed since: its correction lapses
    newer = pa.Table.from_pylist([{k: v for k, v in dict(row, label="fox").items() if k not in ("fingerprint", "run_id")}],
                                 schema=STORE_SCHEMA.remove(10).remove(1))
    kept = kept_corrections(newer, stored, inputs, "r2")
    assert kept.to_pylist()[0]["label"] == "fox" and kept.to_pylist()[0]["run_id"] == "r2"
    boxes = pa.table({"uri": ["a.jpg", "a.jpg"], "label": ["cat", "cat"], "bbox": [box, [50.0, 10, 20, 20]],
                      "status": ["ok", "ok"], "reason": [None, None], "source": ["annotation"] * 2,
                      "iscrowd": [False, False]})
    applied, counts = apply_box_corrections(boxes, "pixels", kept)
    assert applied["label"].to_pylist() == ["fox", "cat"] and applied["change"].to_pylist() == ["relabelled", None]
    assert applied["given_label"].to_pylist() == ["cat", None] and counts["relabelled"] == 1
