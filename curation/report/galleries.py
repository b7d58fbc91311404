"""Which items each gallery of the report shows: data only (uris and captions), no HTML.

Galleries are chosen from the published ``samples`` and selections, so every member is an item
of the run with exactly the flag its gallery names (the tests check that).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.report.map import flag
from curation.schema import is_ok
from curation import scores
from curation.scores.label_quality import SUSPECTED

DUPLICATE_GROUP_SIZE = 6  # members shown per duplicate group


@dataclass
class GalleryItem:
    uri: str
    lines: list[str]
    badge: str | None = None


@dataclass
class Gallery:
    """One gallery: a title, what it shows, and its items in groups (one group unless grouped)."""

    key: str
    title: str
    note: str
    groups: list[list[GalleryItem]] = field(default_factory=list)
    total: int = 0  # items with this flag in the run (the gallery shows the first few)
    grouped: bool = False  # one row per group (duplicate groups, leaked pairs)

    @property
    def uris(self) -> list[str]:
        return [item.uri for group in self.groups for item in group]


def _ordered(samples: pa.Table, rows: np.ndarray, by: str | None, ascending: bool) -> np.ndarray:
    if by is None or by not in samples.column_names or len(rows) == 0:
        return rows
    values = np.asarray(samples[by].to_numpy(zero_copy_only=False), np.float64)[rows]
    values = np.where(np.isfinite(values), values, np.inf if ascending else -np.inf)
    order = np.argsort(values if ascending else -values, kind="stable")
    return rows[order]


def _fmt(value, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return format(value, spec)


def _rows(samples: pa.Table, rows: np.ndarray) -> list[dict]:
    return samples.take(pa.array(rows, pa.int64())).to_pylist()


def mislabel_galleries(samples: pa.Table, size: int) -> list[Gallery]:
    """One gallery per declared label flag (suspected mislabels, disputed corrections)."""
    return [mislabel_gallery(samples, size, declared) for declared in scores.declared_flags("mislabel")]


def mislabel_gallery(samples: pa.Table, size: int, mislabel=None) -> Gallery:
    mislabel = mislabel or scores.declared_flags("mislabel")[0]
    rows = np.flatnonzero(flag(samples, mislabel.column))
    shown = _ordered(samples, rows, mislabel.order_by, mislabel.ascending)[:size]
    items = [GalleryItem(r["uri"], [f"{r['label']} \u2192 {r['suggested_label']}",
                                    f"label quality {_fmt(r['label_quality'])}"]) for r in _rows(samples, shown)]
    key = "mislabels" if mislabel.column == SUSPECTED.column else mislabel.key
    return Gallery(key, mislabel.title, "label \u2192 suggested label, lowest label quality first",
                   [items], len(rows))


def edge_case_galleries(samples: pa.Table, selections: dict[str, pa.Table], modes: dict[str, str],
                        size: int) -> list[Gallery]:
    out = []
    for name, table in selections.items():
        if modes.get(name) != "edge_cases":
            continue
        top = table.slice(0, size).to_pylist()
        items = [GalleryItem(r["uri"], [str(r["label"]), f"score {_fmt(r['score'])}"]) for r in top]
        out.append(Gallery(f"edge-{name}", f"Edge cases: selection {name}",
                           "the selection's first items (rarest in their class first)", [items], table.num_rows))
    return out


def duplicate_gallery(samples: pa.Table, size: int) -> Gallery:
    if "dup_group" not in samples.column_names:
        return Gallery("duplicates", "Largest duplicate groups", "", [], 0)
    group = samples["dup_group"].to_numpy(zero_copy_only=False)
    group = np.asarray(group, np.float64)
    rows = np.flatnonzero(np.isfinite(group))
    if len(rows) == 0:
        return Gallery("duplicates", "Largest duplicate groups", "", [], 0)
    ids, inverse, counts = np.unique(group[rows], return_inverse=True, return_counts=True)
    n_groups = max(1, size // 3)
    biggest = np.argsort(-counts, kind="stable")[:n_groups]
    kept = np.ones(samples.num_rows, bool)  # not a copy of another item (the duplicate flags)
    for declared in scores.declared_flags("duplicate"):
        kept &= ~declared.mask(samples)
    groups = []
    for g in biggest:
        members = rows[inverse == g]
        members = np.concatenate([members[kept[members]], members[~kept[members]]])[:DUPLICATE_GROUP_SIZE]
        items = []
        for row, r in zip(members, _rows(samples, members)):
            badge = "kept" if kept[row] else None
            lines = [f"group {int(r['dup_group'])} ({counts[g]} items)"]
            lines.append("kept" if badge else f"{r.get('dup_kind') or 'duplicate'} of the kept item")
            items.append(GalleryItem(r["uri"], lines, badge))
        groups.append(items)
    return Gallery("duplicates", "Largest duplicate groups",
                   "each row is one group, the kept item first (marked); the others are excluded from clean",
                   groups, int(len(ids)), grouped=True)


def leakage_gallery(leakage: pa.Table | None, size: int) -> Gallery:
    """Copies across splits (``leakage.parquet``), most similar pairs first, one row per pair."""
    if leakage is None or leakage.num_rows == 0:
        return Gallery("leakage", "Copies across splits", "", [], 0)
    order = np.argsort(-leakage["similarity"].to_numpy(zero_copy_only=False), kind="stable")[: max(1, size // 2)]
    groups = []
    for r in leakage.take(pa.array(order, pa.int64())).to_pylist():
        caption = f"{r['kind']} copy, similarity {_fmt(r['similarity'])}"
        groups.append([GalleryItem(r["uri_a"], [f"split {r['split_a']}", caption], r["split_a"]),
                       GalleryItem(r["uri_b"], [f"split {r['split_b']}", caption], r["split_b"])])
    return Gallery("leakage", "Copies across splits",
                   "each row is one pair of copies in different splits (leakage.parquet), most similar first",
                   groups, leakage.num_rows, grouped=True)


def drift_gallery(members: pa.Table | None, size: int) -> Gallery:
    """New regions since the previous run (``drift.parquet``), largest first, one row per region."""
    if members is None or members.num_rows == 0:
        return Gallery("drift", "New since the previous run", "", [], 0)
    region = members["region"].to_numpy(zero_copy_only=False)
    sizes = np.bincount(region)
    groups = []
    for r in range(min(len(sizes), max(1, size // 3))):
        if sizes[r] < 2:
            break
        shown = members.filter(pc.equal(members["region"], r)).slice(0, DUPLICATE_GROUP_SIZE).to_pylist()
        groups.append([GalleryItem(m["uri"], [f"region {r} ({sizes[r]} new items)",
                                              "far from everything before" if m["far"] else
                                              "its neighbours are new items"]) for m in shown])
    return Gallery("drift", "New since the previous run",
                   "each row is one region of new items: far from everything the previous run had, or with new "
                   "items for neighbours more than chance allows (drift.parquet), largest first", groups, len(groups),
                   grouped=True)


def threshold_galleries(score_summary: dict | None) -> list[Gallery]:
    """Items or pairs just either side of the copy and label-quality thresholds, side by side
    (from each score's ``thresholds`` evidence), so a user sees what moving the value changes."""
    out = []
    for name, summary in (score_summary or {}).items():
        for key, evidence in (summary.get("thresholds") or {}).items():
            flagged, other = evidence.get("flagged") or [], evidence.get("not_flagged") or []
            if not (flagged or other):
                continue
            value = evidence["value"]
            if flagged and "uri_a" in flagged[0] or other and "uri_a" in other[0]:
                def row(pair, verdict):
                    caption = [f"similarity {_fmt(pair['similarity'])}", verdict]
                    return [GalleryItem(pair["uri_a"], caption), GalleryItem(pair["uri_b"], caption)]

                groups = ([row(p, f"copies at {key} {value}") for p in flagged]
                          + [row(p, f"not copies at {key} {value}") for p in other])
                note = (f"pairs nearest {key} = {value}: the first {len(flagged)} rows are flagged as copies, the "
                        f"next {len(other)} are not; raising or lowering it moves the line between them")
            else:
                def item(entry, verdict):
                    return GalleryItem(entry["uri"], [f"labelled {entry['label']}, suggested {entry['suggested_label']}",
                                                      f"label quality {_fmt(entry['label_quality'])}", verdict])

                groups = [[item(e, "flagged") for e in flagged], [item(e, "not flagged") for e in other]]
                note = (f"items nearest {key} = {value} that the label models confidently disagree with: first row "
                        f"just below (flagged), second row just above (not flagged)")
            out.append(Gallery(f"threshold-{key}", f"Either side of {key} = {value}", note, groups,
                               sum(len(g) for g in groups), grouped=True))
    return out


def junk_galleries(samples: pa.Table, size: int) -> list[Gallery]:
    out = []
    for declared in scores.declared_flags("junk"):
        column, title, by, ascending = declared.column, declared.title, declared.order_by, declared.ascending
        rows = np.flatnonzero(flag(samples, column))
        if len(rows) == 0:
            continue
        shown = _ordered(samples, rows, by, ascending)[:size]
        items = [GalleryItem(r["uri"], [str(r["label"]), f"{by} {_fmt(r.get(by))}"]) for r in _rows(samples, shown)]
        out.append(Gallery(f"junk-{column}", title, f"most extreme {by} first", [items], len(rows)))
    return out


def rejected_gallery(samples: pa.Table, size: int) -> Gallery:
    rows = np.flatnonzero(~is_ok(samples["status"]))
    items = [GalleryItem(r["uri"], [str(r["reason"])]) for r in _rows(samples, rows[:size])]
    return Gallery("rejected", "Rejected files", "not decoded: each with its reason", [items], len(rows))


def choose_galleries(samples: pa.Table, selections: dict[str, pa.Table], modes: dict[str, str], *,
                     size: int, leakage: pa.Table | None = None, drift: pa.Table | None = None,
                     score_summary: dict | None = None) -> list[Gallery]:
    """Every gallery of the page, in page order; empty ones are dropped."""
    if size <= 0:
        return []
    galleries = [*mislabel_galleries(samples, size), *edge_case_galleries(samples, selections, modes, size),
                 duplicate_gallery(samples, size), leakage_gallery(leakage, size), drift_gallery(drift, size),
                 *junk_galleries(samples, size), *threshold_galleries(score_summary),
                 rejected_gallery(samples, size)]
    return [g for g in galleries if g.total]
