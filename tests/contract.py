"""Assertions shared by the end-to-end tests: the output contract of docs/contract.md."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq

from curation.run_info import RunInfo
from curation.schema import SAMPLES_CONTRACT, SELECTION_SCHEMA


def read_json(fs, path: str) -> dict:
    with fs.open_input_stream(path) as fh:
        return json.loads(fh.read())


def check_run_outputs(fs, output_path: str, run_id: str, *, images_uri: str, truth: dict,
                      selection_names: list[str]) -> pa.Table:
    """Check layout, schema, accounting and planted defects of one run; returns samples."""
    run = f"{output_path}/{run_id}"
    import pyarrow.fs as pafs

    assert fs.get_file_info(f"{run}/_SUCCESS").type == pafs.FileType.File
    latest = read_json(fs, f"{output_path}/latest")
    assert latest["run_id"] == run_id
    info = read_json(fs, f"{run}/run.json")
    assert RunInfo.from_dict(info).to_dict() == info  # the typed reader reads every key the job wrote
    assert RunInfo.from_dict(info).run_id == run_id
    with fs.open_input_stream(f"{run}/report.html") as fh:
        report = fh.read().decode()
    # One offline page: scripts inlined, nothing loaded from elsewhere (the browser test opens it).
    assert report.startswith("<!doctype html>") and "map_points" in report
    assert not re.search(r"""<(script|link|img|iframe)\b[^>]*\b(src|href)\s*=\s*["']?(https?:)?//""", report)

    samples = pq.read_table(f"{run}/samples", filesystem=fs)
    for field in SAMPLES_CONTRACT:
        assert field.name in samples.column_names, f"missing contract column {field.name}"
        assert samples.schema.field(field.name).type == field.type, field.name

    # Text columns hold text or null, never a float's spelling ("nan": a numpy batch of None).
    for name in ("reason", "content_hash", "pixel_hash", "dup_of", "suggested_label"):
        if name in samples.column_names:
            assert not {"nan", "None"} & set(samples[name].drop_null().to_pylist()), name

    # Accounting: every input exactly once; ok + rejected = inputs; run.json agrees.
    uris = samples["uri"].to_pylist()
    assert len(uris) == len(set(uris)) == truth["inputs"]
    status = samples["status"].to_pylist()
    assert set(status) <= {"ok", "rejected"}
    counts = info["counts"]
    assert counts == {"inputs": truth["inputs"], "ok": status.count("ok"), "rejected": status.count("rejected")}
    assert counts["ok"] + counts["rejected"] == counts["inputs"]

    by_uri = {row["uri"]: row for row in samples.to_pylist()}
    base = images_uri.rstrip("/") + "/"
    for pair in truth["exact_duplicate"]:
        a, b = by_uri[base + pair["item"]], by_uri[base + pair["of"]]
        assert a["dup_group"] is not None and a["dup_group"] == b["dup_group"], pair
        assert (a["dup_of"] is None) != (b["dup_of"] is None), pair  # exactly one of the two is kept
    for rel in truth["dark"]:
        assert by_uri[base + rel]["is_dark"], rel
    for rel in truth["corrupt"] + truth["missing"]:
        row = by_uri[base + rel]
        assert row["status"] == "rejected" and row["reason"], rel
    for rel in truth["missing"]:
        assert by_uri[base + rel]["reason"].startswith("missing"), rel
    ok_rows = [r for r in by_uri.values() if r["status"] == "ok"]
    assert all(r["width"] > 0 and r["cluster"] >= 0 and 0 <= r["sparseness"] <= 1 for r in ok_rows)
    assert all(r["label_quality"] is None or 0 <= r["label_quality"] <= 1 for r in ok_rows)

    for name in selection_names:
        table = pq.read_table(f"{run}/selections/{name}.parquet", filesystem=fs)
        assert table.schema.equals(SELECTION_SCHEMA), name
        assert table["rank"].to_pylist() == list(range(1, table.num_rows + 1))
        assert set(table["uri"].to_pylist()) <= {r["uri"] for r in ok_rows}

    graph = pq.read_table(f"{run}/knn", filesystem=fs)
    assert graph.num_rows == counts["ok"] and set(graph["uri"].to_pylist()) == {r["uri"] for r in ok_rows}

    embeddings = pq.read_table(f"{run}/embeddings", filesystem=fs)
    assert pa.types.is_fixed_size_list(embeddings.schema.field("embedding").type)
    assert embeddings.num_rows == counts["ok"]
    assert set(embeddings["uri"].to_pylist()) == {r["uri"] for r in ok_rows}
    return samples
