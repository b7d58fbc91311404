"""``curation export``: a published run's selection as annotation tasks.

* ``label-studio``: a JSON list of Label Studio tasks, one per selected item. ``data`` has the
  image reference (``s3://`` as is, for Label Studio's S3 storage; a local file as Label
  Studio's local-files URL under ``--local-files-root``), the item's ``uri``, its current
  ``label``, the selection's ``rank`` and ``reason``; ``predictions`` pre-annotates it with the
  run's suggestion (``suggested_label``, scored by ``suggested_confidence``). Beside it,
  ``FILE`` with ``.xml``: the labelling config, one choice per class (the run's classes, or
  ``--classes`` when nothing is labelled yet).
* ``csv``: ``uri, label, suggested_label, suggested_confidence, rank, score, reason``, for any
  other tool.

The names in the labelling config (``image``, ``label``) are the ones the corrections import
reads back. A detection run's selection exports one task per image with its boxes as
``RectangleLabels`` (:mod:`curation.export_boxes`).
"""

from __future__ import annotations

import csv
import io
import json
import os
from xml.sax.saxutils import quoteattr
from urllib.parse import quote

import pyarrow.parquet as pq
import pyarrow.dataset as ds

from curation.export_boxes import box_classes, box_tasks, is_detection_run, rectangle_config
from curation.io.filesystem import Location, Resolver, is_s3, write_bytes_atomic
from curation.published_run import PublishedRun
from curation.run_info import RunInfo

FORMATS = ("label-studio", "csv")
IMAGE_FIELD = "image"  # the labelling config's <Image name=...>
CHOICE_FIELD = "label"  # ... and its <Choices name=...>
LOCAL_FILES_URL = "/data/local-files/?d="


class ExportError(ValueError):
    """What was asked cannot be exported; the message names the run, selection or option."""


def export_selection(*, run: str, selection: str, out: str, fmt: str = "label-studio",
                     classes: list[str] | None = None, local_files_root: str | None = None,
                     resolver: Resolver | None = None) -> dict:
    """Write ``selection`` of the published run at ``run`` (a run URI, or an output URI meaning
    its latest) to ``out``. Returns what was written (``{"tasks", "files", "run"}``)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format: expected {' | '.join(FORMATS)}, got {fmt!r}")
    resolver = resolver or Resolver()
    published = PublishedRun.resolve(resolver.resolve(run))
    location = published.location if published is not None else None
    if location is None:
        raise ExportError(f"--run {run}: no published run there (no _SUCCESS, and no latest naming one)")
    try:
        info = RunInfo.read(location)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    names = [s.name for s in info.selections]
    if selection not in names:
        raise ExportError(f"--selection {selection!r}: not in run {info.run_id} (selections: {', '.join(names)})")
    rows = _rows(location, selection)
    target = resolver.resolve(out)
    if fmt == "csv":
        write_bytes_atomic(target, _csv(rows).encode("utf-8"))
        return {"tasks": len(rows), "files": [target.uri], "run": location.uri}
    # Every check before the first byte is written: a refused --out leaves the file as it was.
    config = resolver.resolve(os.path.splitext(out)[0] + ".xml")
    if config.uri == target.uri:
        raise ExportError(f"--out {out}: the tasks file cannot end in .xml (the labelling config is written there)")
    detection = is_detection_run(location)
    choices = list(classes) if classes else (box_classes(location) if detection else sorted(info.class_balance))
    if not choices:
        raise ExportError(f"run {info.run_id} has no labelled item: give the classes with --classes a,b,...")
    if detection:  # one task per image, its boxes as rectangles (curation/export_boxes.py)
        tasks = box_tasks(location, rows, run_id=info.run_id, image_field=IMAGE_FIELD,
                          reference=lambda uri: _image_reference(uri, local_files_root))
        text = rectangle_config(choices, image_field=IMAGE_FIELD)
    else:
        tasks = [_task(row, info.run_id, local_files_root) for row in rows]
        text = labelling_config(choices)
    write_bytes_atomic(target, json.dumps(tasks, indent=1).encode("utf-8"))
    write_bytes_atomic(config, text.encode("utf-8"))
    return {"tasks": len(tasks), "files": [target.uri, config.uri], "run": location.uri}


def _rows(run: Location, selection: str) -> list[dict]:
    path = run.child("selections", f"{selection}.parquet")
    chosen = pq.read_table(path.path, filesystem=run.filesystem)
    wanted = ["uri", "suggested_label", "suggested_confidence", "width", "height"]
    samples = pq.read_table(run.child("samples").path, filesystem=run.filesystem,
                            columns=[c for c in wanted if c in _columns(run)])
    joined = chosen.join(samples, "uri", join_type="left outer")
    joined = joined.sort_by("rank")
    out = joined.to_pylist()
    for row in out:
        row.setdefault("suggested_label", None)
        row.setdefault("suggested_confidence", None)
    return out


def _columns(run: Location) -> list[str]:
    return ds.dataset(run.child("samples").path, filesystem=run.filesystem, format="parquet").schema.names


def _image_reference(uri: str, local_files_root: str | None) -> str:
    if is_s3(uri) or "://" in uri:
        return uri
    if local_files_root is None:
        raise ExportError(f"{uri} is a local file: give --local-files-root (Label Studio's "
                          "LOCAL_FILES_DOCUMENT_ROOT) so the task can point Label Studio at it")
    root = os.path.abspath(local_files_root).rstrip("/") + "/"
    if not uri.startswith(root):
        raise ExportError(f"{uri} is not under --local-files-root {root}")

    return LOCAL_FILES_URL + quote(uri[len(root):])


def _task(row: dict, run_id: str, local_files_root: str | None) -> dict:
    task = {"data": {IMAGE_FIELD: _image_reference(row["uri"], local_files_root), "uri": row["uri"],
                     "label": row["label"], "rank": row["rank"], "reason": row["reason"]}}
    if row["suggested_label"] is not None:
        task["predictions"] = [{
            "model_version": f"curation {run_id}",
            "score": round(float(row["suggested_confidence"] or 0.0), 4),
            "result": [{"from_name": CHOICE_FIELD, "to_name": IMAGE_FIELD, "type": "choices",
                        "value": {"choices": [row["suggested_label"]]}}],
        }]
    return task


def labelling_config(classes: list[str]) -> str:
    """Label Studio's labelling config: the image and one single choice among ``classes``."""
    choices = "\n".join(f"    <Choice value={quoteattr(c)}/>" for c in classes)
    return (f'<View>\n  <Image name="{IMAGE_FIELD}" value="${IMAGE_FIELD}"/>\n'
            f'  <Choices name="{CHOICE_FIELD}" toName="{IMAGE_FIELD}" choice="single" showInLine="true">\n'
            f"{choices}\n  </Choices>\n</View>\n")


def _csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    columns = ["uri", "label", "suggested_label", "suggested_confidence", "rank", "score", "reason"]
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return buffer.getvalue()

