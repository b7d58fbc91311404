"""A new score declares its flag in its own class and nothing else is edited: the flag reaches
the selections, the map, the galleries, run.json's counts and the nightly diff (README:
"a new flag is added in its score alone"). Two embeddings-mode nights below knn.exact_below
(no Ray), the score registered the way a plug-in would be: appended to scores.REGISTRY."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from curation import scores
from curation.cli import main
from curation.scores.base import Flag, count_true


class SmudgedScore:
    """Flags the ok items whose uri number is a multiple of ``every`` (a stand-in rule)."""

    name = "smudged"
    flags = (Flag("is_smudged", "junk", "Junk: smudged", "neighbor_similarity", True, ("smudge_every",)),)
    columns = ("is_smudged",)
    needs = ()
    every = 7

    def compute(self, ctx) -> pa.Table:
        numbers = np.array([int(u.rsplit("-", 1)[1].split(".")[0]) for u in ctx.columns.arrow("uri").to_pylist()])
        return pa.table({"is_smudged": ctx.ok & (numbers % self.every == 0)})

    def summary(self, table: pa.Table) -> dict:
        return {"flags": count_true(table, "is_smudged")}


def _night(root, run_id: str) -> dict:
    rng = np.random.default_rng(3)
    n = 60
    x = rng.normal(size=(n, 8)).astype(np.float32)
    pq.write_table(pa.table({"uri": [f"/data/{'ab'[i % 2]}/item-{i:03d}.jpg" for i in range(n)],
                             "label": ["ab"[i % 2] for i in range(n)],
                             "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 8)}),
                   root / "emb.parquet")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({"input": {"embeddings": str(root / "emb.parquet")},
                                      "report": {"map_method": "pca"},
                                      "output": {"uri": str(root / "out"), "run_id": run_id}}))
    assert main(["run", "--config", str(config), "--quiet"]) == 0
    return json.loads((root / "out" / run_id / "run.json").read_text())


def test_a_new_scores_junk_flag_reaches_every_consumer_with_no_other_edit(tmp_path, monkeypatch):
    from curation.report.map import highlight_masks

    score = SmudgedScore()
    monkeypatch.setattr(scores, "REGISTRY", scores.REGISTRY + (score,))
    _night(tmp_path, "night1")
    score.every = 5  # night 2 flags other items: the diff sees the new ones
    info = _night(tmp_path, "night2")
    run = tmp_path / "out" / "night2"
    samples = pq.read_table(str(run / "samples"))
    smudged = np.asarray(samples["is_smudged"].to_pylist(), bool)
    uris = np.asarray(samples["uri"].to_pylist())
    assert 0 < smudged.sum() < len(smudged)
    # run.json counts and the nightly diff
    assert info["flags"]["is_smudged"] == smudged.sum()
    was = {u for u in uris if int(u.rsplit("-", 1)[1][:3]) % 7 == 0}
    assert info["diff"]["newly_flagged"]["smudged"] == len(set(uris[smudged]) - was) > 0
    # selections: junk never enters clean or train
    for name in ("clean", "train"):
        chosen = set(pq.read_table(str(run / "selections" / f"{name}.parquet"))["uri"].to_pylist())
        assert chosen and not chosen & set(uris[smudged]), name
    # the map's junk highlight and the report's gallery
    assert highlight_masks(samples, {}, {})["junk"][smudged].all()
    assert "Junk: smudged" in (run / "report.html").read_text()


def test_each_flag_column_is_spelled_only_in_its_score_and_the_schema():
    """Everything else walks the declarations (the demo's planted-vs-found table included)."""
    import inspect
    import os

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(scores.__file__))))
    for score in scores.REGISTRY:
        home = os.path.abspath(inspect.getsourcefile(type(score)))
        for flag in (f for f in score.flags if f.boolean):
            spelled = []
            for folder, _, files in os.walk(os.path.join(root, "curation")):
                for name in files:
                    path = os.path.join(folder, name)
                    if name.endswith(".py") and f'"{flag.column}"' in open(path, encoding="utf-8").read():
                        spelled.append(os.path.relpath(path, root))
            assert set(spelled) <= {os.path.relpath(home, root), os.path.join("curation", "schema.py")}, flag.column
