"""``input.object_embeddings``: precomputed box vectors beside ``input.embeddings`` are curated as
annotated boxes are, without decoding: every row one ``objects/`` row, bad rows rejected with a
reason, swapped classes found from the vectors."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.config import ConfigError, load_config

N_IMAGES, PER_IMAGE, CLASSES, DIM = 120, 5, 6, 32


def write_set(root: str, seed: int = 3) -> dict:
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    uris = [f"s3://lake/img/{i:05d}.jpg" for i in range(N_IMAGES)]
    images = rng.normal(size=(N_IMAGES, DIM)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    pq.write_table(pa.table({"uri": uris, "embedding": pa.FixedSizeListArray.from_arrays(
        pa.array(images.ravel()), DIM)}), os.path.join(root, "images.parquet"))
    centres = rng.normal(size=(CLASSES, DIM)) * 3
    rows, swapped = [], []
    for i, uri in enumerate(uris):
        for j in range(PER_IMAGE):
            k = int(rng.integers(CLASSES))
            vector = centres[k] + rng.normal(size=DIM)
            label = k
            if rng.random() < 0.06:  # a swapped class: the vector says k, the label another
                label = int((k + 1 + rng.integers(CLASSES - 1)) % CLASSES)
                swapped.append(len(rows))
            rows.append({"uri": uri, "bbox": [10.0 + 40 * j, 20.0, 30.0, 30.0], "label": f"c{label}",
                         "embedding": vector.astype(np.float32).tolist()})
    bad = [  # each must become a rejected row with its reason
        {"uri": "s3://lake/img/missing.jpg", "bbox": [1.0, 1.0, 5.0, 5.0], "label": "c0", "embedding": [0.1] * DIM},
        {"uri": uris[0], "bbox": [1.0, 2.0, 3.0], "label": "c0", "embedding": [0.1] * DIM},
        {"uri": uris[0], "bbox": [300.0, 2.0, 0.0, 9.0], "label": "c0", "embedding": [0.1] * DIM},
        {"uri": uris[1], "bbox": [5.0, 5.0, 9.0, 9.0], "label": "c0", "embedding": [float("nan")] * DIM},
    ]
    table = pa.Table.from_pylist(rows + bad)
    table = table.set_column(table.schema.get_field_index("embedding"), "embedding",
                             pa.FixedSizeListArray.from_arrays(pa.array(np.array(
                                 table["embedding"].to_pylist(), np.float32).ravel()), DIM))
    pq.write_table(table, os.path.join(root, "objects.parquet"))
    return {"uris": uris, "swapped": swapped, "good": len(rows), "bad": len(bad)}


@pytest.fixture(scope="module")
def vector_run(ray_local, tmp_path_factory):
    from curation.job import run_job

    root = str(tmp_path_factory.mktemp("object-vectors"))
    truth = write_set(root)
    config = load_config(data={"input": {"embeddings": os.path.join(root, "images.parquet"),
                                         "object_embeddings": os.path.join(root, "objects.parquet")},
                               "output": {"uri": os.path.join(root, "out")},
                               "selections": [{"name": "boxes", "mode": "box_review", "budget": 20}]})
    return run_job(config), truth


def test_every_precomputed_box_is_one_objects_row_and_bad_ones_say_why(vector_run):
    result, truth = vector_run
    objects = pq.read_table(os.path.join(result.run_uri, "objects")).to_pylist()
    assert len(objects) == truth["good"] + truth["bad"]
    rejected = [r["reason"] for r in objects if r["status"] == "rejected"]
    assert len(rejected) == truth["bad"]
    assert any("not among input.embeddings" in r for r in rejected)
    assert any(r.startswith("bbox: expected 4 finite numbers") for r in rejected)
    assert any(r.startswith("degenerate box") for r in rejected)
    assert any("not finite" in r for r in rejected)
    ok = [r for r in objects if r["status"] == "ok"]
    assert sorted(r["object_vector_id"] for r in ok) == list(range(len(ok)))
    assert all(r["object_id"] for r in ok) and all(r["box_spurious_quality"] is None for r in ok)
    samples = pq.read_table(os.path.join(result.run_uri, "samples"))
    assert sum(samples["object_count"].to_pylist()) == truth["good"] + truth["bad"] - 1  # one names no image
    info = json.load(open(os.path.join(result.run_uri, "run.json")))["objects"]
    assert info["annotations"] == info["ok"] + info["rejected"] and info["knn"]["boxes"] == len(ok)


def test_swapped_classes_of_precomputed_boxes_rank_first(vector_run):
    from testkit.detection import auroc

    result, truth = vector_run
    objects = pq.read_table(os.path.join(result.run_uri, "objects")).to_pylist()[:truth["good"]]
    bad = np.zeros(len(objects), bool)
    bad[truth["swapped"]] = True
    quality = np.array([r["box_label_quality"] for r in objects], float)
    assert auroc(quality[bad], quality[~bad]) > 0.95  # clustered classes: the vote and probe see every swap
    chosen = pq.read_table(os.path.join(result.run_uri, "selections", "boxes.parquet"))["object_id"].to_pylist()
    ids = [r["object_id"] for r in objects]
    assert len(set(chosen) & {ids[i] for i in truth["swapped"]}) >= 0.7 * min(20, len(truth["swapped"]))


def test_object_embeddings_go_with_image_embeddings_only(tmp_path):
    with pytest.raises(ConfigError, match="input.object_embeddings': only with input.embeddings"):
        load_config(data={"input": {"images": str(tmp_path), "object_embeddings": str(tmp_path / "o.parquet")},
                          "output": {"uri": str(tmp_path / "out")}})
    pq.write_table(pa.table({"uri": ["a"], "bbox": [[1.0, 1, 2, 2]]}), tmp_path / "o.parquet")
    pq.write_table(pa.table({"uri": ["a"], "embedding": [[1.0, 0.0]]}), tmp_path / "e.parquet")
    from curation.io.filesystem import Resolver
    from curation.preflight import preflight

    config = load_config(data={"input": {"embeddings": str(tmp_path / "e.parquet"),
                                         "object_embeddings": str(tmp_path / "o.parquet")},
                               "output": {"uri": str(tmp_path / "out")}})
    with pytest.raises(ConfigError, match="no 'label' column"):
        preflight(config, Resolver())
