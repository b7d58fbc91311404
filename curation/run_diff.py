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
import pyarrow.parquet as pq

from curation.io.filesystem import Location
from curation.item_key import unchanged, unverifiable
from curation.scores import declared_flags

if TYPE_CHECKING:
    from curation.published_run import PublishedRun

log = logging.getLogger(__name__)



def diff_runs(previous: PublishedRun, samples: pa.Table, selections: dict[str, pa.Table], folder: Location) -> dict:
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
        before = previous.selection(name, ["uri", "reason"])
        if before is None:
            before = pa.table({"uri": pa.array([], pa.string()), "reason": pa.array([], pa.string())})
        added = table.filter(pc.invert(pc.is_in(table["uri"], value_set=before["uri"])))
        removed = before.filter(pc.invert(pc.is_in(before["uri"], value_set=table["uri"])))
        rows = pa.table({
            "uri": pa.concat_arrays([added["uri"].combine_chunks().cast(pa.string()),
                                     removed["uri"].combine_chunks().cast(pa.string())]),
            "change": pa.array(["added"] * added.num_rows + ["removed"] * removed.num_rows, pa.string()),
            "reason": pa.concat_arrays([added["reason"].combine_chunks().cast(pa.string()),
                                        removed["reason"].combine_chunks().cast(pa.string())]),
        })
        target = folder.child(f"{name}.parquet")
        pq.write_table(rows, target.path, filesystem=target.filesystem)
        changes[name] = {"added": added.num_rows, "removed": removed.num_rows}
    summary = {"previous_run": previous.uri,
               "inputs": {"new": int(np.sum(is_new)), "changed": changed, "deleted": deleted},
               "unverified": int(unverified.sum()),
               "newly_flagged": newly, "selections": changes}
    log.info("since %s: %s", previous.uri, json.dumps({k: v for k, v in summary.items() if k != "previous_run"}))
    return summary

