"""A detector's boxes beside the annotations (curation/predictions.py): COCO results read with
a reason for every bad row, and the per-image match that gives location, class evidence and
possibly overlooked objects."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from curation.annotations import AnnotationsError, read_coco
from curation.config_sections import ObjectsConfig
from curation.io.filesystem import Resolver
from curation.predictions import detector_evidence, read_predictions

DOC = {"images": [{"id": 7, "file_name": "a.jpg"}, {"id": 8, "file_name": "b.jpg"}],
       "categories": [{"id": 3, "name": "cat"}, {"id": 1, "name": "dog"}, {"id": 9, "name": "cat"}],
       "annotations": []}


def predictions_file(tmp_path, rows) -> str:
    path = tmp_path / "predictions.json"
    path.write_text(json.dumps(rows))
    return str(path)


def test_results_are_read_by_the_annotations_ids_and_bad_rows_say_why(tmp_path):
    annotations = read_coco(json.dumps(DOC))
    rows = [
        {"image_id": 7, "bbox": [1, 2, 10, 10], "category_id": 1, "score": 0.9},
        {"file_name": "b.jpg", "bbox": [0, 0, 5, 5], "category_id": 9, "score": 0.4,
         "probabilities": [0.2, 0.7, 0.1]},  # over the categories as listed: cat(3), dog(1), cat(9)
        {"image_id": 99, "bbox": [0, 0, 5, 5], "category_id": 1, "score": 0.5},
        {"image_id": 7, "bbox": [0, 0, 5, 5], "category_id": 2, "score": 0.5},
        {"image_id": 7, "bbox": [0, 0, 0, 5], "category_id": 1, "score": 0.5},
        {"image_id": 7, "bbox": [0, 0, 5, 5], "category_id": 1, "score": 1.5},
        {"image_id": 7, "bbox": [0, 0, 5, 5], "category_id": 1, "score": 0.5, "probabilities": [1, 2]},
        {"file_name": "../etc/passwd", "bbox": [0, 0, 5, 5], "category_id": 1, "score": 0.5},
        "not an object",
    ]
    table = read_predictions(Resolver().resolve(predictions_file(tmp_path, rows)), annotations)
    out = table.to_pylist()
    assert len(out) == len(rows)
    assert out[0]["file_name"] == "a.jpg" and out[0]["label"] == "dog" and out[0]["status"] == "ok"
    assert out[1]["label"] == "cat" and out[1]["probabilities"] == pytest.approx([0.3, 0.7])  # classes sorted
    reasons = [r["reason"] for r in out[2:]]
    assert "image_id 99" in reasons[0] and "category_id 2" in reasons[1] and "bbox" in reasons[2]
    assert "score" in reasons[3] and "probabilities: expected 3" in reasons[4]
    assert "not a path inside" in reasons[5] and reasons[6] == "not an object"
    with pytest.raises(AnnotationsError, match="expected a JSON list"):
        read_predictions(Resolver().resolve(predictions_file(tmp_path, {"x": 1})), annotations)


def test_location_class_evidence_and_overlooked_objects_per_image():
    boxes = pa.table({
        "bbox": pa.array([[0, 0, 10, 10], [50, 50, 10, 10], [100, 100, 10, 10], [0, 0, 10, 10]],
                         pa.list_(pa.float64(), 4)),
        "input_id": pa.array([0, 0, 0, 1], pa.int64()), "label": ["cat", "dog", "cat", "dog"],
    })
    predictions = pa.table({
        "bbox": pa.array([[0, 0, 10, 10], [53, 53, 10, 10], [200, 200, 10, 10], [200, 0, 10, 10],
                          [0, 0, 10, 10]], pa.list_(pa.float64(), 4)),
        "input_id": pa.array([0, 0, 0, 0, 0], pa.int64()), "label": ["cat", "dog", "cat", "dog", "dog"],
        "score": [0.9, 0.8, 0.95, 0.1, 0.02], "probabilities": pa.nulls(5, pa.list_(pa.float32())),
        "status": ["ok"] * 5, "prediction_id": [f"prediction:{i}" for i in range(5)],
    })
    found = detector_evidence(boxes, np.ones(4, bool), predictions, ("cat", "dog"), ObjectsConfig())
    location = found["location"]
    assert location[0] == pytest.approx(1.0) and location[1] == pytest.approx(49 / 151)
    assert location[2] == 0 and location[3] == 0  # nothing near it; another image's predictions never count
    assert found["misplaced"].tolist() == [False, True, False, False]
    suggested = found["suggested_bbox"].to_pylist()
    assert suggested[1] == [53, 53, 10, 10] and suggested[2] is None
    assert found["class_probability"][0] == pytest.approx(0.9) and np.isnan(found["class_probability"][1])
    # the confident prediction on nothing annotated is possibly overlooked; the 0.1 one is not,
    # and the 0.02 one is under prediction_min_score (it does not even cover box 0)
    assert found["overlooked"].tolist() == [2]
    assert found["summary"]["boxes_matched"] == 1 and found["summary"]["possibly_overlooked"] == 1
