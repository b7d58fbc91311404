"""One rule for "the same item, unchanged" (curation/item_key.py), and every consumer on it:
an item whose fingerprint is unknown (null) is never taken as unchanged -- by the nightly diff,
stored corrections, the embedding store, drift, the kNN graph update or the report map."""

from __future__ import annotations

import ast
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.io.filesystem import Resolver
from curation.item_key import key_hashes, match_items, unchanged
from curation.published_run import PublishedRun
from curation.scores import flag_columns

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONSUMERS = ["curation/run_diff.py", "curation/corrections.py", "curation/io/store.py", "curation/drift.py",
             "curation/index/incremental.py", "curation/report/map.py"]

URIS = ["s3://b/a.jpg", "s3://b/b.jpg", "s3://b/c.jpg", "s3://b/d.jpg"]
BEFORE = ["fa", None, "fc", "fd"]  # b.jpg had no fingerprint; d.jpg changes tonight
TONIGHT = ["fa", None, "fc", "fd2"]
SAME = [True, False, True, False]  # what every consumer must find


def _samples(fingerprints, **extra) -> pa.Table:
    n = len(URIS)
    vectors = np.eye(n, 4, dtype=np.float32) + 0.1
    return pa.table({"input_id": pa.array(range(n), pa.int64()), "uri": URIS,
                     "fingerprint": pa.array(fingerprints, pa.string()), "status": ["ok"] * n,
                     "vector_id": pa.array(range(n), pa.int64()), "label": ["x"] * n,
                     "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 4), **extra})


@pytest.fixture
def previous(tmp_path):
    """A published-run folder holding what the consumers read: samples/ (with the map's x, y and
    every flag column) and the kNN graph."""
    from curation.index.knn import exact_knn
    from curation.io.outputs import write_knn_graph

    n = len(URIS)
    samples = _samples(BEFORE, x=pa.array(np.arange(n, dtype=np.float32)), y=pa.array(np.ones(n, np.float32)),
                       **{f: pa.array([False] * n) for f in flag_columns() if f.startswith("is_")})
    (tmp_path / "samples").mkdir()
    pq.write_table(samples.drop_columns(["embedding"]), tmp_path / "samples" / "part-0.parquet")
    x = np.stack(samples["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    location = Resolver().resolve(str(tmp_path))
    write_knn_graph(location.child("knn"), samples, exact_knn(x, 2))
    return PublishedRun(location)


def test_the_rule():
    before, tonight = _samples(BEFORE), _samples(TONIGHT)
    assert unchanged(tonight, before).tolist() == SAME
    assert match_items(tonight, before).tolist() == [0, -1, 2, -1]
    # without a fingerprint column on one side, the uri alone names the item
    assert unchanged(tonight.drop_columns(["fingerprint"]), before).tolist() == [True] * 4
    assert (key_hashes(tonight["uri"], tonight["fingerprint"]) != 0).tolist() == [True, False, True, True]


def test_the_nightly_diff_never_counts_an_unknown_fingerprint_unchanged(previous, tmp_path):
    from curation.run_diff import diff_runs

    summary = diff_runs(previous, _samples(TONIGHT), {}, Resolver().resolve(str(tmp_path / "diff")))
    # d.jpg's file changed; b.jpg has no known version: not unchanged, counted apart
    assert summary["inputs"] == {"new": 0, "changed": 1, "deleted": 0} and summary["unverified"] == 1


def test_a_stored_correction_needs_its_item_known_unchanged():
    from curation.corrections import STORE_SCHEMA, apply_corrections

    stored = pa.Table.from_pylist([{"uri": u, "fingerprint": f, "label": "y", "given_label": "x", "run_id": "r1"}
                                   for u, f in zip(URIS, BEFORE)], schema=STORE_SCHEMA)
    out, kept, summary = apply_corrections(_samples(TONIGHT), stored=stored, answers=None, run_id="r2")
    assert out["label"].to_pylist() == ["y" if same else "x" for same in SAME]
    assert summary["applied"] == SAME.count(True) and summary["stale"] == SAME.count(False)


def test_the_store_never_reuses_a_vector_without_a_known_fingerprint():
    from curation.io.store import match_stored

    before, tonight = _samples(BEFORE), _samples(TONIGHT)
    wanted = key_hashes(tonight["uri"], tonight["fingerprint"])  # what tonight's run looks up
    order = np.argsort(wanted)
    stored_file = before.select(["uri", "fingerprint", "embedding"])  # a vector file of the store
    reused = match_stored(stored_file, keys=wanted[order], input_ids=np.arange(4)[order], model_id="m")
    assert sorted(reused["uri"].to_pylist()) == [u for u, same in zip(URIS, SAME) if same]


def test_drift_counts_an_item_without_a_known_fingerprint_as_new(previous):
    from curation.drift import new_item_mask

    assert new_item_mask(_samples(TONIGHT), previous).tolist() == [not same for same in SAME]


def test_the_graph_update_carries_only_items_known_unchanged(previous):
    from curation.index.incremental import carry_previous

    carried = carry_previous(previous, _samples(TONIGHT), 2)
    assert carried.carried.tolist() == SAME


def test_the_map_keeps_positions_only_for_items_known_unchanged(previous):
    from curation.report.map import previous_layout

    layout = previous_layout(previous, _samples(TONIGHT), np.arange(4))
    assert np.isfinite(layout[:, 0]).tolist() == SAME


def test_every_consumer_uses_the_one_rule_and_no_other_module_joins_the_key():
    for path in CONSUMERS:
        tree = ast.parse(open(os.path.join(ROOT, path), encoding="utf-8").read())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert "curation.item_key" in imported, path
    for folder, _, files in os.walk(os.path.join(ROOT, "curation")):
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py") and not path.endswith(os.path.join("curation", "item_key.py")):
                assert not _joins_the_key(path), f"{path} joins uri and fingerprint itself: use curation.item_key"


def _joins_the_key(path: str) -> bool:
    """Whether ``path`` joins a uri with a fingerprint (a string join whose arguments name both)."""
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("binary_join_element_wise", "join"):
            words = {n.id for arg in node.args for n in ast.walk(arg) if isinstance(n, ast.Name)}
            words |= {n.value for arg in node.args for n in ast.walk(arg)
                      if isinstance(n, ast.Constant) and isinstance(n.value, str)}
            if any("uri" in w for w in words) and any("fingerprint" in w for w in words):
                return True
    return False


def test_the_join_finder_sees_the_old_diff(tmp_path):
    old = tmp_path / "old.py"
    old.write_text('k = pc.binary_join_element_wise(now_uri, pc.fill_null(samples["fingerprint"], ""), "x")\n')
    assert _joins_the_key(str(old))


def test_an_objects_id_is_its_image_and_geometry_not_the_annotation_id_or_label():
    from curation.item_key import object_ids

    uris = ["s3://b/a.jpg", "s3://b/a.jpg", "s3://b/a.jpg", "s3://b/b.jpg", None]
    boxes = [[1, 2, 10, 20], [1, 2, 10, 20], [5, 5, 8, 8], [1, 2, 10, 20], [1, 2, 3, 4]]
    night1 = object_ids(uris, boxes).to_pylist()
    # next night: another export order and float noise; a duplicate box keeps its own id
    night2 = object_ids(uris[::-1][1:] + [None], [[1, 2, 10, 20], [5, 5, 8, 8.0001], [1, 2, 10, 20],
                                                   [1.0002, 2, 10, 20], [1, 2, 3, 4]]).to_pylist()
    assert night1[4] is None and len(set(night1[:4])) == 4  # the same box twice on a.jpg: two objects
    assert set(night2[:4]) == set(night1[:4])
    moved = object_ids(["s3://b/a.jpg"], [[3, 2, 10, 20]]).to_pylist()
    assert moved[0] not in night1
