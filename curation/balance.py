"""Class and metadata balance statistics for ``run.json``.

For the label and for every metadata column (manifest columns that are not ours) with at most
``MAX_VALUES`` distinct values, the counts of each value among the ok items and inside each
selection, with two summaries per distribution:

* ``max_min_ratio``: the largest count over the smallest (1.0 = perfectly balanced; null when
  a value present among the ok items is missing from the selection, ``missing`` lists them);
* ``normalized_entropy``: Shannon entropy over log(number of values) in [0, 1] (1 = uniform).

A column with more distinct values is reported as ``{"skipped": "..."}`` (an id or a free-text
field is not something to balance on).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.schema import SCHEMA_COLUMNS, is_ok

MAX_VALUES = 50
NULL_VALUE = "<null>"


def metadata_columns(samples: pa.Table, score_columns: set[str]) -> list[str]:
    """Columns that came from the manifest: neither ours nor a score's."""
    return [name for name in samples.column_names
            if name not in SCHEMA_COLUMNS and name not in score_columns and not name.startswith("_")]


def distribution(values, universe: list[str] | None = None) -> dict:
    """Counts and balance summaries of an Arrow string column (nulls counted as ``<null>``)."""
    filled = pc.fill_null(values, NULL_VALUE)
    counts = {str(v["values"]): int(v["counts"]) for v in pc.value_counts(filled).to_pylist()} if len(filled) else {}
    out: dict = {"counts": dict(sorted(counts.items()))}
    missing = sorted(set(universe or []) - set(out["counts"]))
    present = np.array(list(out["counts"].values()), np.float64)
    if len(present) == 0:
        out.update(max_min_ratio=None, normalized_entropy=None)
        return out
    out["max_min_ratio"] = None if missing else round(float(present.max() / present.min()), 4)
    if missing:
        out["missing"] = missing
    k = len(present) + len(missing)
    p = present / present.sum()
    entropy = float(-(p * np.log(p)).sum())
    out["normalized_entropy"] = round(entropy / math.log(k), 4) if k > 1 else 1.0
    return out


def balance_stats(samples: pa.Table, selections: dict[str, pa.Table], score_columns: set[str]) -> dict:
    """``{column: {"ok": distribution, "selections": {name: distribution}}}`` for the label and
    every low-cardinality metadata column; see the module docstring."""
    columns = (["label"] if samples["label"].null_count < samples.num_rows else []) + metadata_columns(
        samples, score_columns)
    if not columns:
        return {}
    ok = samples.filter(pa.array(is_ok(samples["status"]))).select(["uri", *columns])
    stats: dict = {}
    for column in columns:
        values = ok[column].cast(pa.string()) if not pa.types.is_string(ok[column].type) else ok[column]
        distinct = len(pc.unique(values))
        if distinct > MAX_VALUES:
            stats[column] = {"skipped": f"{distinct} distinct values among ok items (more than {MAX_VALUES})"}
            continue
        overall = distribution(values)
        universe = list(overall["counts"])
        per_selection = {}
        for name, table in selections.items():
            # A manifest may list one object twice; a selection row names it by uri, so the
            # first ok row with that uri speaks for it.
            where = pc.index_in(table["uri"], value_set=ok["uri"].combine_chunks())
            picked = values.take(where)
            per_selection[name] = distribution(picked, universe)
        stats[column] = {"ok": overall, "selections": per_selection}
    return stats
