"""The run report: what the map and galleries are built from, and the page itself in a real Chromium."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.config import ReportConfig, load_config
from curation.demo import demo_config
from curation.report import thumbnail_order
from curation.report.galleries import choose_galleries
from curation.report.map import choose_map_rows, map_coordinates, must_show
from curation.report.thumbnails import make_thumbnail

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
EVIL_LABEL = "<img src=x onerror=window.pwned=1>"


# ------------------------------------------------------------------ which items the map shows


def test_map_sample_keeps_every_flagged_item_and_stratifies_the_rest():
    n = 10_000
    rng = np.random.default_rng(1)
    codes = np.where(rng.random(n) < 0.02, 1, 0)  # a 2% class
    ok = rng.random(n) > 0.05
    must = np.zeros(n, bool)
    must[rng.choice(n, 300, replace=False)] = True
    rows = choose_map_rows(ok, must, codes, 1000)
    assert len(rows) == 1000 and len(np.unique(rows)) == 1000 and ok[rows].all()
    assert set(np.flatnonzero(ok & must)) <= set(rows)  # every flagged ok item is plotted
    rest = np.setdiff1d(rows, np.flatnonzero(must))
    share = (codes[rest] == 1).mean()
    assert 0.01 <= share <= 0.03  # the small class keeps its share of the sampled rest
    # More flagged items than room: a subset of them, nothing else.
    many = ok.copy()
    rows = choose_map_rows(ok, many, codes, 500)
    assert len(rows) == 500 and many[rows].all()
    # Fewer ok items than room: all of them; no room: none.
    assert len(choose_map_rows(ok, must, codes, n)) == ok.sum()
    assert len(choose_map_rows(ok, must, codes, 0)) == 0
    # A stratum smaller than its rounded quota still gets an item.
    tiny = np.zeros(n, np.int64)
    tiny[:3] = 7
    assert (tiny[choose_map_rows(np.ones(n, bool), np.zeros(n, bool), tiny, 50)] == 7).any()


def _scored_table(n: int = 400, *, seed: int = 0) -> tuple[pa.Table, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.array(["a", "b", "c", "d"])[rng.integers(0, 4, n)]
    status = np.where(rng.random(n) < 0.03, "rejected", "ok")
    ok = status == "ok"
    dup_group = np.full(n, np.nan)
    dup_of = np.full(n, None, object)
    for g, start in enumerate(range(0, 40, 4)):  # ten groups of four, first kept
        members = [i for i in range(start, start + 4) if ok[i]]
        dup_group[members] = g
        for m in members[1:]:
            dup_of[m] = f"img/{members[0]}.jpg"
    table = pa.table({
        "uri": [f"img/{i}.jpg" for i in range(n)], "label": labels, "status": status,
        "reason": [None if s == "ok" else "corrupt: truncated" for s in status],
        "is_dark": ok & (rng.random(n) < 0.03), "is_bright": ok & (rng.random(n) < 0.03),
        "is_blurry": ok & (rng.random(n) < 0.03), "is_low_information": ok & (rng.random(n) < 0.02),
        "highlights": rng.random(n), "shadows": rng.random(n), "sharpness": rng.random(n), "contrast": rng.random(n),
        "dup_group": pa.array(dup_group, pa.int64(), from_pandas=True), "dup_of": pa.array(dup_of, pa.string()),
        "dup_kind": ["near"] * n, "is_suspected_mislabel": ok & (rng.random(n) < 0.05),
        "label_quality": rng.random(n).astype(np.float32), "suggested_label": labels[::-1],
        "sparseness": rng.random(n).astype(np.float32), "cluster": rng.integers(0, 6, n).astype(np.int32),
    })
    vectors = rng.normal(size=(int(ok.sum()), 24)).astype(np.float32)
    return table, vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _selections(samples: pa.Table):
    from curation.schema import SELECTION_SCHEMA

    ok_uris = [u for u, s in zip(samples["uri"].to_pylist(), samples["status"].to_pylist()) if s == "ok"]
    edge = pa.table({"uri": ok_uris[-15:], "label": ["a"] * 15, "rank": pa.array(range(1, 16), pa.int32()),
                     "score": pa.array(np.linspace(1, 0.5, 15), pa.float32()), "reason": ["rare"] * 15},
                    schema=SELECTION_SCHEMA)
    return {"edge_cases": edge}, {"edge_cases": "edge_cases"}


def test_map_coordinates_cover_flagged_items_and_review_members_within_the_cap():
    samples, vectors = _scored_table()
    tables, modes = _selections(samples)
    must = must_show(samples, tables, modes)
    with_map, info = map_coordinates(samples, vectors, tables, modes, ReportConfig(map_method="pca", map_points=150))
    plotted = with_map["x"].is_valid().to_numpy(zero_copy_only=False)
    ok = np.array(with_map["status"].to_pylist()) == "ok"
    assert plotted.sum() == 150 == info["points"] and not plotted[~ok].any()
    assert plotted[must & ok].all()
    assert set(with_map["uri"].filter(pa.array(must & ok)).to_pylist()) >= set(tables["edge_cases"]["uri"].to_pylist())
    # UMAP (the default) gives the same rows coordinates, and the same ones on a second run.
    umap1, info1 = map_coordinates(samples, vectors, tables, modes, ReportConfig(map_points=150))
    umap2, _ = map_coordinates(samples, vectors, tables, modes, ReportConfig(map_points=150))
    assert info1["method"].startswith("UMAP")
    assert np.array_equal(umap1["x"].is_valid().to_numpy(zero_copy_only=False), plotted)
    assert umap1["x"].equals(umap2["x"]) and umap1["y"].equals(umap2["y"])


def test_gallery_members_match_the_samples_table():
    samples, _ = _scored_table()
    tables, modes = _selections(samples)
    galleries = {g.key: g for g in choose_galleries(samples, tables, modes, size=12)}
    rows = {r["uri"]: r for r in samples.to_pylist()}
    mislabels = galleries["mislabels"]
    assert mislabels.total == sum(r["is_suspected_mislabel"] for r in rows.values())
    quality = [rows[u]["label_quality"] for u in mislabels.uris]
    assert all(rows[u]["is_suspected_mislabel"] for u in mislabels.uris) and quality == sorted(quality)
    assert mislabels.uris and len(mislabels.uris) <= 12
    assert galleries["edge-edge_cases"].uris == tables["edge_cases"]["uri"].to_pylist()[:12]
    for column in ("is_dark", "is_bright", "is_blurry", "is_low_information"):
        gallery = galleries[f"junk-{column}"]
        assert gallery.uris and all(rows[u][column] for u in gallery.uris)
        assert gallery.total == sum(bool(r[column]) for r in rows.values())
    duplicates = galleries["duplicates"]
    for group in duplicates.groups:
        assert group[0].badge == "kept" and rows[group[0].uri]["dup_of"] is None
        assert len({rows[i.uri]["dup_group"] for i in group}) == 1
        assert all(rows[i.uri]["dup_of"] == group[0].uri and i.badge is None for i in group[1:])
    assert all(rows[u]["status"] == "rejected" for u in galleries["rejected"].uris)
    # Thumbnails: gallery members first (rejected files have no image to show), capped.
    order = thumbnail_order(samples, list(galleries.values()), {}, 30)
    assert len(order) == 30 and order[:12] == mislabels.uris
    assert not set(order) & set(galleries["rejected"].uris)


def test_thumbnail_is_small_and_keeps_the_aspect():
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (640, 320), (200, 30, 30)).save(buffer, "JPEG")
    thumb = make_thumbnail(buffer.getvalue(), 64, max_pixels=10**8)
    image = Image.open(io.BytesIO(thumb))
    assert image.format == "WEBP" and image.size == (64, 32) and len(thumb) < 2000
    with pytest.raises(ValueError):
        make_thumbnail(buffer.getvalue(), 64, max_pixels=1000)


# ------------------------------------------------------------------ the page in a real browser


def _need_chromium() -> None:
    """Before any work: without a browser there is nothing to open the page in."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: `make test` installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (`make test` installs it)")


@pytest.fixture(scope="module")
def report_run(ray_local, demo_set, tmp_path_factory):
    """A real run whose labels file carries markup as a label."""
    from curation.job import run_job

    _need_chromium()
    root, _ = demo_set
    data = tmp_path_factory.mktemp("report-set")
    shutil.copytree(os.path.join(root, "images"), data / "images")
    lines = open(os.path.join(root, "labels.csv"), encoding="utf-8").read().splitlines()
    # Five items (a class big enough to be scored: smaller ones are held out of the label
    # scores) carry markup as their label; their neighbours disagree, so they are flagged and
    # the page shows the label in their captions.
    for i in range(1, 6):
        path, _ = lines[i].split(",", 1)
        lines[i] = f'{path},"{EVIL_LABEL}"'
    (data / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = str(tmp_path_factory.mktemp("report-out"))
    config_data = demo_config(str(data), out, budget=60)
    config_data["selections"][1]["budget"] = 10
    config_data["selections"][2]["budget"] = 40
    result = run_job(load_config(data=config_data))
    return result, os.path.join(result.run_uri, "report.html")


def _launch(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=[
        "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-quic"])


def test_report_renders_map_and_galleries_in_chromium_offline(report_run, tmp_path):
    from playwright.sync_api import sync_playwright

    result, page_path = report_run
    samples = pq.read_table(os.path.join(result.run_uri, "samples"))
    plotted = int(samples["x"].is_valid().to_numpy(zero_copy_only=False).sum())
    assert plotted == result.run_info["map"]["points"] > 0
    with sync_playwright() as playwright:
        browser = _launch(playwright)
        context = browser.new_context(user_agent="curation-report-test", viewport={"width": 1300, "height": 1000})
        outside: list[str] = []
        context.route(lambda url: not url.startswith(("file:", "data:")),
                      lambda route: (outside.append(route.request.url), route.abort()))
        page = context.new_page()
        problems: list[str] = []
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.goto("file://" + page_path)
        page.wait_for_function("window.curationMapReady === true", timeout=60_000)
        points = page.evaluate("Bokeh.documents[0].get_model_by_name('map_points').data.x.length")
        # Bokeh draws inside shadow roots: Playwright's locators pierce them, querySelectorAll does not.
        canvas = page.locator("canvas").evaluate_all("cs => Math.max(...cs.map(c => c.width * c.height))")
        images = page.evaluate("[...document.querySelectorAll('.gallery img')].map(i => i.naturalWidth)")
        # Drive the controls: colour by a flag, highlight it, click a point.
        page.select_option("#colour_by", "h2")
        page.check("#controls input[value=h2]")
        box = page.locator(".bk-events").first.bounding_box()
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.screenshot(path=str(tmp_path / "report.png"))
        text = page.evaluate("document.body.innerText")
        pwned = page.evaluate("window.pwned === undefined")
        browser.close()
    assert points == plotted
    assert canvas > 100_000  # the map's canvas was laid out at full size
    assert len(images) > 20 and all(w > 0 for w in images)  # every gallery image decoded
    assert not problems, problems
    assert not outside, outside  # the page loads nothing from anywhere
    assert pwned and EVIL_LABEL in text  # markup in a label renders as text, never runs


def test_a_flag_declared_by_a_score_reaches_selections_map_and_galleries(monkeypatch):
    """Flags are declared once (``Score.flags``): a new junk flag needs no edit elsewhere."""
    from curation import scores
    from curation.config import ScoresConfig
    from curation.report.map import highlight_masks
    from curation.scores.base import Flag
    from curation.select_view import SampleView

    samples, vectors = _scored_table()
    smudged = np.zeros(samples.num_rows, bool)
    smudged[[5, 50, 60]] = True
    smudged &= np.array(samples["status"].to_pylist()) == "ok"
    samples = samples.append_column("is_smudged", pa.array(smudged))
    class Smudged:  # a score registered with one junk flag (its compute is not run here)
        name, columns, needs = "smudged", ("is_smudged",), ()
        flags = (Flag("is_smudged", "junk", "Junk: smudged", "contrast", True, ("smudge_threshold",)),)

    monkeypatch.setattr(scores, "REGISTRY", scores.REGISTRY + (Smudged(),))
    view = SampleView(samples, ScoresConfig(), vectors)
    assert view.junk[smudged].all()
    assert highlight_masks(samples, {}, {})["junk"][smudged].all()
    galleries = {g.key: g for g in choose_galleries(samples, {}, {}, size=12)}
    assert set(galleries["junk-is_smudged"].uris) == set(samples["uri"].filter(pa.array(smudged)).to_pylist())


def test_copies_across_splits_have_their_own_gallery_of_pairs():
    from curation.leakage import LEAKAGE_SCHEMA
    from curation.report.galleries import choose_galleries

    samples, _ = _scored_table(60)
    uris = samples["uri"].to_pylist()
    leakage = pa.table({"uri_a": uris[:3], "split_a": ["train"] * 3, "uri_b": uris[3:6], "split_b": ["val"] * 3,
                        "kind": ["exact", "near", "near"], "similarity": pa.array([1.0, 0.93, 0.97], pa.float32())},
                       schema=LEAKAGE_SCHEMA)
    galleries = {g.key: g for g in choose_galleries(samples, {}, {}, size=10, leakage=leakage)}
    gallery = galleries["leakage"]
    assert gallery.total == 3 and gallery.grouped
    assert [[item.uri for item in pair] for pair in gallery.groups] == [[uris[0], uris[3]], [uris[2], uris[5]],
                                                                       [uris[1], uris[4]]]  # most similar first
    assert [item.badge for item in gallery.groups[0]] == ["train", "val"]
    assert "leakage" not in {g.key for g in choose_galleries(samples, {}, {}, size=10)}
