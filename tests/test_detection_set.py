"""The detection sets the object-level tests are built from (testkit/detection.py): their files
read back through the project's own readers, and their truth is consistent with the files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from curation.annotations import place_boxes, read_coco, read_yolo, yolo_class_names
from testkit.detection import ERROR_KINDS, SHARED_DATA, box_iou, make_detection_set


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("detection-shapes"))
    return make_detection_set(root, n_images=60, seed=3, source="shapes")


def test_the_coco_file_holds_the_truth_with_its_planted_errors(shapes):
    ann = read_coco(open(os.path.join(shapes.root, "annotations.json")).read())
    rows = ann.boxes.to_pylist()
    assert all(r["status"] == "ok" for r in rows) and set(ann.classes) == set(shapes.classes)
    assert all(len(shapes.errors[kind]) > 0 for kind in ERROR_KINDS), {k: len(v) for k, v in shapes.errors.items()}
    # accounting: every real object is annotated once unless dropped; duplicates and spurious add boxes
    expected = len(shapes.objects) - len(shapes.errors["dropped"]) + len(shapes.errors["duplicate"]) \
        + len(shapes.errors["spurious"])
    assert len(rows) == expected
    boxed = set(shapes.annotation_of.values())
    assert not boxed & set(shapes.errors["dropped"])
    assert not set(shapes.errors["spurious"]) & set(shapes.annotation_of)
    by_id = {int(r["annotation_id"]): r for r in rows}
    for ann_id in shapes.errors["swapped"]:
        assert by_id[ann_id]["label"] != shapes.objects[shapes.annotation_of[ann_id]]["label"]
    for ann_id in shapes.errors["misplaced"]:
        true_box = np.array(shapes.objects[shapes.annotation_of[ann_id]]["bbox"])
        assert np.abs(np.array(by_id[ann_id]["bbox"]) - true_box).max() > 0.2 * true_box[2]
    clean = [i for i in by_id if i in shapes.annotation_of and not any(i in shapes.errors[k] for k in ERROR_KINDS)]
    for ann_id in clean:
        assert np.allclose(by_id[ann_id]["bbox"], shapes.objects[shapes.annotation_of[ann_id]]["bbox"], atol=0.01)


def test_the_yolo_layout_says_the_same_as_the_coco_file(shapes):
    names = yolo_class_names(open(os.path.join(shapes.root, "data.yaml")).read())
    files = {f"images/{f}": open(os.path.join(shapes.root, "labels", f.replace(".jpg", ".txt"))).read()
             for f in sorted(os.listdir(shapes.images))}
    yolo = read_yolo(names, files)
    coco = read_coco(open(os.path.join(shapes.root, "annotations.json")).read())
    assert yolo.boxes.num_rows == coco.boxes.num_rows and all(s == "ok" for s in yolo.boxes["status"].to_pylist())
    width, height = 192, 144
    placed_yolo, _ = place_boxes(np.array(yolo.boxes["bbox"].to_pylist()), units="fraction", width=width,
                                 height=height)
    placed_coco, _ = place_boxes(np.array(coco.boxes["bbox"].to_pylist()), units="pixels", width=width, height=height)
    # both list an image's boxes in the same order, and the images in name order
    assert np.allclose(placed_yolo, placed_coco, atol=0.01)
    assert yolo.boxes["label"].to_pylist() == coco.boxes["label"].to_pylist()


def test_the_detector_finds_most_objects_and_adds_a_few_false_ones(shapes):
    predictions = json.load(open(os.path.join(shapes.root, "predictions.json")))
    assert 0.8 * len(shapes.objects) < len(predictions) < 1.3 * len(shapes.objects)
    for pred in predictions:
        assert 0 <= pred["score"] <= 1 and abs(sum(pred["probabilities"]) - 1) < 1e-2
    # a box on a real object mostly names its class and scores higher than one on background
    truth = {}
    for obj in shapes.objects:
        truth.setdefault(obj["file_name"], []).append(obj)
    on_object, named_right, background = [], 0, []
    for pred in predictions:
        hit = [o for o in truth.get(pred["file_name"], []) if box_iou(pred["bbox"], o["bbox"]) >= 0.5]
        if hit:
            on_object.append(pred["score"])
            named_right += shapes.classes[pred["category_id"] - 1] == hit[0]["label"]
        else:
            background.append(pred["score"])
    assert on_object and named_right >= 0.7 * len(on_object)
    assert not background or np.median(background) < np.median(on_object)


def test_cifar_objects_when_the_shared_data_is_there(tmp_path):
    if not os.path.exists(os.path.join(SHARED_DATA, "cifar10", "test.tar.gz")):
        pytest.skip("../shared/data/cifar10 is absent")
    found = make_detection_set(str(tmp_path), n_images=8, seed=1, source="cifar")
    assert set(found.classes) <= {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                                  "truck"}
    assert len(os.listdir(found.images)) == 8
