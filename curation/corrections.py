"""Label corrections from annotators, folded back into the next runs.

``input.label_corrections`` is a Label Studio JSON export (tasks with their annotations; the
task's ``data.uri`` names the item, as ``curation export`` wrote it) or a CSV ``uri,label``
(a row per answer). Per item, the majority answer is the correction; a tie is conflicting and
not applied. Cancelled annotations and answers without a choice do not vote.

Applied corrections are kept with the run (``<run>/corrections.parquet``: uri, fingerprint,
label, given_label, run_id), and the next run reads them from the previous published run, so
later nights keep them without the file; a newer correction of an item replaces the older one.
A correction applies while the item's file is unchanged (same fingerprint); an item whose file
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

from curation.io.filesystem import Location, StorageError, read_bytes

STORE_SCHEMA = pa.schema([("uri", pa.string()), ("fingerprint", pa.string()), ("label", pa.string()),
                          ("given_label", pa.string()), ("run_id", pa.string())])
SOURCE_GIVEN, SOURCE_CORRECTED = "given", "corrected"


def read_answers(location: Location) -> dict[str, list[str]]:
    """``{uri: [answer, ...]}`` from a Label Studio JSON export or a ``uri,label`` CSV."""
    try:
        data = read_bytes(location)
    except OSError as exc:
        raise StorageError(f"{location.uri}: cannot read label corrections ({exc})") from exc
    answers: dict[str, list[str]] = {}
    if location.path.lower().endswith(".json"):
        try:
            tasks = json.loads(data)
        except ValueError as exc:
            raise ValueError(f"{location.uri}: not a Label Studio JSON export ({exc})") from None
        if not isinstance(tasks, list):
            raise ValueError(f"{location.uri}: expected a list of Label Studio tasks, got {type(tasks).__name__}")
        for task in tasks:
            uri = ((task or {}).get("data") or {}).get("uri")
            if not uri:
                continue
            for annotation in task.get("annotations") or []:
                if annotation.get("was_cancelled"):
                    continue
                choices = [c for result in annotation.get("result") or [] if result.get("type") == "choices"
                           for c in (result.get("value") or {}).get("choices") or []]
                if len(choices) == 1:
                    answers.setdefault(uri, []).append(str(choices[0]))
        return answers
    reader = csv.reader(io.StringIO(data.decode("utf-8-sig")))
    for i, row in enumerate(reader):
        if len(row) < 2 or (i == 0 and row[0].strip().lower() == "uri"):
            continue
        if row[0].strip() and row[1].strip():
            answers.setdefault(row[0].strip(), []).append(row[1].strip())
    return answers


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
    the corrections to keep with this run, and the ``run.json`` summary."""
    uris = samples["uri"].to_pylist()
    index = {u: i for i, u in enumerate(uris)}
    fingerprints = (samples["fingerprint"].to_pylist() if "fingerprint" in samples.column_names
                    else [None] * samples.num_rows)
    given = samples["label"].to_pylist()
    keep: dict[str, dict] = {}
    stale = 0
    for row in (stored.to_pylist() if stored is not None else []):
        i = index.get(row["uri"])
        if i is None:
            continue  # the item is gone
        if row["fingerprint"] is not None and row["fingerprint"] != fingerprints[i]:
            stale += 1  # its file changed since it was corrected
            continue
        keep[row["uri"]] = row
    decided, conflicting = majority(answers or {})
    unknown = [u for u in decided if u not in index]
    for uri, label in decided.items():
        i = index.get(uri)
        if i is not None:  # newer than anything stored
            keep[uri] = {"uri": uri, "fingerprint": fingerprints[i], "label": label, "given_label": given[i],
                         "run_id": run_id}
    labels = list(given)
    source = [SOURCE_GIVEN if g is not None else None for g in given]
    given_out: list[str | None] = [None] * len(given)
    for uri, row in keep.items():
        i = index[uri]
        given_out[i] = row["given_label"]
        labels[i], source[i] = row["label"], SOURCE_CORRECTED
    out = samples.set_column(samples.column_names.index("label"), "label", pa.array(labels, pa.string()))
    for name, values in (("label_source", source), ("given_label", given_out)):
        column = pa.array(values, pa.string())
        out = (out.set_column(out.column_names.index(name), name, column) if name in out.column_names
               else out.append_column(name, column))
    store = pa.Table.from_pylist(list(keep.values()), schema=STORE_SCHEMA) if keep else STORE_SCHEMA.empty_table()
    summary = {"applied": int(sum(1 for s in source if s == SOURCE_CORRECTED)),
               "new": int(len([u for u in decided if u in index])), "kept_from_previous_runs":
               int(sum(1 for u, r in keep.items() if r["run_id"] != run_id)),
               "unknown_uri": len(unknown), "conflicting": len(conflicting), "stale": stale,
               "changed_label": int(sum(1 for u, r in keep.items() if r["label"] != r["given_label"]))}
    return out, store, summary


def corrected_mask(samples: pa.Table) -> np.ndarray:
    if "label_source" not in samples.column_names:
        return np.zeros(samples.num_rows, bool)
    return np.array([s == SOURCE_CORRECTED for s in samples["label_source"].to_pylist()], bool)
