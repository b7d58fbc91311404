"""The review round trip through a real Label Studio server: export a run's label review, let
annotators answer over its REST API, download its export, and give that to the next night."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from curation.config import load_config
from testkit.labelstudio import LabelStudioServer
from tests.conftest import FLIPS, flipped_labels_set

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def label_studio():
    server = LabelStudioServer()
    if not server.available:
        if os.environ.get("CI"):
            pytest.fail("Label Studio is not installed: `make test` builds it (make label-studio)")
        pytest.skip("Label Studio is not installed (`make label-studio`)")
    with server:
        yield server


def _choice(label: str) -> dict:
    return {"result": [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]}


def test_review_round_trip_through_a_real_label_studio(tmp_path, label_studio):
    from curation.export import export_selection
    from curation.job import run_job

    assert label_studio.host == "127.0.0.1"  # loopback only
    data, uris = flipped_labels_set(tmp_path, review_budget=20)
    flips = list(FLIPS)  # class 'a' items labelled 'b'
    first = run_job(load_config(data=data))
    review = lambda run: set(pq.read_table(os.path.join(run.run_uri, "selections", "label_review.parquet"))  # noqa: E731
                             ["uri"].to_pylist())
    assert {uris[i] for i in flips} <= review(first)

    # The run's label review, as Label Studio tasks with their labelling config.
    export_selection(run=str(tmp_path / "out"), selection="label_review", out=str(tmp_path / "review.json"))
    tasks = json.loads((tmp_path / "review.json").read_text())
    project = label_studio.api("POST", "/api/projects/", json={
        "title": "curation review", "label_config": (tmp_path / "review.xml").read_text()}).json()
    # The annotator also opens one clean item (not in the review) and mislabels it.
    wrong = dict(tasks[0], data=dict(tasks[0]["data"], uri=uris[150], image=uris[150], label="a"))
    wrong.pop("predictions", None)
    label_studio.api("POST", f"/api/projects/{project['id']}/import", json=tasks + [wrong])
    listed = label_studio.api("GET", "/api/tasks/", params={"project": project["id"], "page_size": 1000}).json()
    listed = listed["tasks"] if isinstance(listed, dict) else listed
    assert len(listed) == len(tasks) + 1
    by_uri = {task["data"]["uri"]: task["id"] for task in listed}
    assert all(task["data"]["label"] == "b" for task in listed if task["data"]["uri"] in {uris[i] for i in flips})
    for i in flips:  # two annotators agree on the true class
        for _ in range(2):
            label_studio.api("POST", f"/api/tasks/{by_uri[uris[i]]}/annotations/", json=_choice("a"))
    label_studio.api("POST", f"/api/tasks/{by_uri[uris[150]]}/annotations/", json=_choice("c"))

    exported = label_studio.api("GET", f"/api/projects/{project['id']}/export",
                                params={"exportType": "JSON"}).content
    (tmp_path / "label-studio-export.json").write_bytes(exported)
    assert sum(len(task["annotations"]) for task in json.loads(exported)) == 2 * len(flips) + 1

    data["input"]["label_corrections"] = str(tmp_path / "label-studio-export.json")
    second = run_job(load_config(data=data))
    rows = {r["uri"]: r for r in second.samples.to_pylist()}
    for i in flips:
        assert (rows[uris[i]]["label"], rows[uris[i]]["label_source"], rows[uris[i]]["given_label"]) == (
            "a", "corrected", "b")
    assert second.info.corrections["applied"] == len(flips) + 1
    assert not {uris[i] for i in flips} & review(second)  # settled: no longer for review
    assert rows[uris[150]]["label"] == "c" and rows[uris[150]]["is_disputed"]
    assert uris[150] in review(second)  # the label models doubt that one: back to review


def _rectangles(task: dict, version: str) -> list[dict]:
    return next(p["result"] for p in task["predictions"] if p["model_version"].startswith(version))


def test_box_review_round_trip_through_a_real_label_studio(tmp_path, label_studio):
    """A detection run's review exported as rectangles; an annotator relabels, moves, deletes
    and adds boxes in Label Studio; its export folds into the next nights, box by box."""
    from curation.export import export_selection
    from curation.job import run_job
    from testkit.detection import make_detection_set
    from tests.test_objects import detection_config

    root = tmp_path / "detection"
    make_detection_set(str(root), n_images=10, seed=21, source="shapes")
    data = detection_config(str(root / "images"), str(root / "annotations.json"), str(tmp_path / "out"))
    data["report"]["map_points"] = 0  # (no map: not what this test is about)
    first = run_job(load_config(data=data))
    export_selection(run=str(tmp_path / "out"), selection="label_review", out=str(tmp_path / "review.json"),
                     local_files_root=str(root))
    tasks = json.loads((tmp_path / "review.json").read_text())
    config = (tmp_path / "review.xml").read_text()
    assert "<RectangleLabels" in config and len(tasks) == 10
    task = max(tasks, key=lambda t: len(t["data"]["objects"]))
    given = _rectangles(task, "given")
    assert len(given) == len(task["data"]["objects"]) >= 3
    for region, obj in zip(given, task["data"]["objects"]):  # percent of the image, region id = object_id
        assert region["id"] == obj["object_id"] and region["type"] == "rectanglelabels"
        assert abs(region["value"]["x"] * task["data"]["width"] / 100 - obj["bbox"][0]) < 1e-6

    project = label_studio.api("POST", "/api/projects/", json={"title": "box review", "label_config": config}).json()
    label_studio.api("POST", f"/api/projects/{project['id']}/import", json=tasks)
    listed = label_studio.api("GET", "/api/tasks/", params={"project": project["id"], "page_size": 1000}).json()
    listed = listed["tasks"] if isinstance(listed, dict) else listed
    task_id = next(t["id"] for t in listed if t["data"]["uri"] == task["data"]["uri"])
    classes = sorted({o["label"] for t in tasks for o in t["data"]["objects"]})
    relabel, move, delete = given[0], given[1], given[2]
    new_label = next(c for c in classes if c != relabel["value"]["rectanglelabels"][0])
    answer = [dict(relabel, value=dict(relabel["value"], rectanglelabels=[new_label])),
              dict(move, value=dict(move["value"], x=move["value"]["x"] + 5.0))]
    answer += given[3:]
    added = dict(relabel, id="drawn1", value=dict(relabel["value"], x=1.0, y=1.0, width=12.0, height=12.0))
    answer.append(added)
    label_studio.api("POST", f"/api/tasks/{task_id}/annotations/", json={"result": answer})
    exported = label_studio.api("GET", f"/api/projects/{project['id']}/export", params={"exportType": "JSON"}).content
    (tmp_path / "box-export.json").write_bytes(exported)

    data["input"]["label_corrections"] = str(tmp_path / "box-export.json")
    second = run_job(load_config(data=data))
    objects = pq.read_table(os.path.join(second.run_uri, "objects")).to_pylist()
    by_change = {}
    for row in objects:
        if row["change"]:
            by_change.setdefault(row["change"], []).append(row)
    assert sorted(by_change) == ["added", "deleted", "moved", "relabelled"]
    width = task["data"]["width"]
    relabelled = by_change["relabelled"][0]
    assert relabelled["object_id"] == relabel["id"] and relabelled["label"] == new_label
    assert relabelled["given_label"] == relabel["value"]["rectanglelabels"][0] and relabelled["status"] == "ok"
    moved = by_change["moved"][0]
    assert abs(moved["bbox"][0] - (move["value"]["x"] + 5.0) * width / 100) < 0.01 and moved["status"] == "ok"
    assert moved["object_vector_id"] is not None  # its crop cut where the annotator put it
    deleted = by_change["deleted"][0]
    assert deleted["object_id"] == delete["id"] and deleted["status"] == "rejected"
    assert "deleted by a label correction" in deleted["reason"]
    new = by_change["added"][0]
    assert new["source"] == "correction" and new["status"] == "ok" and abs(new["bbox"][2] - 0.12 * width) < 0.01
    counts = second.run_info["objects"]["corrections"]
    assert counts["applied"] == 4 and counts["unmatched"] == 0
    # the annotations' boxes are all still there, one row each, plus the added one
    assert sum(r["source"] == "annotation" for r in objects) == len(
        [r for r in pq.read_table(os.path.join(first.run_uri, "objects")).to_pylist() if r["source"] == "annotation"])

    # The next night keeps them without the file: read back from this run at preflight (the
    # rules of keeping are tests/test_objects_nightly.py's unit test).
    from curation.io.filesystem import Resolver
    from curation.preflight import preflight

    data["input"].pop("label_corrections")
    plan = preflight(load_config(data=data), Resolver())
    assert plan.objects.correction_counts["kept_from_previous_runs"] == 4
    boxes = plan.objects.boxes.to_pylist()
    assert sorted(r["change"] for r in boxes if r["change"]) == ["added", "deleted", "moved", "relabelled"]
    assert any(r["change"] == "relabelled" and r["label"] == new_label for r in boxes)
    # tonight's moved and added boxes were cut where the annotator put them; nothing else was
    night_two = second.run_info["embedder"]["store"]
    assert night_two["embedded"] == 0 and 2 <= night_two["crops_embedded"] <= 2 + 2 * 1  # + its background squares
