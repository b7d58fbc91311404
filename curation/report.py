"""report.html: one self-contained page (inline CSS and SVG, no scripts or external assets)."""

from __future__ import annotations

import html
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.schema import STATUS_REJECTED

PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
           "#9c755f", "#bab0ac"]
MAX_PLOTTED = 3000


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _scatter(samples: pa.Table) -> str:
    x = samples["x"].to_numpy(zero_copy_only=False).astype(np.float64)
    y = samples["y"].to_numpy(zero_copy_only=False).astype(np.float64)
    has = np.isfinite(x) & np.isfinite(y)
    idx = np.flatnonzero(has)
    if len(idx) == 0:
        return "<p>No map coordinates.</p>"
    idx = idx[np.unique(np.linspace(0, len(idx) - 1, min(len(idx), MAX_PLOTTED)).astype(int))]
    cluster = samples["cluster"].to_numpy(zero_copy_only=False)
    flagged = (samples["dup_of"].is_valid().to_numpy(zero_copy_only=False)
               | samples["is_suspected_mislabel"].to_numpy(zero_copy_only=False))
    xs, ys = x[idx], y[idx]
    w, h, pad = 640, 420, 10
    sx = (xs - xs.min()) / max(np.ptp(xs), 1e-9) * (w - 2 * pad) + pad
    sy = (ys - ys.min()) / max(np.ptp(ys), 1e-9) * (h - 2 * pad) + pad
    dots = []
    for px, py, i in zip(sx, sy, idx):
        color = PALETTE[int(cluster[i]) % len(PALETTE)]
        stroke = ' stroke="#000" stroke-width="1"' if flagged[i] else ""
        dots.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="2.5" fill="{color}"{stroke}/>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
            f'style="background:#fafafa;border:1px solid #ddd">{"".join(dots)}</svg>'
            f"<p class=note>PCA of the embeddings, coloured by cluster; outlined: duplicates and suspected "
            f"mislabels. {len(idx)} of {samples.num_rows} items plotted.</p>")


def render_report(*, run_id: str, samples: pa.Table, run_info: dict, selections: dict[str, pa.Table]) -> str:
    counts = run_info["counts"]
    flags = run_info["flags"]
    rejected_reasons = samples.filter(pc.equal(samples["status"], STATUS_REJECTED))["reason"].to_pylist()
    rejected = Counter((r or "").split(":")[0] for r in rejected_reasons)
    review = selections.get("label_review")
    parts = [
        "<!doctype html><html><head><meta charset=utf-8>",
        f"<title>curation report {html.escape(run_id)}</title>",
        "<style>body{font:14px/1.4 system-ui,sans-serif;margin:2em;max-width:1000px}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:left}th{background:#f0f0f0}.note{color:#666;font-size:12px}"
        ".warn{background:#fff4e5;border:1px solid #f0b37e;padding:.5em 1em}</style></head><body>",
        f"<h1>Curation run {html.escape(run_id)}</h1>",
    ]
    embedder = run_info.get("embedder") or {}
    if embedder.get("warning"):
        parts.append(f"<p class=warn>{html.escape(embedder['warning'])}</p>")
    parts.append("<h2>Counts</h2>" + _table(["inputs", "ok", "rejected"],
                                             [[counts["inputs"], counts["ok"], counts["rejected"]]]))
    parts.append("<h2>Flags</h2>" + _table(["flag", "items"], [[k, v] for k, v in flags.items()]))
    if rejected:
        parts.append("<h2>Rejected, by reason</h2>" + _table(["reason", "items"], rejected.most_common()))
    parts.append("<h2>Selections</h2>" + _table(
        ["name", "mode", "rows", "eligible", "note"],
        [[s["name"], s["mode"], s["rows"], s["eligible"], s.get("note") or ""] for s in run_info["selections"]]))
    parts.append("<h2>Embedding map</h2>" + _scatter(samples))
    if review is not None and review.num_rows:
        top = review.slice(0, 25).to_pylist()
        parts.append("<h2>Label review (top 25)</h2>" + _table(
            ["rank", "uri", "label", "score", "reason"],
            [[r["rank"], r["uri"], r["label"], f"{r['score']:.3f}", r["reason"]] for r in top]))
    parts.append("<h2>Embedder</h2>" + _table(["key", "value"], [[k, v] for k, v in embedder.items()]))
    parts.append("</body></html>")
    return "".join(parts)
