"""Detection annotations (COCO, YOLO) read into one table of boxes: what real files hold, and
every bad box a row with a reason (issue 37's input step)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from curation.annotations import (
    AnnotationsError,
    place_boxes,
    read_annotations,
    read_coco,
    read_yolo,
    yolo_class_names,
    yolo_label_path,
)
from curation.io.filesystem import resolve


def coco_doc() -> dict:
    return {
        "images": [{"id": 10, "file_name": "a/one.jpg", "width": 64, "height": 48},
                   {"id": 11, "file_name": "two.jpg", "width": 64, "height": 48},  # listed, no boxes
                   {"id": 12, "file_name": "../outside.jpg"}],
        # non-contiguous ids, and one name twice (one class)
        "categories": [{"id": 3, "name": "car"}, {"id": 90, "name": "person"}, {"id": 7, "name": "car "}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 3, "bbox": [1, 2, 10, 20]},
            {"id": 2, "image_id": 10, "category_id": 7, "bbox": [5, 5, 8, 8], "area": 50.5},
            {"id": 3, "image_id": 10, "category_id": 90, "bbox": [0, 0, 30, 30], "iscrowd": 1,
             "segmentation": {"counts": "abc", "size": [48, 64]}},
            {"id": 4, "image_id": 10, "category_id": 90, "bbox": [1, 2, 3]},
            {"id": 5, "image_id": 10, "category_id": 90, "bbox": [1, 2, "x", 4]},
            {"id": 6, "image_id": 10, "category_id": 90, "bbox": [1, 2, 3, 4, 30]},
            {"id": 7, "image_id": 99, "category_id": 90, "bbox": [1, 2, 3, 4]},
            {"id": 8, "image_id": 10, "category_id": 5, "bbox": [1, 2, 3, 4]},
            {"id": 9, "image_id": 12, "category_id": 3, "bbox": [1, 2, 3, 4]},
            "not an object",
        ],
    }


def test_coco_every_annotation_is_one_row_and_the_bad_ones_say_why():
    ann = read_coco(json.dumps(coco_doc()))
    rows = ann.boxes.to_pylist()
    assert len(rows) == 10  # accounting: one row per annotation in
    by_id = {r["annotation_id"]: r for r in rows}
    assert [by_id[i]["status"] for i in "123"] == ["ok"] * 3
    # two category ids named 'car' are one class; non-contiguous ids map by id, not position
    assert by_id["1"]["label"] == by_id["2"]["label"] == "car" and by_id["3"]["label"] == "person"
    assert ann.classes == ("car", "person")
    assert by_id["1"]["bbox"] == [1, 2, 10, 20] and by_id["1"]["area"] == 200 and by_id["2"]["area"] == 50.5
    assert by_id["3"]["iscrowd"] is True and json.loads(by_id["3"]["segmentation"])["counts"] == "abc"
    reasons = {i: by_id[i]["reason"] for i in "456789"}
    assert all(by_id[i]["status"] == "rejected" for i in "456789")
    assert "4 finite numbers" in reasons["4"] and "4 finite numbers" in reasons["5"]
    assert "rotated" in reasons["6"]
    assert "image_id 99" in reasons["7"] and "category_id 5" in reasons["8"]
    assert "not a path inside input.images" in reasons["9"]
    assert rows[-1]["status"] == "rejected" and "not an object" in rows[-1]["reason"]
    images = {r["file_name"]: r for r in ann.images.to_pylist()}
    assert images["two.jpg"]["boxes"] == 0  # labelled, empty: unlike an image not listed at all
    assert images["a/one.jpg"] == {"file_name": "a/one.jpg", "width": 64, "height": 48, "boxes": 7}
    assert ann.units == "pixels"


@pytest.mark.parametrize("text, message", [
    ("{not json", "not JSON"),
    ("[]", "expected a COCO instances object"),
    (json.dumps({"images": [], "categories": [{"id": 1}]}), "categories[0]"),
    (json.dumps({"images": [{"file_name": "x.jpg"}], "categories": []}), "images[0]"),
    (json.dumps({"images": [{"id": [1], "file_name": "x.jpg"}], "categories": []}), "images[0]"),
    (json.dumps({"images": [], "categories": [{"id": {}, "name": "a"}]}), "categories[0]"),
])
def test_a_coco_file_that_cannot_be_read_at_all_is_one_clear_error(text, message):
    with pytest.raises(AnnotationsError, match=re.escape(message)):
        read_coco(text, source="s3://b/ann.json")


def test_yolo_lines_and_files():
    names = yolo_class_names("names:\n  0: cat\n  1: dog\n")
    assert names == ("cat", "dog") and yolo_class_names("names: [cat, dog]") == names
    files = {
        "images/train/a.jpg": "0 0.5 0.5 0.2 0.4\n1 0.1 0.1 0.1 0.1\n\n"
                              "2 0.5 0.5 0.1 0.1\n"  # class out of range
                              "x 0.5 0.5 0.1 0.1\n"  # not an integer class
                              "0 0.1 0.1 0.3 0.1 0.3 0.3 0.1 0.3\n"  # OBB
                              "1 0.1 0.2 0.5 0.2 0.3 0.6\n"  # a polygon (segmentation)
                              "0 0.5 0.5 0.2\n"  # too few fields
                              "0 0.5 nan 0.2 0.2\n",
        "images/train/empty.jpg": "",  # labelled, no objects
        "images/train/none.jpg": None,  # no .txt: unlabelled
    }
    ann = read_yolo(names, files)
    rows = ann.boxes.to_pylist()
    assert len(rows) == 8 and ann.units == "fraction"
    assert rows[0]["label"] == "cat" and np.allclose(rows[0]["bbox"], [0.4, 0.3, 0.2, 0.4])
    assert rows[0]["annotation_id"] == "labels/train/a.txt:1" and rows[2]["annotation_id"] == "labels/train/a.txt:4"
    assert [r["status"] for r in rows] == ["ok", "ok", "rejected", "rejected", "rejected", "ok", "rejected",
                                           "rejected"]
    assert "class 2 is not in names" in rows[2]["reason"] and "0-based integer" in rows[3]["reason"]
    assert "rotated" in rows[4]["reason"] and "5 fields" in rows[6]["reason"] and "not finite" in rows[7]["reason"]
    assert rows[5]["label"] == "dog" and np.allclose(rows[5]["bbox"], [0.1, 0.2, 0.4, 0.4])
    assert json.loads(rows[5]["segmentation"]) == [[0.1, 0.2, 0.5, 0.2, 0.3, 0.6]]
    images = {r["file_name"]: r["boxes"] for r in ann.images.to_pylist()}
    assert images == {"images/train/a.jpg": 8, "images/train/empty.jpg": 0}


def test_yolo_label_paths_follow_the_common_convention():
    assert yolo_label_path("images/train/a.jpg") == "labels/train/a.txt"
    assert yolo_label_path("data/images/x/images/b.png") == "data/images/x/labels/b.txt"
    assert yolo_label_path("c.jpeg") == "c.txt"


@pytest.mark.parametrize("text", ["names: 3", "names: {0: a, 2: b}", "nc: 2", ": [", "names: []"])
def test_a_bad_data_yaml_is_one_clear_error(text):
    with pytest.raises(AnnotationsError, match="data.yaml"):
        yolo_class_names(text, source="data.yaml")


def test_boxes_meet_the_decoded_image():
    boxes = np.array([[0.25, 0.25, 0.5, 0.5],  # fractions of a 100x80 image
                      [-0.01, 0.0, 0.5, 0.5],  # 1 px outside: clipped
                      [0.9, 0.9, 0.5, 0.5],  # far outside
                      [0.1, 0.1, 0.0, 0.5],  # no width
                      [0.1, 0.1, 0.02, 0.5]])  # 2 px wide
    placed, reasons = place_boxes(boxes, units="fraction", width=100, height=80, min_size_px=4)
    reasons = reasons.to_pylist()
    assert np.allclose(placed[0], [25, 20, 50, 40]) and reasons[0] is None
    assert np.allclose(placed[1], [0, 0, 49, 40]) and reasons[1] is None
    assert "outside the 100x80 image" in reasons[2]
    assert "degenerate" in reasons[3] and "4 px minimum" in reasons[4]
    placed, reasons = place_boxes(np.array([[10, 10, 20, 20]]), units="pixels", width=64, height=48)
    assert np.allclose(placed, [[10, 10, 20, 20]]) and reasons.to_pylist() == [None]


def test_files_are_read_by_format_and_errors_name_the_file(tmp_path):
    (tmp_path / "ann.json").write_text(json.dumps(coco_doc()))
    ann = read_annotations(resolve(str(tmp_path / "ann.json")))
    assert ann.boxes.num_rows == 10
    (tmp_path / "data.yaml").write_text("names: [cat]\n")
    (tmp_path / "a.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    ann = read_annotations(resolve(str(tmp_path / "data.yaml")),
                           label_files={"images/a.jpg": resolve(str(tmp_path / "a.txt"))})
    assert ann.boxes["label"].to_pylist() == ["cat"]
    (tmp_path / "broken.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(AnnotationsError, match="broken.json"):
        read_annotations(resolve(str(tmp_path / "broken.json")))
    with pytest.raises(AnnotationsError, match="annotations_format"):
        read_annotations(resolve(str(tmp_path / "a.txt")))


def test_garbage_annotations_never_crash_and_never_drop_a_row():
    rng = np.random.default_rng(0)
    values = [None, "x", -1, 0, 3, 10, 1e308, math.inf, [], [1, 2, 3, 4], [0, 0, 5, 5], {"a": 1}, True,
              [1, 2, 3, 4, 5, 6], ["1", "2", "3", "4"]]
    doc = {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(3)], "categories": [{"id": 3, "name": "a"}]}
    doc["annotations"] = [{key: values[rng.integers(len(values))] for key in ("id", "image_id", "category_id", "bbox",
                                                                                "area", "iscrowd", "segmentation")}
                          for _ in range(2000)]
    ann = read_coco(json.dumps(doc, allow_nan=True))
    assert ann.boxes.num_rows == 2000
    rows = ann.boxes.to_pylist()
    assert all(r["status"] == "ok" or r["reason"] for r in rows)
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(r["label"] == "a" and r["file_name"] and len(r["bbox"]) == 4 for r in ok)
