"""The run report: ``report.html``, one offline page.

* :mod:`curation.report.map` chooses the plotted items and gives them ``x``, ``y``;
* :mod:`curation.report.galleries` chooses each gallery's items;
* :mod:`curation.report.thumbnails` reads those items' thumbnails back from storage;
* :mod:`curation.report.page` renders the page.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.config import Config
from curation.io.filesystem import Resolver
from curation.report.boxes import box_galleries, crop_requests, fetch_crops
from curation.report.galleries import Gallery, choose_galleries
from curation.report.map import highlight_masks, map_coordinates
from curation.report.page import render_report
from curation.report.thumbnails import fetch_thumbnails

__all__ = ["ReportAssets", "prepare_report", "render_report"]


@dataclass
class ReportAssets:
    """What the page needs beyond ``samples`` and the selections: computed where Ray runs."""

    modes: dict[str, str]
    galleries: list[Gallery] = field(default_factory=list)
    thumbnails: dict[str, str] = field(default_factory=dict)
    map_info: dict = field(default_factory=dict)


def thumbnail_order(samples: pa.Table, galleries: list[Gallery], masks: dict[str, np.ndarray], cap: int) -> list[str]:
    """Uris to make thumbnails for, at most ``cap``: gallery members, then flagged map points,
    then the other map points."""
    wanted: dict[str, None] = {}
    for gallery in galleries:
        if gallery.key == "rejected":
            continue
        wanted.update(dict.fromkeys(gallery.uris))
    if "x" in samples.column_names:
        plotted = pc.is_valid(samples["x"]).to_numpy(zero_copy_only=False).astype(bool)
        flagged = np.logical_or.reduce(list(masks.values())) if masks else np.zeros(samples.num_rows, bool)
        rows = np.concatenate([np.flatnonzero(plotted & flagged), np.flatnonzero(plotted & ~flagged)])
        rows = rows[: max(0, cap - len(wanted))]
        wanted.update(dict.fromkeys(samples["uri"].take(pa.array(rows, pa.int64())).to_pylist()))
    return list(wanted)[:cap]


# Ten parameters, kept: the report reads every earlier phase's result; each arrives by name.
def prepare_report(samples: pa.Table, vectors, selections: list, config: Config,
                   resolver: Resolver, *, leakage: pa.Table | None = None,
                   drift: pa.Table | None = None, score_summary: dict | None = None,
                   previous=None, objects: pa.Table | None = None) -> tuple[pa.Table, ReportAssets]:
    """Map coordinates, galleries and thumbnails (``samples`` comes back with ``x``, ``y``);
    in a detection run (``objects``), the box galleries first, with their crops."""
    tables = {r.name: r.table for r in selections}
    modes = {r.name: r.mode for r in selections}
    samples, map_info = map_coordinates(samples, vectors, tables, modes, config.report, previous=previous)
    boxes = box_galleries(objects, config.report.gallery_size)
    galleries = choose_galleries(samples, tables, modes, size=config.report.gallery_size, leakage=leakage,
                                 drift=drift, score_summary=score_summary)
    thumbnails: dict[str, str] = {}
    if not config.input.embeddings and config.report.thumbnails:  # precomputed embeddings: no images
        uris = thumbnail_order(samples, galleries, highlight_masks(samples, tables, modes), config.report.thumbnails)
        thumbnails = fetch_thumbnails(uris, resolver, px=config.report.thumbnail_px,
                                      max_pixels=config.decode.max_pixels)
        room = max(0, config.report.thumbnails - len(thumbnails))  # the box map's crops share the cap
        thumbnails.update(fetch_crops(crop_requests(objects, boxes, map_cap=room), resolver,
                                      px=config.report.thumbnail_px, max_pixels=config.decode.max_pixels))
    galleries = boxes + galleries
    map_info["thumbnails"] = len(thumbnails)
    return samples, ReportAssets(modes, galleries, thumbnails, map_info)
