"""What changed since the previous published run: the nightly view.

Against the run ``latest`` named when this run started (if it is complete):

* inputs: ``new`` (a uri the previous run did not have), ``changed`` (same uri, another
  fingerprint: size / modification time / etag) and ``deleted``;
* flags: per flag, how many items are flagged now that were not flagged then (new items
  included);
* selections: per selection, the uris ``added`` and ``removed``, written to
  ``diff/<selection>.parquet`` (``uri, change, reason``: this run's reason for an added row,
  the previous run's for a removed one).

Only the compared columns are read (uri, fingerprint, the flag columns, the selections).
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from curation.io.filesystem import Location
from curation.item_key import unchanged, unverifiable
from curation.object_scores import OBJECT_FLAGS
from curation.run_layout import OBJECTS_FOLDER
from curation.scores import declared_flags

if TYPE_CHECKING:
    from curation.published_run import PublishedRun

log = logging.getLogger(__name__)



def diff_runs(previous: PublishedRun, samples: pa.Table, selections: dict[str, pa.Table], folder: Location, *,
              objects: pa.Table | None = None) -> dict:
    """Compare this run with ``previous``; write ``folder/<selection>.parquet``; return the
    summary for ``run.json``."""
    flags = declared_flags()  # every flag the scores declare
    old = previous.items([f.column for f in flags], ok_only=False)
    if old is None:
        return {"previous_run": previous.uri, "error": "previous samples unreadable"}
    now_uri, old_uri = samples["uri"], old["uri"]
    is_new = ~pc.is_in(now_uri, value_set=old_uri).to_numpy(zero_copy_only=False)
    deleted = int((~pc.is_in(old_uri, value_set=now_uri).to_numpy(zero_copy_only=False)).sum())
    # Seen before and not the same version (curation.item_key). An item whose version is unknown
    # (a null fingerprint, then or now) is never counted unchanged: it is counted apart.
    unverified = unverifiable(samples, old)
    changed = int((~is_new & ~unchanged(samples, old) & ~unverified).sum())
    newly = {}
    for declared in flags:
        if declared.column not in samples.column_names:
            continue
        now_set = pc.filter(now_uri, pa.array(declared.mask(samples)))
        was = pc.filter(old_uri, pa.array(declared.mask(old)))  # a flag the previous run lacked: none
        newly[declared.key] = int((~pc.is_in(now_set, value_set=was).to_numpy(zero_copy_only=False)).sum())
    changes = {}
    folder.filesystem.create_dir(folder.path, recursive=True)
    for name, table in selections.items():
        # A selection of boxes (box_review) is keyed by object_id: one image holds many boxes.
        key = "object_id" if "object_id" in table.column_names else "uri"
        columns = ["uri", "reason"] + ([key] if key != "uri" else [])
        before = previous.selection(name, columns)
        if before is None or key not in before.column_names:
            before = pa.table({c: pa.array([], pa.string()) for c in columns})
        added = table.filter(pc.invert(pc.is_in(table[key], value_set=before[key])))
        removed = before.filter(pc.invert(pc.is_in(before[key], value_set=table[key])))
        rows = {c: pa.concat_arrays([added[c].combine_chunks().cast(pa.string()),
                                     removed[c].combine_chunks().cast(pa.string())]) for c in columns}
        rows["change"] = pa.array(["added"] * added.num_rows + ["removed"] * removed.num_rows, pa.string())
        rows = pa.table({c: rows[c] for c in ["uri", "change", "reason"] + columns[2:]})
        target = folder.child(f"{name}.parquet")
        pq.write_table(rows, target.path, filesystem=target.filesystem)
        changes[name] = {"added": added.num_rows, "removed": removed.num_rows}
    summary = {"previous_run": previous.uri,
               "inputs": {"new": int(np.sum(is_new)), "changed": changed, "deleted": deleted},
               "unverified": int(unverified.sum()),
               "newly_flagged": newly, "selections": changes}
    if objects is not None:
        summary["objects"] = _object_changes(previous, objects)
    log.info("since %s: %s", previous.uri, json.dumps({k: v for k, v in summary.items() if k != "previous_run"}))
    return summary



def _object_changes(previous: PublishedRun, objects: pa.Table) -> dict:
    """A detection run's boxes against the previous run's, by ``object_id`` (the same box of
    the same image, :func:`curation.item_key.object_ids`): new and gone boxes, relabelled ones,
    and per box flag the boxes newly flagged."""
    try:
        location = previous.child(OBJECTS_FOLDER)
        old = ds.dataset(location.path, filesystem=location.filesystem, format="parquet")
        old = old.to_table(columns=[c for c in ["object_id", "label", *OBJECT_FLAGS] if c in old.schema.names])
    except (OSError, pa.ArrowException, ValueError):
        return {"error": "previous objects unreadable (or the previous run had none)"}
    now_id, old_id = objects["object_id"], old["object_id"]
    seen = pc.is_in(now_id, value_set=old_id).to_numpy(zero_copy_only=False)
    gone = int((~pc.is_in(old_id, value_set=now_id).to_numpy(zero_copy_only=False)).sum())
    both = objects.filter(pa.array(seen)).select(["object_id", "label"]).join(
        old.select(["object_id", "label"]), "object_id", right_suffix="_before")
    relabelled = int(pc.sum(pc.fill_null(pc.not_equal(both["label"], both["label_before"]), False)).as_py() or 0)
    newly = {}
    for flag in OBJECT_FLAGS:
        if flag not in objects.column_names:
            continue
        now_set = pc.filter(now_id, pc.fill_null(objects[flag], False))
        was = pc.filter(old_id, pc.fill_null(old[flag], False)) if flag in old.column_names else pa.array([], pa.string())
        newly[flag] = int((~pc.is_in(now_set, value_set=was).to_numpy(zero_copy_only=False)).sum())
    return {"new": int((~seen).sum()), "gone": gone, "relabelled": relabelled, "newly_flagged": newly}
