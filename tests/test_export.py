"""`curation export`: a published run's selection as Label Studio tasks or CSV."""

from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ET

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.cli import main
from curation.config import load_config


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """An embeddings-mode run over local uris (10% labelled, classes a-d) with a to_label queue."""
    from curation.job import run_job

    root = tmp_path_factory.mktemp("export")
    rng = np.random.default_rng(4)
    centers = rng.normal(size=(4, 16))
    x = np.concatenate([c + 0.3 * rng.normal(size=(50, 16)) for c in centers]).astype(np.float32)
    labels = [("abcd"[i // 50] if i % 50 < 5 else None) for i in range(200)]
    uris = [f"/data/images/{'abcd'[i // 50]}/{i:03d}.jpg" for i in range(200)]
    pq.write_table(pa.table({"uri": uris, "label": pa.array(labels, pa.string()),
                             "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 16)}),
                   root / "emb.parquet")
    config = load_config(data={"input": {"embeddings": str(root / "emb.parquet")}, "report": {"map_method": "pca"},
                               "output": {"uri": str(root / "out")},
                               "selections": [{"name": "queue", "mode": "to_label", "budget": 15}]})
    return run_job(config), root


def test_label_studio_tasks_carry_the_image_the_suggestion_and_the_reason(published, capsys):
    result, root = published
    out = root / "tasks.json"
    assert main(["export", "--run", str(root / "out"), "--selection", "queue", "--out", str(out),
                 "--local-files-root", "/data", "--quiet"]) == 0
    assert "exported 15 tasks" in capsys.readouterr().out
    tasks = json.loads(out.read_text())
    queue = pq.read_table(f"{result.run_uri}/selections/queue.parquet").to_pylist()
    samples = {r["uri"]: r for r in result.samples.to_pylist()}
    assert [t["data"]["uri"] for t in tasks] == [r["uri"] for r in queue]  # in rank order
    for task, row in zip(tasks, queue):
        assert task["data"]["image"] == "/data/local-files/?d=" + row["uri"][len("/data/"):]
        assert task["data"]["reason"] == row["reason"] and task["data"]["label"] is None
        (prediction,) = task["predictions"]
        assert prediction["result"][0]["value"]["choices"] == [samples[row["uri"]]["suggested_label"]]
        assert prediction["score"] == pytest.approx(samples[row["uri"]]["suggested_confidence"], abs=1e-4)
        assert prediction["result"][0]["from_name"] == "label" and prediction["result"][0]["to_name"] == "image"
    view = ET.fromstring((root / "tasks.xml").read_text())
    assert [c.get("value") for c in view.iter("Choice")] == ["a", "b", "c", "d"]  # the run's classes
    assert view.find("Image").get("value") == "$image"


def test_csv_for_any_other_tool(published):
    result, root = published
    assert main(["export", "--run", result.run_uri, "--selection", "queue", "--format", "csv",
                 "--out", str(root / "queue.csv"), "--quiet"]) == 0
    rows = list(csv.DictReader(open(root / "queue.csv")))
    assert len(rows) == 15 and list(rows[0]) == ["uri", "label", "suggested_label", "suggested_confidence", "rank",
                                                  "score", "reason"]
    assert [int(r["rank"]) for r in rows] == list(range(1, 16)) and all(r["suggested_label"] for r in rows)


@pytest.mark.parametrize("args, message", [
    (["--run", "{root}/nowhere", "--selection", "queue"], "no published run there"),
    (["--run", "{root}/out", "--selection", "train"], "'train': not in run .* \\(selections: queue\\)"),
    (["--run", "{root}/out", "--selection", "queue"], "is a local file: give --local-files-root"),
    (["--run", "{root}/out", "--selection", "queue", "--local-files-root", "/elsewhere"], "is not under"),
])
def test_what_cannot_be_exported_is_one_line_and_exit_2(published, capsys, args, message):
    _, root = published
    code = main(["export", *[a.format(root=root) for a in args], "--out", str(root / "x.json"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    import re

    assert re.search(message, err[0]), err[0]


def test_with_nothing_labelled_the_choices_come_from_classes(tmp_path):
    from curation.export import ExportError, export_selection
    from curation.job import run_job

    x = np.random.default_rng(2).normal(size=(60, 8)).astype(np.float32)
    pq.write_table(pa.table({"uri": [f"s3://lake/{i}.jpg" for i in range(60)],
                             "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 8)}),
                   tmp_path / "emb.parquet")
    run_job(load_config(data={"input": {"embeddings": str(tmp_path / "emb.parquet")}, "report": {"map_method": "pca"},
                              "output": {"uri": str(tmp_path / "out")},
                              "selections": [{"name": "queue", "mode": "to_label", "budget": 5}]}))
    with pytest.raises(ExportError, match="no labelled item: give the classes with --classes"):
        export_selection(run=str(tmp_path / "out"), selection="queue", out=str(tmp_path / "t.json"))
    done = export_selection(run=str(tmp_path / "out"), selection="queue", out=str(tmp_path / "t.json"),
                            classes=["cat", "dog & co"])
    tasks = json.loads((tmp_path / "t.json").read_text())
    assert done["tasks"] == len(tasks) == 5 and all("predictions" not in t for t in tasks)  # nothing to suggest
    assert all(t["data"]["image"].startswith("s3://lake/") for t in tasks)  # S3 images as they are
    assert [c.get("value") for c in ET.fromstring((tmp_path / "t.xml").read_text()).iter("Choice")] == ["cat", "dog & co"]
