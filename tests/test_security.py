"""Hostile inputs: pickled code as model weights, markup in data strings, code in `where`
(tests/test_select.py), secrets in outputs (tests/test_end_to_end.py)."""

from __future__ import annotations

import os
import pickle

import pyarrow as pa
import pytest


class _Payload:
    """Unpickling this runs a shell command: what a malicious weights file would carry."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_as_weights_is_refused_without_running_it(tmp_path):
    import torch

    from curation.embedders import EmbedderError, load_embedder

    marker = tmp_path / "ran"
    weights = tmp_path / "evil.pt"
    torch.save({"fc.weight": _Payload(str(marker))}, weights)
    with pytest.raises(EmbedderError, match="does not load into resnet18"):
        load_embedder("resnet18", str(weights), image_size=32)
    assert not marker.exists()
    raw = tmp_path / "evil.pkl"  # a bare pickle, not even a torch archive
    raw.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(EmbedderError):
        load_embedder("resnet18", str(raw), image_size=32)
    assert not marker.exists()


def test_report_escapes_strings_that_come_from_the_data():
    from curation.report import render_report
    from curation.schema import SELECTION_SCHEMA

    evil = "<script>alert(1)</script>"
    samples = pa.table({
        "uri": [f"/d/{evil}.jpg", "/d/b.jpg"], "label": [evil, "b"], "status": ["ok", "rejected"],
        "reason": [None, f"corrupt: {evil}"], "x": [0.0, None], "y": [0.0, None], "cluster": [0, -1],
        "dup_of": pa.nulls(2, pa.string()), "is_suspected_mislabel": [True, False],
    })
    review = pa.table({"uri": [f"/d/{evil}.jpg"], "label": [evil], "rank": pa.array([1], pa.int32()),
                       "score": pa.array([0.1], pa.float32()), "reason": [f"suggested {evil}"]}, schema=SELECTION_SCHEMA)
    page = render_report(run_id=evil, samples=samples, run_info={
        "counts": {"inputs": 2, "ok": 1, "rejected": 1}, "flags": {evil: 1},
        "selections": [{"name": evil, "mode": "label_review", "rows": 1, "eligible": 1, "note": evil}],
        "embedder": {"model": evil, "warning": evil}}, selections={"label_review": review})
    assert "<script" not in page and "&lt;script&gt;" in page
