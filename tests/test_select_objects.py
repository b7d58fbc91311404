"""Image selections of a detection run (issue 37): an image is labelled when the annotations list
it (zero boxes included), ``to_label`` picks among the images they do not list, and
``validation`` stratifies over the images' box classes so that the held-out boxes mirror the
data's."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from curation.config import ConfigError, ScoresConfig, SelectionConfig
from curation.select import build_selections
from tests.test_select import _validation_set

UNLISTED = range(500, 600)  # images the annotations do not list
LISTED_EMPTY = range(480, 500)  # listed with no boxes


def _detection_set(seed=7):
    """The validation set of tests/test_select.py as a detection run: no image labels; each
    listed image holds 1-4 boxes, most of its own class (its old label) and some of another."""
    table, emb = _validation_set()
    rng = np.random.default_rng(seed)
    own = table["label"].to_pylist()
    names = sorted(set(own))
    uris, labels, counts = [], [], []
    for i, uri in enumerate(table["uri"].to_pylist()):
        if i in UNLISTED:
            counts.append(None)
            continue
        k = 0 if i in LISTED_EMPTY else int(rng.integers(1, 5))
        counts.append(k)
        for j in range(k):
            uris.append(uri)
            labels.append(own[i] if j == 0 or rng.random() < 0.6 else names[int(rng.integers(len(names)))])
    objects = pa.table({"uri": uris, "label": labels, "source": ["annotation"] * len(uris),
                        "status": ["ok"] * len(uris)})
    table = table.set_column(table.column_names.index("label"), "label", pa.nulls(table.num_rows, pa.string()))
    table = table.append_column("object_count", pa.array(counts, pa.int32()))
    return table, emb, objects


def _select(table, emb, objects, **kw):
    return build_selections(table, ScoresConfig(), [SelectionConfig(name="s", **kw)], emb, objects=objects)[0]


def test_to_label_picks_only_images_the_annotations_do_not_list():
    table, emb, objects = _detection_set()
    picked = _select(table, emb, objects, mode="to_label", budget=40)
    rows = [int(u[3:6]) for u in picked.table["uri"].to_pylist()]
    assert len(rows) == 40 and set(rows) <= set(UNLISTED)  # never an annotated or a listed-empty image
    everything = _select(table, emb, objects, mode="to_label", budget=600)
    assert {int(u[3:6]) for u in everything.table["uri"].to_pylist()} <= set(UNLISTED)
    with pytest.raises(ConfigError, match="to_label"):
        _select(table, emb, objects, mode="to_label", budget=10, balance_on="object_label")


def test_validation_of_a_detection_run_mirrors_the_box_classes():
    table, emb, objects = _detection_set()
    val = _select(table, emb, objects, mode="validation", budget=120)
    details = val.details
    assert "object_label_tv" in details and details["object_label_tv"] <= 0.05
    # the held-out images' boxes, class by class, against the data's boxes
    chosen = set(val.table["uri"].to_pylist())
    mine = [label for uri, label in zip(objects["uri"].to_pylist(), objects["label"].to_pylist()) if uri in chosen]
    assert sum(details["objects_per_class"].values()) == len(mine)
    names = sorted(set(objects["label"].to_pylist()))
    share = np.array([mine.count(n) for n in names]) / len(mine)
    everywhere = np.array([objects["label"].to_pylist().count(n) for n in names]) / objects.num_rows
    tv = 0.5 * np.abs(share - everywhere).sum()
    assert details["object_class_tv"] == pytest.approx(tv, abs=1e-3) and tv <= 0.06
    # the strata: every image's main box class, the listed-empty and the unlisted images
    reasons = " ".join(val.table["reason"].to_pylist())
    assert "<unlabelled>" in reasons and "object_label 'class0'" in reasons
    explicit = _select(table, emb, objects, mode="validation", budget=120, balance_on="object_label")
    assert explicit.table["uri"].to_pylist() == val.table["uri"].to_pylist()


def _boxes(rows):
    """An objects table from ``(uri, label, area, source, status)`` rows."""
    uri, label, area, source, status = zip(*rows)
    return pa.table({"uri": list(uri), "label": list(label), "area": pa.array(area, pa.float64()),
                     "source": list(source), "status": list(status)})


def test_drift_compares_box_classes_and_sizes_and_fires_on_a_class_share():
    from curation.object_profile import box_profile, compare_boxes

    night1 = _boxes([("a", "car", 20.0 ** 2, "annotation", "ok")] * 6 + [("b", "person", 50.0 ** 2, "annotation", "ok")] * 4
                    + [("c", "car", 0.0, "annotation", "rejected"), ("c", "dog", 10.0, "prediction", "ok")])
    night2 = _boxes([("a", "car", 200.0 ** 2, "annotation", "ok")] * 3 + [("b", "person", 50.0 ** 2, "annotation", "ok")] * 7)
    before, after = box_profile(night1), box_profile(night2)
    assert before == {"boxes": 10, "class_shares": {"car": 0.6, "person": 0.4},
                      "size_shares": {"medium": 0.4, "small": 0.6}}  # rejected and predicted boxes left out
    drift, fired = compare_boxes(before, after, alarm_class_share_change=0.2)
    assert drift["classes"]["tv"] == pytest.approx(0.3) and drift["classes"]["shares"]["car"]["change"] == -0.3
    assert drift["sizes"]["shares"]["large"]["after"] == 0.3 and drift["sizes"]["tv"] == pytest.approx(0.6)
    assert len(fired) == 1 and "box class 'car'" in fired[0]
    assert compare_boxes(before, before, alarm_class_share_change=0.2)[1] == []


def test_leakage_counts_the_boxes_of_leaked_images_by_split_class_and_size():
    from curation.object_profile import leaked_boxes

    boxes = _boxes([("x1", "car", 10.0, "annotation", "ok"), ("x1", "dog", 5000.0, "annotation", "ok"),
                    ("y1", "car", 10.0, "annotation", "ok"), ("z", "car", 10.0, "annotation", "ok"),
                    ("x1", "cat", 10.0, "annotation", "rejected")])
    out = leaked_boxes(boxes, pa.array(["x1", "y1"]), pa.array(["train", "val"]))
    assert out == {"train": {"boxes": 2, "by_class": {"car": 1, "dog": 1}, "by_size": {"medium": 1, "small": 1}},
                   "val": {"boxes": 1, "by_class": {"car": 1}, "by_size": {"small": 1}}}
