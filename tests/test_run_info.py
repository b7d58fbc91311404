"""run.json has one typed writer and reader (``curation.run_info.RunInfo``)."""

from __future__ import annotations

import json

import pytest

from curation.cli import run_summary
from curation.io.filesystem import resolve
from curation.run_info import Counts, RunInfo, SelectionSummary


def _info() -> RunInfo:
    return RunInfo(
        run_id="20261130-000000", uri="/out/20261130-000000", version="0.1", counts=Counts(10, 8, 2),
        flags={"is_exact_duplicate": 3, "is_junk": 0}, scores={"junk": {"flags": {"is_junk": 0}}},
        class_balance={"cat": 5, "dog": 3}, balance={}, embedder={"model_id": "thumbnail@abc/64px",
                                                                  "store": {"reused": 6, "embedded": 2, "rejected": 2}},
        knn={"kind": "exact"}, selections=[SelectionSummary("clean", "clean", 7, 8, None)],
        config={"input": {"images": "s3://bucket/images"}}, versions={"python": "3"},
        timings_s={"ingest": 1.5, "score_junk": 0.1, "total": 2.0})


def test_run_json_round_trips_through_storage(tmp_path):
    info = _info()
    run = resolve(str(tmp_path / "run"))
    info.write(run)
    data = json.loads((tmp_path / "run" / "run.json").read_text())
    assert data["counts"] == {"inputs": 10, "ok": 8, "rejected": 2}
    assert data["selections"][0] == {"name": "clean", "mode": "clean", "rows": 7, "eligible": 8, "note": None,
                                     "pending": None, "details": None}
    assert "diff" not in data  # a first run has no diff section
    back = RunInfo.read(run)
    assert back == info
    assert back.model_id == "thumbnail@abc/64px" and back.input_uri == "s3://bucket/images"
    info.diff = {"previous_run": "x"}
    info.write(run)
    assert RunInfo.read(run).diff == {"previous_run": "x"}


def test_a_document_that_is_not_a_run_json_is_one_clear_error(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(json.dumps({"run_id": "x", "uri": "/x"}))
    with pytest.raises(ValueError, match=r"run\.json.*missing counts, selections"):
        RunInfo.read(resolve(str(tmp_path / "run")))
    (tmp_path / "run" / "run.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected an object, got list"):
        RunInfo.read(resolve(str(tmp_path / "run")))


def test_the_closing_screen_reads_the_typed_record():
    text = run_summary(_info())
    assert text.splitlines()[0] == "run 20261130-000000: 10 inputs, 8 ok, 2 rejected, 2s"
    assert "thumbnail@abc/64px (store: reused 6, embedded 2)" in text
    assert "flags: is_exact_duplicate 3\n" in text  # zero counts left out
    assert "selections: clean 7 (of 8 eligible)" in text
    assert "time: ingest 1.5s\n" in text  # per-score timings and the total are not phases


def test_a_recorded_config_reads_back_typed_with_defaults_for_what_it_lacks():
    """Readers of a published run (similar, the next night) take the run's settings from its
    typed config, never restating a default: a key this version no longer has is dropped, a
    section that no longer loads takes its defaults, redacted secrets stay redacted."""
    from curation.config import Config, load_config, recorded_config

    config = load_config(data={"input": {"embeddings": "/x.parquet"}, "output": {"uri": "/out"},
                               "embedder": {"image_size": 96}, "knn": {"refine_factor": 4},
                               "storage": {"secret_access_key": "s3cr3t"}})
    recorded = config.to_dict(redact=True)
    recorded["embedder"]["renamed_long_ago"] = 1  # an older version's key
    recorded["report"] = {"map_method": "tsne"}  # a value this version refuses: its section's defaults
    del recorded["decode"]  # a section an older run did not record
    back = recorded_config(recorded)
    assert back.embedder.image_size == 96 and back.knn.refine_factor == 4
    assert back.decode == Config().decode and back.report == Config().report
    assert back.storage.secret_access_key == "***"
    assert back.input.embeddings == "/x.parquet"
