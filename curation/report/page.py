"""report.html: the run on one offline page.

Bokeh draws the map (WebGL scatter, zoom, pan, hover with the thumbnail, click for details) and
the charts; its JavaScript is inlined (about 1.5 MB), so the page opens with no network. The
controls (colour by, highlights) are plain HTML driving the map's data source by name, which
keeps Bokeh's widget bundle out of the page. Every string that comes from the data (uris,
labels, reasons, metadata) is escaped: ``html.escape`` in the HTML parts, Bokeh's own escaping
in tooltips, and a JavaScript ``esc`` for the detail panel.
"""

from __future__ import annotations

import html
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.object_scores import OBJECT_FLAGS
from curation.report.boxes import crop_key
from curation.report.galleries import Gallery
from curation.report.map import highlight_masks
from curation.run_info import RunInfo
from curation.schema import is_ok

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
           "#dbdb8d", "#9edae5"]
HIGHLIGHT_ON, HIGHLIGHT_OFF = "#d62728", "#c7c7c7"
MAX_CLASSES_CHARTED = 25
MAX_CLUSTERS_CHARTED = 100
LEGEND_ENTRIES = 20
BLANK = "data:image/gif;base64,R0lGODlhAQABAAAAACH5BAEKAAEALAAAAAABAAEAAAICTAEAOw=="  # 1x1 transparent
BOKEH_COMPONENTS = ["bokeh", "bokeh-gl"]

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5em 2em;color:#222}
h1{margin:.2em 0}h2{margin:1.4em 0 .4em;border-bottom:1px solid #ddd}h3{margin:1em 0 .3em}
table{border-collapse:collapse;margin:.3em 0 1em}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}
th{background:#f3f3f3}.note{color:#666;font-size:12px}.cards{display:flex;flex-wrap:wrap;gap:1.5em}
.warn{background:#fff4e5;border:1px solid #f0b37e;padding:.5em 1em}
.gal{display:flex;flex-wrap:wrap;gap:6px}.groups{display:flex;flex-wrap:wrap;gap:10px}
.group{display:flex;gap:6px;padding:4px;background:#f3f3f3;border-radius:4px}figure{margin:0;width:112px;font-size:11px;word-break:break-all}
figure img,.noimg{width:96px;height:96px;object-fit:contain;background:#eee;display:block}
.noimg{display:flex;align-items:center;justify-content:center;color:#999}
figure.kept img{outline:3px solid #2ca02c}.badge{color:#2ca02c;font-weight:bold}
#controls{margin:.5em 0}#controls label{margin-right:1em}#detail{min-height:110px;font-size:12px}
#detail img{width:128px;height:128px;object-fit:contain;float:left;margin-right:1em;background:#eee}
.maprow{display:flex;gap:1.5em;align-items:flex-start}#legend span{display:inline-block;width:10px;height:10px;
margin-right:4px}#legend div{font-size:12px}#box_legend span{display:inline-block;width:10px;height:10px;
margin-right:4px}#box_legend div{font-size:12px}
"""

SCRIPT = """
(function(){
function esc(s){return String(s).replace(/[&<>"']/g,function(c){return {'&':'&amp;','<':'&lt;','>':'&gt;',
'"':'&quot;',"'":'&#39;'}[c];});}
var LEGENDS=%(legends)s, ON=%(on)s, OFF=%(off)s;
function source(){var docs=(window.Bokeh&&Bokeh.documents)||[];for(var i=0;i<docs.length;i++){
var m=docs[i].get_model_by_name('map_points');if(m)return m;}return null;}
function restyle(){var src=source();if(!src)return;var d=src.data,n=d.x.length;
var by=document.getElementById('colour_by').value;
var active=[].slice.call(document.querySelectorAll('#controls input[type=checkbox]:checked')).map(
function(e){return e.value;});var col=new Array(n),alpha=new Array(n),size=new Array(n);
for(var i=0;i<n;i++){var c;if(by==='class')c=d.c_class[i];else if(by==='cluster')c=d.c_cluster[i];
else c=d[by][i]?ON:OFF;var on=active.length===0||active.some(function(h){return d[h][i];});
col[i]=c;alpha[i]=on?0.85:0.06;size[i]=(on&&active.length)?8:5;}
d.colour=col;d.alpha=alpha;d.size=size;src.change.emit();
var lg=LEGENDS[by];document.getElementById('legend').innerHTML=lg?lg:
'<div><span style="background:'+ON+'"></span>flagged</div><div><span style="background:'+OFF+'"></span>other</div>';}
function detail(){var src=source();if(!src)return;var ix=src.selected.indices;if(!ix.length)return;
var d=src.data,i=ix[0],img=d.thumb[i]&&d.thumb[i].indexOf('data:image/webp')===0?'<img src="'+d.thumb[i]+'">':'';
document.getElementById('detail').innerHTML=img+'<b>'+esc(d.uri[i])+'</b><br>label: '+esc(d.label[i])+
' &rarr; suggested: '+esc(d.suggested[i])+'<br>cluster '+esc(d.cluster[i])+', sparseness '+esc(d.sparseness_txt[i])
+', label quality '+esc(d.label_quality_txt[i])+'<br>'+esc(d.flags[i]);}
function wire(){var src=source();if(!src){return setTimeout(wire,50);}
src.selected.connect(src.selected.change,detail);
document.getElementById('colour_by').addEventListener('change',restyle);
[].forEach.call(document.querySelectorAll('#controls input[type=checkbox]'),function(e){
e.addEventListener('change',restyle);});restyle();window.curationMapReady=true;}
if(document.readyState==='loading')document.addEventListener('DOMContentLoaded',wire);else wire();
})();
"""


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _colour_codes(values: list, palette: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """A colour per value (the most frequent values get distinct colours) and the legend."""
    counts = Counter(values)
    order = [v for v, _ in counts.most_common()]
    colour = {v: palette[i % len(palette)] for i, v in enumerate(order)}
    return [colour[v] for v in values], [(str(v), colour[v]) for v in order[:LEGEND_ENTRIES]]


def _legend_html(entries: list[tuple[str, str]], more: int) -> str:
    rows = "".join(f'<div><span style="background:{c}"></span>{html.escape(v)}</div>' for v, c in entries)
    return rows + (f'<div class=note>... {more} more</div>' if more > 0 else "")


def _text(value) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def map_source_data(samples: pa.Table, masks: dict[str, np.ndarray], thumbnails: dict[str, str]) -> tuple[dict, dict]:
    """The map's columns (one entry per plotted item) and the legends for class and cluster."""
    plotted = pc.is_valid(samples["x"]).to_numpy(zero_copy_only=False).astype(bool)
    rows = np.flatnonzero(plotted)
    picked = samples.take(pa.array(rows, pa.int64()))
    uri = picked["uri"].to_pylist()
    label = [v if v is not None else "(none)" for v in picked["label"].to_pylist()]
    cluster = [int(v) if v is not None else -1 for v in picked["cluster"].to_pylist()] \
        if "cluster" in picked.column_names else [-1] * len(rows)
    c_class, legend_class = _colour_codes(label, PALETTE)
    c_cluster, legend_cluster = _colour_codes(cluster, PALETTE)
    names = list(masks)
    flag_text = []
    for i in rows:
        flag_text.append(", ".join(n for n in names if masks[n][i]) or "no flag")
    data = {
        "x": picked["x"].to_numpy(zero_copy_only=False).astype(np.float64),
        "y": picked["y"].to_numpy(zero_copy_only=False).astype(np.float64),
        "uri": uri, "label": label,
        "suggested": [v if v is not None else "-" for v in picked["suggested_label"].to_pylist()]
        if "suggested_label" in picked.column_names else ["-"] * len(rows),
        "cluster": cluster,
        "sparseness_txt": [_text(v) for v in picked["sparseness"].to_pylist()]
        if "sparseness" in picked.column_names else ["-"] * len(rows),
        "label_quality_txt": [_text(v) for v in picked["label_quality"].to_pylist()]
        if "label_quality" in picked.column_names else ["-"] * len(rows),
        "flags": flag_text,
        "thumb": [thumbnails.get(u, BLANK) for u in uri],
        "c_class": c_class, "c_cluster": c_cluster,
        "colour": c_class, "alpha": [0.85] * len(rows), "size": [5] * len(rows),
    }
    for j, name in enumerate(names):
        data[f"h{j}"] = masks[name][rows].astype(np.int8)
    legends = {"class": _legend_html(legend_class, len(set(label)) - len(legend_class)),
               "cluster": _legend_html([(f"cluster {v}", c) for v, c in legend_cluster],
                                       len(set(cluster)) - len(legend_cluster))}
    return data, legends


def _map_figure(data: dict):
    from bokeh.models import ColumnDataSource, HoverTool, TapTool
    from bokeh.plotting import figure

    source = ColumnDataSource(data, name="map_points")
    fig = figure(width=820, height=620, output_backend="webgl", tools="pan,wheel_zoom,box_zoom,reset,save",
                 active_scroll="wheel_zoom", title=None, name="map")
    # A click selects one point for the detail panel: keep the others as they are (Bokeh fades them).
    fig.scatter("x", "y", source=source, fill_color="colour", line_color=None, fill_alpha="alpha", size="size",
                nonselection_fill_color="colour", nonselection_fill_alpha="alpha", nonselection_line_color=None,
                selection_line_color="black", selection_line_width=2, name="map_scatter")
    hover = HoverTool(tooltips="""
        <div style="width:230px;font-size:11px">
          <img src="@thumb" style="width:96px;height:96px;object-fit:contain;background:#eee">
          <div><b>@uri</b></div><div>label: @label &rarr; @suggested</div>
          <div>cluster @cluster, sparseness @sparseness_txt, label quality @label_quality_txt</div>
          <div>@flags</div></div>""")
    fig.add_tools(hover, TapTool())
    fig.axis.visible = False
    fig.grid.visible = False
    return fig


def box_map_source_data(objects: pa.Table, thumbnails: dict[str, str]) -> tuple[dict, str]:
    """The box map's columns (one entry per plotted box: coloured by class, a flagged box ringed
    and larger) and its class legend."""
    picked = objects.filter(pc.is_valid(objects["x"]))
    label = [v if v is not None else "(none)" for v in picked["label"].to_pylist()]
    flags = [name for name in OBJECT_FLAGS if name in picked.column_names]
    marks = {name: pc.fill_null(picked[name], False).to_pylist() for name in flags}
    flag_text = [", ".join(n.removeprefix("is_") for n in flags if marks[n][i]) or "no flag" for i in range(len(label))]
    flagged = [text != "no flag" for text in flag_text]
    colour, legend = _colour_codes(label, PALETTE)
    uri, ids = picked["uri"].to_pylist(), picked["object_id"].to_pylist()
    data = {"x": picked["x"].to_numpy(zero_copy_only=False).astype(np.float64),
            "y": picked["y"].to_numpy(zero_copy_only=False).astype(np.float64),
            "uri": uri, "object_id": ids, "label": label, "flags": flag_text, "colour": colour,
            "suggested": [v or "-" for v in picked["suggested_box_label"].to_pylist()],
            "quality_txt": [_text(v) for v in picked["box_quality"].to_pylist()],
            "thumb": [thumbnails.get(crop_key(u, o), BLANK) for u, o in zip(uri, ids)],
            "ring": [1.0 if f else 0.0 for f in flagged], "size": [8 if f else 5 for f in flagged]}
    return data, _legend_html(legend, len(set(label)) - len(legend))


def _box_map_figure(data: dict):
    from bokeh.models import ColumnDataSource, HoverTool
    from bokeh.plotting import figure

    source = ColumnDataSource(data, name="box_points")
    fig = figure(width=820, height=560, output_backend="webgl", tools="pan,wheel_zoom,box_zoom,reset,save",
                 active_scroll="wheel_zoom", title=None, name="box_map")
    fig.scatter("x", "y", source=source, fill_color="colour", fill_alpha=0.85, size="size", line_color="black",
                line_alpha="ring", name="box_scatter")
    fig.add_tools(HoverTool(tooltips="""
        <div style="width:230px;font-size:11px">
          <img src="@thumb" style="width:96px;height:96px;object-fit:contain;background:#eee">
          <div><b>@uri</b></div><div>box @object_id</div><div>label: @label &rarr; @suggested</div>
          <div>box quality @quality_txt</div><div>@flags</div></div>"""))
    fig.axis.visible = False
    fig.grid.visible = False
    return fig


def _bars(title: str, factors: list, values: list[float], *, width: int = 820, height: int = 260,
          y_label: str = "items", colours: list[str] | None = None):
    from bokeh.models import ColumnDataSource, FactorRange, HoverTool
    from bokeh.plotting import figure

    source = ColumnDataSource({"x": factors, "top": values, "colour": colours or ["#4e79a7"] * len(values)})
    fig = figure(x_range=FactorRange(*factors), width=width, height=height, title=title, tools="hover,save",
                 toolbar_location="right")
    fig.vbar(x="x", top="top", width=0.85, source=source, fill_color="colour", line_color=None)
    fig.select_one(HoverTool).tooltips = [("", "@x"), (y_label, "@top{0.[000]}")]
    fig.xaxis.major_label_orientation = 0.9
    fig.yaxis.axis_label = y_label
    fig.xgrid.grid_line_color = None
    return fig


def _histogram(title: str, values: np.ndarray, threshold: float | None, threshold_label: str):
    from bokeh.models import Label, Span
    from bokeh.plotting import figure

    values = values[np.isfinite(values)]
    fig = figure(width=400, height=240, title=title, tools="save")
    if len(values):
        counts, edges = np.histogram(values, bins=40)
        fig.quad(top=counts, bottom=0, left=edges[:-1], right=edges[1:], fill_color="#4e79a7", line_color="white")
    if threshold is not None and np.isfinite(threshold):
        fig.add_layout(Span(location=float(threshold), dimension="height", line_color="#d62728", line_width=2))
        fig.add_layout(Label(x=float(threshold), y=0, text=threshold_label, text_font_size="10px",
                             text_color="#d62728", y_offset=4, x_offset=4))
    return fig


def _counts(values) -> Counter:
    """Items per distinct value, counted by Arrow (never a Python object per item)."""
    if len(values) == 0:
        return Counter()
    return Counter({row["values"]: row["counts"] for row in pc.value_counts(values).to_pylist()})


def _class_distribution(samples: pa.Table, selections: dict[str, pa.Table]):
    ok = is_ok(samples["status"])
    labels = samples.filter(pa.array(ok))["label"].drop_null()
    if len(labels) == 0:
        return None
    base = _counts(labels)
    classes = [c for c, _ in base.most_common(MAX_CLASSES_CHARTED)]
    sets = [("input", base)] + [(name, _counts(t["label"].drop_null())) for name, t in selections.items()]
    factors, values, colours = [], [], []
    for c in classes:
        for j, (name, counts) in enumerate(sets):
            total = sum(counts.values()) or 1
            factors.append((str(c), name))
            values.append(100.0 * counts.get(c, 0) / total)
            colours.append(PALETTE[j % len(PALETTE)])
    title = "Class distribution: share of each set (%)" + (
        f", the {MAX_CLASSES_CHARTED} largest classes" if len(base) > MAX_CLASSES_CHARTED else "")
    return _bars(title, factors, values, y_label="% of set", colours=colours, width=max(820, 12 * len(factors)))


def _cluster_sizes(samples: pa.Table):
    if "cluster" not in samples.column_names:
        return None
    clusters = samples["cluster"].drop_null()
    if len(clusters) == 0:
        return None
    counts = _counts(clusters).most_common(MAX_CLUSTERS_CHARTED)
    return _bars("Cluster sizes (largest first)" + (f", the {MAX_CLUSTERS_CHARTED} largest" if len(counts) >= MAX_CLUSTERS_CHARTED else ""),
                 [str(c) for c, _ in counts], [float(n) for _, n in counts])


def _column(samples: pa.Table, name: str) -> np.ndarray:
    if name not in samples.column_names:
        return np.zeros(0)
    return np.asarray(samples[name].to_numpy(zero_copy_only=False), np.float64)


def _gallery_html(gallery: Gallery, thumbnails: dict[str, str]) -> str:
    def figure(item) -> str:
        thumb = thumbnails.get(item.uri)
        image = (f'<img src="{thumb}" alt="{html.escape(item.uri)}" title="{html.escape(item.uri)}">' if thumb
                 else '<div class=noimg>no image</div>')
        badge = f'<div class=badge>{html.escape(item.badge)}</div>' if item.badge else ""
        lines = "".join(f"<div>{html.escape(line)}</div>" for line in item.lines)
        name = html.escape(item.uri.rsplit("/", 1)[-1])
        kept = ' class="kept"' if item.badge == "kept" else ""
        return f"<figure{kept}>{image}<figcaption>{badge}<div title=\"{html.escape(item.uri)}\">{name}</div>{lines}</figcaption></figure>"

    shown = sum(len(g) for g in gallery.groups)
    count = (f"{len(gallery.groups)} groups shown of {gallery.total}" if gallery.grouped
             else f"{shown} shown of {gallery.total}")
    head = (f'<section class=gallery id="gallery-{html.escape(gallery.key)}"><h3>{html.escape(gallery.title)} '
            f'<span class=note>({count})</span></h3><p class=note>{html.escape(gallery.note)}</p>')
    if gallery.grouped:
        body = "<div class=groups>" + "".join(
            "<div class=group>" + "".join(figure(i) for i in group) + "</div>" for group in gallery.groups) + "</div>"
    else:
        body = "<div class=gal>" + "".join(figure(i) for group in gallery.groups for i in group) + "</div>"
    return head + body + "</section>"


def _header(run_id: str, samples: pa.Table, run_info: RunInfo) -> list[str]:
    counts = run_info.counts
    embedder = run_info.embedder
    parts = [f"<h1>Curation run {html.escape(run_id)}</h1>",
             f"<p>input <b>{html.escape(run_info.input_uri)}</b>; embedder <b>{html.escape(run_info.model_id)}</b>"
             f"{' (semantic)' if embedder.get('semantic') else ''}</p>"]
    if embedder.get("warning"):
        parts.append(f"<p class=warn>{html.escape(embedder['warning'])}</p>")
    rejected_reasons = samples.filter(pa.array(~is_ok(samples["status"])))["reason"].to_pylist()
    rejected = Counter((r or "").split(":")[0] for r in rejected_reasons)
    cards = ["<div><h3>Counts</h3>" + _table(["inputs", "ok", "rejected"],
                                             [[counts.inputs, counts.ok, counts.rejected]])]
    if rejected:
        cards[-1] += _table(["rejected because", "items"], rejected.most_common())
    cards[-1] += "</div>"
    cards.append("<div><h3>Flags</h3>" + _table(["flag", "items"], [[k, v] for k, v in run_info.flags.items()]) + "</div>")
    cards.append("<div><h3>Selections</h3>" + _table(
        ["name", "mode", "rows", "eligible", "note"],
        [[s.name, s.mode, s.rows, s.eligible, s.note or ""] for s in run_info.selections]) + "</div>")
    timings = run_info.timings_s
    if timings:
        cards.append("<div><h3>Timings (s)</h3>" + _table(["stage", "seconds"], [[k, v] for k, v in timings.items()
                                                                                 if not k.startswith("score_")]) + "</div>")
    parts.append("<div class=cards>" + "".join(cards) + "</div>")
    diff = run_info.diff
    if diff:
        rows = []
        for key, value in diff.items():
            rows.append([key, json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value])
        parts.append("<h2>Since the previous run</h2>" + _table(["what", "value"], rows))
    thresholds = [(key, evidence) for summary in run_info.scores.values()
                  for key, evidence in (summary.get("thresholds") or {}).items()]
    if thresholds:
        rows = []
        for key, evidence in thresholds:
            counts = evidence.get("flagged_at") or evidence.get("pairs_at") or {}
            rows.append([f"scores.{key}", evidence["value"],
                         ", ".join(f"{v}: {n}" for v, n in counts.items())])
        parts.append("<h2>Thresholds</h2><p class=note>what each threshold would flag at nearby values "
                     "(items; pairs for the copy threshold)</p>"
                     + _table(["key", "value", "flagged at"], rows))
    drift = run_info.drift
    if drift:
        parts.append("<h2>Drift</h2>")
        if drift.get("skipped"):
            parts.append(f"<p class=note>not compared: {html.escape(drift['skipped'])}</p>")
        else:
            state = "ALARM: " + "; ".join(drift["rules_fired"]) if drift.get("alarm") else "no alarm"
            parts.append(f"<p class={'warn' if drift.get('alarm') else 'note'}>{html.escape(state)}</p>")
            mmd, regions = drift.get("mmd") or {}, drift.get("new_regions") or {}
            rows = [["label share change (total variation)", (drift.get("classes") or {}).get("tv")],
                    ["cluster share change on the previous centroids (total variation)",
                     (drift.get("clusters") or {}).get("tv")],
                    ["two-sample test (MMD) p-value", mmd.get("p_value")],
                    ["new items", regions.get("new_items")],
                    ["new items far from everything before", regions.get("far_items")],
                    ["new items whose neighbours are new beyond chance", regions.get("crowded_items")],
                    ["new regions (3 items or more)", regions.get("region_count", 0)]]
            parts.append(_table(["what", "value"], rows))
    return parts


def render_report(*, run_id: str, samples: pa.Table, run_info: RunInfo, selections: dict[str, pa.Table],
                  modes: dict[str, str] | None = None, galleries: list[Gallery] | None = None,
                  thumbnails: dict[str, str] | None = None, scores_config=None, objects: pa.Table | None = None) -> str:
    """The whole page as one HTML string (scripts, data and thumbnails inlined)."""
    from bokeh.embed import components
    from bokeh.resources import Resources

    modes = modes or {}
    thumbnails = thumbnails or {}
    masks = highlight_masks(samples, selections, modes)
    names = list(masks)
    parts = ["<!doctype html><html><head><meta charset=utf-8>",
             f"<title>curation report {html.escape(run_id)}</title>",
             Resources(mode="inline", components=BOKEH_COMPONENTS).render_js(),
             f"<style>{CSS}</style></head><body>"]
    parts += _header(run_id, samples, run_info)

    plots = {}
    has_map = "x" in samples.column_names and bool(pc.any(pc.is_valid(samples["x"])).as_py())
    legends = {}
    if has_map:
        data, legends = map_source_data(samples, masks, thumbnails)
        plots["map"] = _map_figure(data)
    box_legend = None
    if objects is not None and "x" in objects.column_names and bool(pc.any(pc.is_valid(objects["x"])).as_py()):
        box_data, box_legend = box_map_source_data(objects, thumbnails)
        plots["box_map"] = _box_map_figure(box_data)
    distribution = _class_distribution(samples, selections)
    if distribution is not None:
        plots["classes"] = distribution
    clusters = _cluster_sizes(samples)
    if clusters is not None:
        plots["clusters"] = clusters
    sparseness = _column(samples, "sparseness")
    tail = float(np.nanquantile(sparseness, scores_config.rare_tail_quantile)) if (
        scores_config is not None and np.isfinite(sparseness).any()) else None
    plots["sparseness"] = _histogram("Sparseness (k-th neighbour distance)", sparseness, tail,
                                     "rare tail" if tail is not None else "")
    quality = _column(samples, "label_quality")
    if np.isfinite(quality).any():
        plots["label_quality"] = _histogram("Label quality", quality,
                                            scores_config.label_quality_threshold if scores_config else None,
                                            "mislabel threshold")
    script, divs = components(plots)
    parts.append(script)

    parts.append("<h2>Embedding map</h2>")
    map_info = run_info.map
    if has_map:
        options = "".join(f'<option value="{v}">{html.escape(t)}</option>' for v, t in
                          [("class", "class"), ("cluster", "cluster")] + [(f"h{j}", n) for j, n in enumerate(names)])
        boxes = "".join(f'<label><input type=checkbox value="h{j}"> {html.escape(n)} ({int(masks[n].sum())})</label>'
                        for j, n in enumerate(names))
        parts.append(f'<p class=note>{html.escape(str(map_info.get("method", "")))} of the embeddings; '
                     f'{int(pc.sum(pc.is_valid(samples["x"]).cast(pa.int64())).as_py())} of {samples.num_rows} items '
                     "plotted (every flagged item and review-selection member, the rest stratified by label). "
                     "Hover for the image, click for details, scroll to zoom.</p>")
        parts.append(f'<div id=controls>colour by <select id=colour_by>{options}</select><br>highlight: {boxes}</div>')
        parts.append(f'<div class=maprow>{divs["map"]}<div><div id=legend></div><h3>Selected item</h3>'
                     '<div id=detail class=note>click a point</div></div></div>')
        parts.append("<script>" + SCRIPT % {"legends": json.dumps(legends).replace("</", "<\\/"),
                                              "on": json.dumps(HIGHLIGHT_ON), "off": json.dumps(HIGHLIGHT_OFF)}
                     + "</script>")
    else:
        parts.append("<p>No map: no item has coordinates (report.map_points is 0, or no usable item).</p>")

    if box_legend is not None:
        plotted = int(pc.sum(pc.is_valid(objects["x"]).cast(pa.int64())).as_py())
        parts.append("<h2>Box map</h2>")
        parts.append(f'<p class=note>{html.escape(str((run_info.objects or {}).get("map", {}).get("method", "")))} of the '
                     f"boxes' crop vectors; {plotted} boxes plotted (every flagged box, ringed, the rest stratified "
                     "by class), coloured by class. Hover for the crop.</p>")
        parts.append(f'<div class=maprow>{divs["box_map"]}<div id=box_legend>{box_legend}</div></div>')
    parts.append("<h2>Charts</h2>")
    for key in ("classes", "clusters"):
        if key in divs:
            parts.append(divs[key])
    parts.append("<div class=cards>" + "".join(divs[k] for k in ("sparseness", "label_quality") if k in divs) + "</div>")

    if galleries:
        parts.append("<h2>Galleries</h2>")
        parts += [_gallery_html(g, thumbnails) for g in galleries]
    embedder = run_info.embedder
    parts.append("<h2>Embedder</h2>" + _table(["key", "value"], [[k, v] for k, v in embedder.items()]))
    parts.append("</body></html>")
    return "".join(parts)
