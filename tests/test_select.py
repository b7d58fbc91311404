"""Selection modes and options on a scored synthetic table."""

from __future__ import annotations

import numpy as np
import pytest

from curation.config import ConfigError, ScoresConfig, SelectionConfig
from curation.index.knn import exact_knn
from curation.scores import run_scores
from curation.select import build_selections
from curation.select_view import allocate
from tests.test_scores import make_samples, unit


@pytest.fixture(scope="module")
def scored():
    # Three classes of unequal size (60 / 30 / 10), each its own blob, plus defects.
    sizes = {"a": 60, "b": 30, "c": 10}
    rng = np.random.default_rng(11)
    centers = rng.normal(size=(3, 16))
    emb = np.concatenate([centers[i] + 0.35 * rng.normal(size=(n, 16)) for i, n in enumerate(sizes.values())])
    labels = [c for c, n in sizes.items() for _ in range(n)]
    n = len(labels)
    brightness = np.full(n, 0.5)
    brightness[[0, 1]] = 0.02  # dark
    contrast = np.full(n, 0.2)
    contrast[[0, 1]] = 0.01
    labels[5] = "b"  # flipped
    content = [f"c{i}" for i in range(n)]
    content[7] = content[8]  # exact duplicates
    import pyarrow as pa
    samples = make_samples(n, labels=labels, brightness=brightness, contrast=contrast, content=content)
    samples = samples.append_column("site", pa.array(["north" if i % 4 == 0 else "south" for i in range(n)]))
    emb_ok = unit(emb)
    knn = exact_knn(emb_ok, 8)
    table, _ = run_scores(samples, emb_ok, knn, ScoresConfig())
    return table, knn, emb_ok


def select(scored, **kw):
    table, knn, emb = scored
    kw.setdefault("name", "s")
    return build_selections(table, ScoresConfig(), [SelectionConfig(**kw)], emb)[0]


def test_allocate_water_fills():
    assert allocate(10, np.array([100, 100]), np.array([1.0, 1.0])).tolist() == [5, 5]
    assert allocate(10, np.array([2, 100]), np.array([1.0, 1.0])).tolist() == [2, 8]
    assert allocate(1000, np.array([2, 3]), np.array([1.0, 1.0])).tolist() == [2, 3]
    assert allocate(7, np.array([10, 10, 10]), np.array([1.0, 1.0, 1.0])).sum() == 7


def test_representative_uniform_balances_classes_and_excludes_defects(scored):
    result = select(scored, mode="representative", budget=24, class_balance="uniform")
    labels = result.table["label"].to_pylist()
    assert len(labels) == 24 and {labels.count(c) for c in "abc"} == {8}
    uris = set(result.table["uri"].to_pylist())
    assert not uris & {"/d/000.jpg", "/d/001.jpg", "/d/005.jpg"}  # dark, dark, flipped
    assert not ({"/d/007.jpg", "/d/008.jpg"} <= uris)  # never both copies
    assert len(set(labels[:3])) == 3  # ranks interleave classes
    assert len(uris) == 24  # coverage picks are distinct items


def test_representative_proportional_and_tempered(scored):
    prop = select(scored, mode="representative", budget=20, class_balance="proportional").table["label"].to_pylist()
    assert prop.count("a") > prop.count("b") > prop.count("c")
    tempered = select(scored, mode="representative", budget=20, class_balance="tempered:0.5").table["label"].to_pylist()
    assert prop.count("a") > tempered.count("a") > tempered.count("c") >= prop.count("c")


def test_representative_covers_every_mode_of_a_class(scored):
    """Within a class, coverage picks spread over its modes instead of piling into the densest."""
    import numpy as np

    table, knn, emb = scored
    rng = np.random.default_rng(0)
    # class "a" = two far-apart modes of 30 items each; a budget of 4 for "a" must touch both
    modes = np.concatenate([np.tile(emb[0], (30, 1)), np.tile(-emb[0], (30, 1))]) + 0.05 * rng.normal(size=(60, emb.shape[1]))
    from tests.test_scores import unit
    emb2 = emb.copy()
    emb2[:60] = unit(modes)
    from curation.select_modes import cover
    from curation.select_view import SampleView
    view = SampleView(table, ScoresConfig(), emb2, set(table.column_names))
    eligible = np.arange(20, 60)  # 10 items of the first mode, 30 of the second
    picks = [r for r, _ in cover(view, eligible, 4)]
    assert len(set(picks)) == 4
    assert any(r < 30 for r in picks) and any(r >= 30 for r in picks)


def test_large_classes_are_covered_region_by_region(scored, monkeypatch):
    """Above COVER_WORK the class is split into k-means regions sharing the quota by size: the
    quota is still met with distinct items, and a far-away small mode still gets a pick."""
    import numpy as np

    import curation.select_modes as select_module
    from curation.select_modes import cover
    from curation.select_view import SampleView
    from tests.test_scores import unit

    table, knn, emb = scored
    rng = np.random.default_rng(1)
    base = np.tile(emb[0], (60, 1))
    base[50:] = -emb[0]  # a small far-away mode of 10 items
    emb2 = emb.copy()
    emb2[:60] = unit(base + 0.05 * rng.normal(size=base.shape))
    monkeypatch.setattr(select_module, "COVER_WORK", 1.0)  # forces one region per pick
    picks = cover(SampleView(table, ScoresConfig(), emb2, set(table.column_names)), np.arange(60), 6)
    rows = [r for r, _ in picks]
    assert len(rows) == len(set(rows)) == 6
    assert any(r >= 50 for r in rows) and any(r < 50 for r in rows)


def test_budget_above_eligible_returns_eligible_and_says_so(scored):
    result = select(scored, mode="representative", budget=10_000)
    assert result.table.num_rows == result.eligible < 100 and "exceeds" in result.note


def test_edge_cases_are_rarest_first(scored):
    table, _, _ = scored
    result = select(scored, mode="edge_cases", budget=5)
    scores = result.table["score"].to_pylist()
    assert scores == sorted(scores, reverse=True)
    sparse = dict(zip(table["uri"].to_pylist(), table["sparseness"].to_pylist()))
    assert scores[0] == pytest.approx(max(v for u, v in sparse.items() if u not in ("/d/000.jpg", "/d/001.jpg", "/d/005.jpg")), abs=1e-6)


def test_label_review_puts_the_flip_first(scored):
    result = select(scored, mode="label_review", budget=3)
    assert result.table["uri"][0].as_py() == "/d/005.jpg"
    assert "suggested 'a'" in result.table["reason"][0].as_py()
    quality = result.table["score"].to_pylist()
    assert quality == sorted(quality)


def test_clean_excludes_junk_and_non_kept_duplicates(scored):
    result = select(scored, mode="clean")
    uris = set(result.table["uri"].to_pylist())
    assert "/d/000.jpg" not in uris and len({"/d/007.jpg", "/d/008.jpg"} & uris) == 1
    table, _, _ = scored
    df = table.to_pandas()
    expected = df[(df.status == "ok") & ~df.is_dark & ~df.is_bright & ~df.is_blurry & ~df.is_low_information
                  & df.dup_of.isna()]
    assert result.table.num_rows == len(expected) > 50
    assert set(expected.uri) == uris


def test_where_and_balance_on(scored):
    only_b = select(scored, mode="clean", where="label == 'b' and brightness > 0.1")
    assert set(only_b.table["label"].to_pylist()) == {"b"}
    by_site = select(scored, mode="representative", budget=10, balance_on="site")
    table, _, _ = scored
    site = dict(zip(table["uri"].to_pylist(), table["site"].to_pylist()))
    picked = [site[u] for u in by_site.table["uri"].to_pylist()]
    assert picked.count("north") == picked.count("south") == 5
    interleaved = select(scored, mode="edge_cases", budget=6, balance_on="site")
    picked = [site[u] for u in interleaved.table["uri"].to_pylist()]
    assert picked[0] != picked[1]


def test_bad_where_and_balance_on_are_config_errors(scored):
    with pytest.raises(ConfigError, match="where"):
        select(scored, mode="clean", where="no_such_column > 1")
    with pytest.raises(ConfigError, match="balance_on: no column 'nope'"):
        select(scored, mode="representative", budget=5, balance_on="nope")


def test_balance_stats_per_column_and_selection():
    import pyarrow as pa

    from curation.balance import MAX_VALUES, balance_stats

    n = 12
    samples = pa.table({
        "uri": [f"u{i}" for i in range(n)], "label": ["a"] * 8 + ["b"] * 4,
        "status": ["ok"] * 11 + ["rejected"], "site": ["x", "y"] * 6,
        "frame_id": [f"f{i % 4}" for i in range(n)],
        "sparseness": np.zeros(n, np.float32),
    })
    picked = pa.table({"uri": ["u0", "u1", "u2"]})  # all labelled "a"
    stats = balance_stats(samples, {"train": picked}, score_columns={"sparseness"})
    assert set(stats) == {"label", "site", "frame_id"}  # score columns are not metadata
    assert stats["label"]["ok"]["counts"] == {"a": 8, "b": 3}  # the rejected row does not count
    assert stats["label"]["ok"]["max_min_ratio"] == pytest.approx(8 / 3, abs=1e-3)
    assert stats["label"]["selections"]["train"]["missing"] == ["b"]
    assert stats["label"]["selections"]["train"]["max_min_ratio"] is None
    assert stats["site"]["selections"]["train"]["counts"] == {"x": 2, "y": 1}
    assert 0 < stats["site"]["ok"]["normalized_entropy"] <= 1

    wide = samples.append_column("serial", pa.array([f"s{i}" for i in range(n)]))
    many = pa.concat_tables([wide] * (MAX_VALUES // n + 1)).set_column(
        wide.column_names.index("serial"), "serial", pa.array([f"s{i}" for i in range(n * (MAX_VALUES // n + 1))]))
    assert "skipped" in balance_stats(many, {}, score_columns={"sparseness"})["serial"]


@pytest.mark.parametrize("expression", [
    "label.to_csv('/tmp/curation-where-pwned.csv')",
    "@pd.io.common",
    "__import__('os').system('touch /tmp/curation-where-pwned.csv')",
    "label.__class__",
    "label.str.cat(label)",
])
def test_where_cannot_run_code(scored, expression):
    import os

    with pytest.raises(ConfigError, match="where"):
        select(scored, mode="clean", where=expression)
    assert not os.path.exists("/tmp/curation-where-pwned.csv")


def test_where_allows_string_and_null_tests(scored):
    picked = select(scored, mode="clean", where="label.str.startswith('a') and label.notna() and `brightness` > 0.1")
    assert set(picked.table["label"].to_pylist()) == {"a"}


def test_representative_beats_random_subsets_on_a_mixture():
    """Each class is one large mode and four small ones; a test set drawn from every mode
    evenly. A class-balanced selection of 5% of the pool must classify it better (1-NN) than
    random subsets of the same size, which mostly miss the small modes."""
    rng = np.random.default_rng(21)
    classes, dim = 4, 12
    modes = rng.normal(size=(classes, 5, dim)) * 2.0
    sizes = [400, 10, 10, 10, 10]  # per mode
    x, y, mode_of = [], [], []
    for c in range(classes):
        for m, size in enumerate(sizes):
            x.append(modes[c, m] + 0.45 * rng.normal(size=(size, dim)))
            y += [c] * size
            mode_of += [m] * size
    x, y = unit(np.concatenate(x)), np.array(y)
    test_x = unit(np.concatenate([modes[c, m] + 0.45 * rng.normal(size=(20, dim))
                                  for c in range(classes) for m in range(5)]))
    test_y = np.repeat(np.arange(classes), 5 * 20)
    samples = make_samples(len(y), labels=[str(v) for v in y])
    table, _ = run_scores(samples, x, exact_knn(x, 10), ScoresConfig())
    budget = 24 * classes
    picked = build_selections(table, ScoresConfig(), [SelectionConfig(name="t", mode="representative", budget=budget)],
                              x)[0].table["uri"].to_pylist()
    picked = np.array([int(u.split("/")[-1].split(".")[0]) for u in picked])

    def accuracy(idx):
        nearest = np.argmax(test_x @ x[idx].T, axis=1)
        return float((y[idx][nearest] == test_y).mean())

    random_accuracy = np.mean([accuracy(rng.choice(len(y), budget, replace=False)) for _ in range(20)])
    assert len(picked) == budget
    assert accuracy(picked) > random_accuracy + 0.05, (accuracy(picked), random_accuracy)
    assert len(set(np.array(mode_of)[picked].tolist())) == 5  # every mode reached


def _to_label_set(labelled_blobs=(0,), *, seed=3, copy_of_labelled=True):
    """Four blobs of 25; only ``labelled_blobs`` carry labels (their first 10 items). Item 99 is a
    near copy of labelled item 0 (when ``copy_of_labelled``), item 98 is dark."""

    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(4, 16))
    emb = np.concatenate([centers[b] + 0.3 * rng.normal(size=(25, 16)) for b in range(4)])
    if copy_of_labelled:
        emb[99] = emb[0] + 1e-4
    labels = [f"class{b}" if b in labelled_blobs and i < 10 else None for b in range(4) for i in range(25)]
    brightness = np.full(100, 0.5)
    brightness[98] = 0.02
    contrast = np.full(100, 0.2)
    contrast[98] = 0.01
    samples = make_samples(100, labels=labels, brightness=brightness, contrast=contrast)
    emb_ok = unit(emb)
    table, _ = run_scores(samples, emb_ok, exact_knn(emb_ok, 8), ScoresConfig())
    return table, emb_ok


def _to_label(table, emb, previous=None, **kw):
    sel = SelectionConfig(name="queue", mode="to_label", **kw)
    return build_selections(table, ScoresConfig(), [sel], emb, previous=previous)[0]


def test_to_label_picks_unlabelled_items_where_no_label_is_yet():
    table, emb = _to_label_set(labelled_blobs=(0,))
    result = _to_label(table, emb, budget=6)
    blobs = [int(u[3:6]) // 25 for u in result.table["uri"].to_pylist()]
    assert set(blobs) == {1, 2, 3}  # every blob no label covers yet, none from the labelled blob 0
    assert result.table["label"].null_count == 6
    assert all("no labelled item yet" in r for r in result.table["reason"].to_pylist())
    assert result.pending == 0


def test_to_label_never_buys_junk_a_copy_of_a_labelled_item_or_the_rare_tail():
    table, emb = _to_label_set(labelled_blobs=(0,))
    df = table.to_pandas()
    assert df.dup_group[99] == df.dup_group[0]  # the unlabelled copy of a labelled item ...
    assert pd_isna(df.dup_of[99]) or df.dup_of[99] == "/d/000.jpg"
    uris = set(_to_label(table, emb, budget=100).table["uri"].to_pylist())
    assert "/d/099.jpg" not in uris and "/d/098.jpg" not in uris  # ... and the dark item are never picked
    assert not uris & {f"/d/{i:03d}.jpg" for i in range(10)}  # labelled
    rare = set(df.uri[df.sparseness > ScoresConfig().rare_tail_quantile]) - {"/d/098.jpg", "/d/099.jpg"}
    assert rare and not uris & rare
    assert rare <= set(_to_label(table, emb, budget=100, include_rare=True).table["uri"].to_pylist())


def test_to_label_works_with_no_labels_and_keeps_the_previous_queue_at_its_head():
    import pyarrow as pa

    table, emb = _to_label_set(labelled_blobs=(), copy_of_labelled=False)
    first = _to_label(table, emb, budget=8)
    assert first.table.num_rows == 8 and len({int(u[3:6]) // 25 for u in first.table["uri"].to_pylist()}) == 4
    # The next night: items 0-1 of the queue got labels; the rest is still pending.
    queue = first.table.select(["uri", "rank"])
    done = queue["uri"].to_pylist()[:2]
    labels = [("x" if u in done else None) for u in table["uri"].to_pylist()]
    night2 = table.set_column(table.column_names.index("label"), "label", pa.array(labels, pa.string()))
    second = _to_label(night2, emb, previous={"queue": queue}, budget=8)
    uris = second.table["uri"].to_pylist()
    assert second.pending == 6 and uris[:6] == queue["uri"].to_pylist()[2:]  # same order, at the head
    assert all(r.startswith("pending from the previous run") for r in second.table["reason"].to_pylist()[:6])
    assert not set(uris) & set(done) and len(set(uris)) == 8


def pd_isna(value) -> bool:
    import pandas as pd

    return bool(pd.isna(value))


def _validation_set(seed=5):
    """600 items: 4 classes of unequal size (300/150/100/50), two blobs each; 40 planted pairs at
    cosine ~0.9 (close, but not near duplicates); item 0 dark."""
    rng = np.random.default_rng(seed)
    sizes = [300, 150, 100, 50]
    centers = rng.normal(size=(8, 32))
    emb, labels = [], []
    for c, n in enumerate(sizes):
        for i in range(n):
            emb.append(centers[2 * c + i % 2] + 0.45 * rng.normal(size=32))
            labels.append(f"class{c}")
    emb = unit(np.array(emb))
    partners = rng.choice(np.arange(1, 600), size=(40, 2), replace=False)
    for a, b in partners:
        noise = unit(rng.normal(size=(1, 32)))[0]
        emb[b] = unit((emb[a] + 0.48 * noise)[None])[0]  # cosine ~0.9 to its partner
        labels[b] = labels[a]
    brightness = np.full(600, 0.5)
    brightness[0] = 0.02
    contrast = np.full(600, 0.2)
    contrast[0] = 0.01
    samples = make_samples(600, labels=labels, brightness=brightness, contrast=contrast)
    table, _ = run_scores(samples, emb, exact_knn(emb, 8), ScoresConfig())
    return table, emb


def _selections(table, emb, *sels, previous=None):
    return {r.name: r for r in build_selections(table, ScoresConfig(), [SelectionConfig(**s) for s in sels], emb,
                                                previous=previous)}


def test_validation_mirrors_the_labels_and_clusters_of_the_data():
    table, emb = _validation_set()
    val = _selections(table, emb, {"name": "val", "mode": "validation", "budget": 120})["val"]
    df = table.to_pandas()
    picked = df.set_index("uri").loc[val.table["uri"].to_pylist()]
    assert val.table.num_rows == 120 and "/d/000.jpg" not in set(picked.index)  # the dark item is junk
    eligible = df[(df.status == "ok") & ~df.is_dark & df.dup_of.isna()]
    label_tv = 0.5 * (picked.label.value_counts(normalize=True)
                      .sub(eligible.label.value_counts(normalize=True), fill_value=0).abs().sum())
    clusters = df.cluster.nunique()
    cluster_tv = 0.5 * (picked.cluster.value_counts(normalize=True)
                        .sub(eligible.cluster.value_counts(normalize=True), fill_value=0).abs().sum())
    assert label_tv <= 0.05 and cluster_tv <= max(0.05, clusters / (2 * 120))
    assert val.details["label_tv"] == pytest.approx(label_tv, abs=1e-3)
    assert val.details["cluster_tv"] == pytest.approx(cluster_tv, abs=1e-3)
    frac = _selections(table, emb, {"name": "val", "mode": "validation", "fraction": 0.1})["val"]
    assert frac.table.num_rows == round(0.1 * frac.eligible)


def test_a_selection_disjoint_from_validation_shares_no_copy_or_close_neighbour_with_it():
    table, emb = _validation_set()
    train = {"name": "train", "mode": "clean"}  # every eligible item: whatever validation holds leaks
    leaky = _selections(table, emb, {"name": "val", "mode": "validation", "budget": 120}, train)
    val_rows = leaky["val"].rows
    close = (emb @ emb[leaky["val"].rows].T >= 0.85 - 1e-6).any(axis=1)
    assert close[np.setdiff1d(leaky["train"].rows, val_rows)].any()  # without disjoint_from: neighbours leak
    # Listed after the selection it guards: it is built first all the same.
    result = _selections(table, emb, train, {"name": "val", "mode": "validation", "budget": 120,
                                             "disjoint_from": ["train"], "disjoint_cosine": 0.85})
    val, tr = result["val"], result["train"]
    assert val.table.num_rows == 120 and val.details["leakage"] == {"train": 0}
    close = (emb @ emb[val.rows].T >= 0.85 - 1e-6).any(axis=1)
    assert not close[tr.rows].any() and not set(val.rows) & set(tr.rows)
    groups = table["dup_group"].to_numpy(zero_copy_only=False)
    assert not set(groups[val.rows][~np.isnan(groups[val.rows])]) & set(groups[tr.rows][~np.isnan(groups[tr.rows])])
    assert tr.eligible < leaky["train"].eligible


def test_validation_is_sticky_from_night_to_night():
    table, emb = _validation_set()
    first = _selections(table, emb, {"name": "val", "mode": "validation", "budget": 60})["val"]
    previous = {"val": first.table.select(["uri", "rank"])}
    # Tomorrow asks for more: every member of yesterday's set stays, the rest is stratified anew.
    second = _selections(table, emb, {"name": "val", "mode": "validation", "budget": 90}, previous=previous)["val"]
    uris = second.table["uri"].to_pylist()
    assert set(first.table["uri"].to_pylist()) <= set(uris) and len(set(uris)) == 90
    assert second.details["sticky"] == 60
    assert sum(r.startswith("validation: kept from the previous run") for r in second.table["reason"].to_pylist()) == 60


@pytest.mark.parametrize("selections, message", [
    ([{"name": "a", "mode": "validation", "budget": 5, "disjoint_from": ["b"]},
      {"name": "b", "mode": "validation", "budget": 5, "disjoint_from": ["a"]}], r"a cycle \(a -> b -> a\)"),
    ([{"name": "a", "mode": "validation", "budget": 5, "disjoint_from": ["nope"]}], "'nope' is not another selection"),
    ([{"name": "a", "mode": "validation"}], "budget or fraction"),
    ([{"name": "a", "mode": "validation", "budget": 5, "fraction": 0.1}], "budget or fraction"),
    ([{"name": "a", "mode": "clean", "fraction": 0.1}], "only for mode validation"),
])
def test_validation_config_errors(selections, message, tmp_path):
    from curation.config import load_config

    with pytest.raises(ConfigError, match=message):
        load_config(data={"input": {"images": str(tmp_path)}, "output": {"uri": str(tmp_path / "o")},
                          "selections": selections})
