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
