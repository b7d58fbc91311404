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
    the corrections to keep with this run, and the ``run.json`` summary. Only the corrected
    items are visited one by one; every other row is handled by Arrow, in bulk."""
    import pyarrow.compute as pc

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
    for row in stored_rows:
        if position.get(row["uri"]) is None:
            continue  # the item is gone
        if row["fingerprint"] is not None and row["fingerprint"] != fingerprint[row["uri"]]:
            stale += 1  # its file changed since it was corrected
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
    import pyarrow.compute as pc

    if "label_source" not in samples.column_names:
        return np.zeros(samples.num_rows, bool)
    return pc.fill_null(pc.equal(samples["label_source"], SOURCE_CORRECTED), False).to_numpy(zero_copy_only=False)
