"""Label corrections from annotators, folded back into the next runs.

``input.label_corrections`` is a Label Studio JSON export (tasks with their annotations; the
task's ``data.uri`` names the item, as ``curation export`` wrote it) or a CSV ``uri,label``
(a row per answer). Per item, the majority answer is the correction; a tie is conflicting and
not applied. Cancelled annotations and answers without a choice do not vote.

Applied corrections are kept with the run (``<run>/corrections.parquet``: uri, fingerprint,
label, given_label, run_id), and the next run reads them from the previous published run, so
later nights keep them without the file; a newer correction of an item replaces the older one.
A correction applies while the item's file is unchanged (:mod:`curation.item_key`); an item whose file
changed is labelled as given again.

A corrected item's ``label`` is the correction, ``label_source`` is ``corrected`` and
``given_label`` what the input said (``given`` and null for the others; ``label_source`` is null
for unlabelled items).
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.io.filesystem import Location, StorageError, read_bytes
from curation.item_key import unchanged

STORE_SCHEMA = pa.schema([("uri", pa.string()), ("fingerprint", pa.string()), ("label", pa.string()),
                          ("given_label", pa.string()), ("run_id", pa.string())])
SOURCE_GIVEN, SOURCE_CORRECTED = "given", "corrected"


MAX_LABEL_LENGTH = 200  # characters: a class name, not a document (and it goes into every log line)
# A class with fewer labelled members than this is held out of the label scores (see
# scores/label_quality.py): a single correction naming a new class must not drive suggestions.
MIN_CLASS_MEMBERS = 5


class CorrectionsError(ValueError):
    """A label corrections file that cannot be used: names the file and the first bad record."""


def read_answers(location: Location) -> dict[str, list[str]]:
    """``{uri: [answer, ...]}`` from a Label Studio JSON export or a ``uri,label`` CSV.

    Raises :class:`CorrectionsError` naming the file and the first bad record (malformed
    JSON or CSV, a record of the wrong shape, a label longer than ``MAX_LABEL_LENGTH``) and
    when the file holds no answer at all; ``StorageError`` when it cannot be read."""
    try:
        data = read_bytes(location)
    except OSError as exc:
        raise StorageError(f"{location.uri}: cannot read label corrections ({exc})") from exc
    if location.path.lower().endswith(".json"):
        answers = _label_studio_answers(data, location.uri)
    else:
        answers = _csv_answers(data, location.uri)
    if not answers:
        raise CorrectionsError(f"{location.uri}: no answers in it (expected Label Studio tasks with a choice, "
                               f"or CSV rows uri,label)")
    return answers


def checked_label(label, where: str) -> str:
    if not isinstance(label, str) or not label.strip():
        raise CorrectionsError(f"{where}: the label must be a non-empty string, got {str(label)[:40]!r}")
    label = label.strip()
    if len(label) > MAX_LABEL_LENGTH:
        raise CorrectionsError(f"{where}: a label of {len(label)} characters (at most {MAX_LABEL_LENGTH})")
    return label


def _label_studio_answers(data: bytes, uri: str) -> dict[str, list[str]]:
    try:
        tasks = json.loads(data)
    except ValueError as exc:
        raise CorrectionsError(f"{uri}: not a Label Studio JSON export ({exc})") from None
    if not isinstance(tasks, list):
        raise CorrectionsError(f"{uri}: expected a list of Label Studio tasks, got {type(tasks).__name__}")
    answers: dict[str, list[str]] = {}
    for i, task in enumerate(tasks):
        where = f"{uri}: task {i}"
        if not isinstance(task, dict):
            raise CorrectionsError(f"{where}: expected a task object, got {type(task).__name__}")
        data_field = task.get("data")
        if not isinstance(data_field, dict) or not isinstance(data_field.get("uri"), str) or not data_field["uri"]:
            raise CorrectionsError(f"{where}: no data.uri naming the item (tasks as `curation export` writes them)")
        annotations = task.get("annotations") or []
        if not isinstance(annotations, list) or not all(isinstance(a, dict) for a in annotations):
            raise CorrectionsError(f"{where}: 'annotations' must be a list of objects")
        for annotation in annotations:
            if annotation.get("was_cancelled"):
                continue
            results = annotation.get("result") or []
            if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
                raise CorrectionsError(f"{where}: an annotation's 'result' must be a list of objects")
            choices = [c for result in results if result.get("type") == "choices"
                       for c in ((result.get("value") or {}).get("choices") or [])]
            if len(choices) == 1:
                answers.setdefault(data_field["uri"], []).append(checked_label(choices[0], where))
    return answers


def _csv_answers(data: bytes, uri: str) -> dict[str, list[str]]:
    try:
        rows = list(csv.reader(io.StringIO(data.decode("utf-8-sig"))))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise CorrectionsError(f"{uri}: not a UTF-8 CSV ({exc})") from None
    header = [cell.strip().lower() for cell in rows[0]] if rows else []
    if "label" in header and ("uri" in header or "path" in header):
        uri_col, label_col = header.index("uri") if "uri" in header else header.index("path"), header.index("label")
        first = 1
    else:  # no header: uri,label by position
        uri_col, label_col, first = 0, 1, 0
    answers: dict[str, list[str]] = {}
    for line, row in enumerate(rows[first:], start=first + 1):
        if not any(cell.strip() for cell in row):
            continue
        where = f"{uri}: line {line}"
        if len(row) <= max(uri_col, label_col) or not row[uri_col].strip():
            raise CorrectionsError(f"{where}: expected uri,label, got {','.join(row)[:80]!r}")
        answers.setdefault(row[uri_col].strip(), []).append(checked_label(row[label_col], where))
    return answers


def check_answers(answers: dict[str, list[str]], *, uri: str, items: set[str] | None, classes: set[str] | None,
                  allow_new_classes: bool) -> None:
    """Refuse a corrections file that matches no item, or names classes the run does not have
    (unless ``allow_new_classes``): :class:`CorrectionsError` naming the file and an example."""
    if items is not None and not any(u in items for u in answers):
        example = next(iter(answers))
        raise CorrectionsError(f"{uri}: none of its {len(answers)} items is an input of this run "
                               f"(e.g. {example[:200]!r})")
    if classes is not None and not allow_new_classes:
        new = sorted({label for votes in answers.values() for label in votes} - classes)
        if new:
            raise CorrectionsError(f"{uri}: {len(new)} label(s) the run has no class for, e.g. {new[0][:80]!r} "
                                   f"(classes: {', '.join(sorted(classes)[:20])}); set input.allow_new_classes "
                                   f"to add classes from corrections")


def majority(answers: dict[str, list[str]]) -> tuple[dict[str, str], list[str]]:
    """``({uri: label}, [conflicting uris])``: the most frequent answer per item; a tie is
    conflicting."""
    decided, conflicting = {}, []
    for uri, votes in answers.items():
        ranked = Counter(votes).most_common()
        if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
            conflicting.append(uri)
        else:
            decided[uri] = ranked[0][0]
    return decided, conflicting


def apply_corrections(samples: pa.Table, *, stored: pa.Table | None, answers: dict[str, list[str]] | None,
                      run_id: str) -> tuple[pa.Table, pa.Table, dict]:
    """``samples`` with the corrections applied (``label``, ``label_source``, ``given_label``),
    the corrections to keep with this run, and the ``run.json`` summary. Only the corrected
    items are visited one by one; every other row is handled by Arrow, in bulk."""
    n = samples.num_rows
    stored_rows = stored.to_pylist() if stored is not None else []
    decided, conflicting = majority(answers or {})
    wanted = list(dict.fromkeys([r["uri"] for r in stored_rows] + list(decided)))
    at = pc.index_in(pa.array(wanted, pa.string()), value_set=samples["uri"].combine_chunks().cast(pa.string()))
    position = dict(zip(wanted, at.to_pylist()))
    take = pa.array([p for p in position.values() if p is not None], pa.int64())
    found = [u for u, p in position.items() if p is not None]
    fingerprint = dict(zip(found, (samples["fingerprint"].take(take).to_pylist() if "fingerprint" in samples.column_names
                                   else [None] * len(found))))
    given = dict(zip(found, samples["label"].take(take).to_pylist()))
    keep: dict[str, dict] = {}
    stale = 0
    # A stored correction holds while its item is unchanged (curation.item_key: an unknown
    # fingerprint, then or now, never is).
    still = unchanged(stored, samples.take(take)) if stored_rows else np.zeros(0, bool)
    for row, same in zip(stored_rows, still):
        if position.get(row["uri"]) is None:
            continue  # the item is gone
        if not same:
            stale += 1  # its file changed since it was corrected (or cannot be shown unchanged)
            continue
        keep[row["uri"]] = row
    unknown = [u for u in decided if position.get(u) is None]
    for uri, label in decided.items():
        if position.get(uri) is not None:  # newer than anything stored
            keep[uri] = {"uri": uri, "fingerprint": fingerprint[uri], "label": label, "given_label": given[uri],
                         "run_id": run_id}
    # Row -> its correction (index into the kept list), or len(kept) for no correction.
    kept = list(keep.values())
    slot = np.full(n, len(kept), np.int64)
    slot[[position[r["uri"]] for r in kept]] = np.arange(len(kept))
    corrected = pa.array(slot < len(kept))
    slot_array = pa.array(slot)
    label = pc.if_else(corrected, pa.array([r["label"] for r in kept] + [None], pa.string()).take(slot_array),
                       samples["label"].cast(pa.string()))
    source = pc.if_else(corrected, pa.scalar(SOURCE_CORRECTED),
                        pc.if_else(pc.is_valid(samples["label"]), pa.scalar(SOURCE_GIVEN), pa.scalar(None, pa.string())))
    given_label = pa.array([r["given_label"] for r in kept] + [None], pa.string()).take(slot_array)
    out = samples.set_column(samples.column_names.index("label"), "label", label)
    for name, column in (("label_source", source), ("given_label", given_label)):
        out = (out.set_column(out.column_names.index(name), name, column) if name in out.column_names
               else out.append_column(name, column))
    store = pa.Table.from_pylist(kept, schema=STORE_SCHEMA) if kept else STORE_SCHEMA.empty_table()
    summary = {"applied": len(kept), "new": len(decided) - len(unknown),
               "kept_from_previous_runs": sum(1 for r in kept if r["run_id"] != run_id),
               "unknown_uri": len(unknown), "conflicting": len(conflicting), "stale": stale,
               "changed_label": sum(1 for r in kept if r["label"] != r["given_label"])}
    return out, store, summary


def corrected_mask(samples: pa.Table) -> np.ndarray:
    """Rows whose label is an annotator's correction."""
    if "label_source" not in samples.column_names:
        return np.zeros(samples.num_rows, bool)
    return pc.fill_null(pc.equal(samples["label_source"], SOURCE_CORRECTED), False).to_numpy(zero_copy_only=False)
