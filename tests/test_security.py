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
    from curation.report.galleries import choose_galleries
    from curation.run_info import RunInfo
    from curation.schema import SELECTION_SCHEMA

    evil = "<script>alert(1)</script>"
    img = "<img src=x onerror=alert(2)>"
    samples = pa.table({
        "uri": [f"/d/{evil}.jpg", "/d/b.jpg", f"/d/{img}.png"], "label": [evil, "b", img],
        "status": ["ok", "rejected", "ok"], "reason": [None, f"corrupt: {evil}", None],
        "x": [0.0, None, 1.0], "y": [0.0, None, 1.0], "cluster": [0, None, 1], "suggested_label": [img, None, evil],
        "dup_group": pa.array([None, None, None], pa.int64()), "dup_of": pa.nulls(3, pa.string()),
        "is_suspected_mislabel": [True, False, True], "label_quality": [0.1, None, 0.2], "sparseness": [0.5, None, 0.4],
    })
    review = pa.table({"uri": [f"/d/{evil}.jpg"], "label": [evil], "rank": pa.array([1], pa.int32()),
                       "score": pa.array([0.1], pa.float32()), "reason": [f"suggested {evil}"]}, schema=SELECTION_SCHEMA)
    selections = {"label_review": review}
    modes = {"label_review": "label_review"}
    page = render_report(run_id=evil, samples=samples, run_info=RunInfo.from_dict({
        "run_id": evil, "uri": "/runs/x", "counts": {"inputs": 3, "ok": 2, "rejected": 1}, "flags": {evil: 1},
        "selections": [{"name": evil, "mode": "label_review", "rows": 1, "eligible": 1, "note": evil}],
        "embedder": {"model": evil, "warning": evil}}), selections=selections, modes=modes,
        galleries=choose_galleries(samples, selections, modes, size=10))
    # Neither string appears as markup anywhere: not in the HTML parts, not in the inlined data.
    assert evil not in page and img not in page
    assert "&lt;script&gt;" in page and "&lt;img src=x onerror=alert(2)&gt;" in page
    # The map's data (JSON inside a script element) cannot close that element early.
    assert "</script>alert" not in page and page.count("</script>") == page.count("<script")
