"""Careless or hostile input never overwrites or corrupts: a reused run id, NaN settings,
a refused `--out`, a damaged run.json, another Ray on the machine.

Embeddings-mode runs below `knn.exact_below` (no Ray), except the Ray address test.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from curation.cli import main
from curation.config import ConfigError, load_config


def _embeddings(path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    pq.write_table(pa.table({"uri": [f"/data/{'ab'[i % 2]}/{seed}-{i:03d}.jpg" for i in range(n)],
                             "label": pa.array(["ab"[i % 2] for i in range(n)], pa.string()),
                             "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 8)}), path)


def _config_file(root, embeddings, **output) -> str:
    path = root / f"config-{os.path.basename(str(embeddings))}.yaml"
    path.write_text(yaml.safe_dump({"input": {"embeddings": str(embeddings)}, "report": {"map_method": "pca"},
                                    "output": {"uri": str(root / "out"), **output}}))
    return str(path)


def _tree(folder) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            st = os.stat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), folder)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def night1(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    _embeddings(root / "a.parquet", 30, seed=1)
    assert main(["run", "--config", _config_file(root, root / "a.parquet", run_id="night1"), "--quiet"]) == 0
    return root


def test_a_published_run_id_is_exit_2_before_any_work_and_the_run_is_untouched(night1, capsys):
    root = night1
    before = _tree(root / "out")
    _embeddings(root / "b.parquet", 12, seed=2)
    code = main(["run", "--config", _config_file(root, root / "b.parquet"), "--set", "output.run_id=night1",
                 "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "'night1' is already published" in err[0]
    assert _tree(root / "out") == before  # not one file rewritten, added or removed
    assert pq.read_table(str(root / "out" / "night1" / "samples")).num_rows == 30


def test_an_unpublished_run_id_resumes(night1, capsys):
    """A run folder without _SUCCESS (a crashed run) is not refused: the rerun publishes it."""
    root = night1
    (root / "out" / "crashed").mkdir()
    code = main(["run", "--config", _config_file(root, root / "a.parquet"), "--set", "output.run_id=crashed",
                 "--quiet"])
    assert code == 0 and (root / "out" / "crashed" / "_SUCCESS").exists()


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", ".NaN"])
def test_nan_and_infinities_are_refused_for_float_keys(night1, capsys, value):
    base = {"input": {"embeddings": "x.parquet"}, "output": {"uri": "out"}}
    with pytest.raises(ConfigError, match="'drift.alarm_cluster_tv': must be a finite number"):
        load_config(data=base, overrides=[f"drift.alarm_cluster_tv={value}"])
    code = main(["run", "--config", _config_file(night1, night1 / "a.parquet"), "--set",
                 f"scores.rare_tail_quantile={value}", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "must be a finite number" in err[-1]


def test_nan_in_a_config_mapping_is_refused_too():
    with pytest.raises(ConfigError, match="finite"):
        load_config(data={"input": {"embeddings": "x.parquet"}, "output": {"uri": "out"},
                          "drift": {"alarm_cluster_tv": float("nan")}})


def test_run_json_is_strict_json_even_with_a_non_finite_number(night1, tmp_path):
    from curation.io.filesystem import resolve
    from curation.run_info import RunInfo

    run = resolve(str(night1 / "out" / "night1"))
    text = (night1 / "out" / "night1" / "run.json").read_text()

    def refuse(token):
        raise ValueError(f"non-strict JSON token {token}")

    json.loads(text, parse_constant=refuse)
    info = RunInfo.read(run)
    info.scores["made_up"] = {"mean": float("nan"), "max": float("inf"), "values": [1.0, float("-inf")],
                              "numpy": np.float32("nan")}
    target = resolve(str(tmp_path / "copy"))
    info.write(target)
    data = json.loads((tmp_path / "copy" / "run.json").read_text(), parse_constant=refuse)
    assert data["scores"]["made_up"] == {"mean": None, "max": None, "values": [1.0, None], "numpy": None}


def test_export_that_refuses_its_out_leaves_the_file_as_it_was(night1, capsys):
    target = night1 / "t.xml"
    target.write_text("keep me")
    code = main(["export", "--run", str(night1 / "out"), "--selection", "label_review", "--out", str(target),
                 "--classes", "a,b", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cannot end in .xml" in err[0]
    assert target.read_text() == "keep me"
    assert [p.name for p in night1.iterdir() if p.name.startswith(".t.xml")] == []  # no temporary left


def test_a_published_run_without_run_json_is_exit_2_for_similar_and_export(night1, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(night1 / "out" / "night1", damaged)
    os.remove(damaged / "run.json")
    uri = pq.read_table(str(damaged / "samples"), columns=["uri"])["uri"][0].as_py()
    for argv in (["similar", "--run", str(damaged), "--uri", uri, "-k", "3"],
                 ["export", "--run", str(damaged), "--selection", "label_review", "--out", str(tmp_path / "x.json")]):
        code = main([*argv, "--quiet"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "run.json: missing" in err[0], (argv, err)
    (damaged / "run.json").write_text("{not json")
    code = main(["similar", "--run", str(damaged), "--uri", uri, "-k", "3", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not a run.json" in err[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _other_ray_head(env: dict, marker: str, tmp_path, tries: int = 3) -> tuple[subprocess.Popen, int]:
    """`ray start --head --block` on a free port, up when Ray's address file names it; another
    port when it exits first (a port another process took meanwhile), with its log on failure."""
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    for attempt in range(tries):
        port = _free_port()
        log = tmp_path / f"ray-head-{attempt}.log"
        head = subprocess.Popen([ray_bin, "start", "--head", "--block", "--num-cpus=3", "--node-ip-address=127.0.0.1",
                                 f"--port={port}", "--include-dashboard=false", "--object-store-memory=100000000"],
                                env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 150
        while time.time() < deadline and head.poll() is None:
            if os.path.exists(marker) and open(marker).read().strip().endswith(f":{port}"):
                return head, port
            time.sleep(0.5)
        _stop_head(head)
    raise AssertionError(f"the other Ray did not start in {tries} tries: {log.read_text(errors='replace')[-2000:]}")


def _stop_head(head: subprocess.Popen) -> None:
    """Ctrl-C, which `ray start --block` stops on in about a second (it waits out SIGTERM)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGINT)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait()


@pytest.mark.integration
def test_without_ray_address_a_run_starts_its_own_ray_not_the_one_already_on_the_machine(tmp_path):
    """Another Ray head (3 CPUs) started on this machine writes Ray's `ray_current_cluster`
    file; a run with no RAY_ADDRESS must still start a new local Ray with its own settings."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    marker = "/tmp/ray/ray_current_cluster"  # where ray.init() without an address looks
    before = open(marker).read() if os.path.exists(marker) else None
    head, port = _other_ray_head(env, marker, tmp_path)
    try:
        other = open(marker).read().strip()
        code = ("import ray, json\n"
                "from curation.config import load_config\n"
                "from curation.session import ray_session\n"
                "config = load_config(data={'input': {'embeddings': 'x'}, 'output': {'uri': 'o'},"
                " 'ray': {'num_cpus': 1, 'object_store_memory': 80000000}})\n"
                "with ray_session(config):\n"
                "    print(json.dumps({'cpus': ray.cluster_resources().get('CPU'),"
                " 'gcs': ray.get_runtime_context().gcs_address}))\n")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180,
                             cwd=str(tmp_path))
        assert out.returncode == 0, out.stderr[-2000:]
        seen = json.loads(out.stdout.strip().splitlines()[-1])
        assert seen["cpus"] == 1.0 and seen["gcs"] != other
        assert head.poll() is None  # the other Ray is still up, untouched
    finally:
        _stop_head(head)
        # Leave the machine's pointer as it was, not naming the Ray just stopped.
        if os.path.exists(marker) and open(marker).read().strip().endswith(f":{port}"):
            if before is None:
                os.remove(marker)
            else:
                with open(marker, "w") as fh:
                    fh.write(before)


# ------------------------------------------------------------------------------- corrections

def _corrections_run(root, name: str, text: str, *extra: str) -> tuple[int, list[str]]:
    path = root / name
    path.write_text(text)
    code = main(["run", "--config", _config_file(root, root / "a.parquet"), "--set",
                 f"input.label_corrections={path}", "--set", f"output.run_id=corr-{name.replace('.', '-')}",
                 *extra, "--quiet"])
    return code, path


def _first_uri(root) -> str:
    return pq.read_table(str(root / "a.parquet"), columns=["uri"])["uri"][0].as_py()


@pytest.mark.parametrize("name, text, message", [
    ("empty.csv", "", "no answers in it"),
    ("strings.json", '["a", "b"]', "task 0: expected a task object, got str"),
    ("no-uri.json", '[{"data": {}, "annotations": []}]', "task 0: no data.uri"),
    ("broken.json", '[{"data": ', "not a Label Studio JSON export"),
    ("short.csv", "uri,label\n/data/x.jpg\n", "line 2: expected uri,label"),
    ("nomatch.csv", "uri,label\n/nowhere/x.jpg,a\n", "none of its 1 items is an input of this run"),
    ("newclass.csv", "uri,label\n{uri},purple_unicorn\n", "no class for, e.g. 'purple_unicorn'"),
    ("long.csv", "uri,label\n{uri}," + "x" * 10_000 + "\n", "a label of 10000 characters"),
])
def test_bad_corrections_are_exit_2_before_any_work_naming_the_file_and_record(night1, capsys, name, text, message):
    code, path = _corrections_run(night1, name, text.replace("{uri}", _first_uri(night1)))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "input.label_corrections" in err[0] and str(path) in err[0] and message in err[0], err[0]
    assert len(err[0]) < 600  # a 10 kB label is not echoed
    assert not (night1 / "out" / f"corr-{name.replace('.', '-')}").exists()


def test_csv_corrections_are_read_by_header_name():
    from curation.corrections import _csv_answers

    assert _csv_answers(b"label,uri\ncat,/a.jpg\n", "f.csv") == {"/a.jpg": ["cat"]}
    assert _csv_answers(b"/a.jpg,cat\n/b.jpg,dog\n", "f.csv") == {"/a.jpg": ["cat"], "/b.jpg": ["dog"]}


def test_a_new_class_from_one_correction_does_not_take_over_the_suggestions(night1, capsys):
    """With input.allow_new_classes a one-row correction naming a new class is applied, but a
    one-member class never drives suggestions or flags: the run's suggestions and flags are
    those of the run without it."""
    baseline = pq.read_table(str(night1 / "out" / "night1" / "samples")).to_pandas().set_index("uri")
    code, _ = _corrections_run(night1, "unicorn.csv", f"uri,label\n{_first_uri(night1)},purple_unicorn\n",
                               "--set", "input.allow_new_classes=true")
    assert code == 0
    samples = pq.read_table(str(night1 / "out" / "corr-unicorn-csv" / "samples")).to_pandas().set_index("uri")
    assert samples.loc[_first_uri(night1), "label"] == "purple_unicorn"
    assert (samples["suggested_label"] == "purple_unicorn").sum() == 0
    others = samples.index != _first_uri(night1)
    assert samples.loc[others, "is_suspected_mislabel"].sum() <= baseline.loc[others, "is_suspected_mislabel"].sum() + 1
    assert not samples.loc[_first_uri(night1), "is_disputed"]
    info = json.loads((night1 / "out" / "corr-unicorn-csv" / "run.json").read_text())
    assert info["scores"]["label_quality"]["held_out_classes"] == ["purple_unicorn"]


# ---------------------------------------------------------------------- a previous night's graph

@pytest.fixture(scope="module")
def two_nights(tmp_path_factory):
    """Night 1 published; a clean night 2 built whole (the graph the damaged nights must match)."""
    root = tmp_path_factory.mktemp("previous-graph")
    _embeddings(root / "a.parquet", 60, seed=5)
    config = _config_file(root, root / "a.parquet")
    assert main(["run", "--config", config, "--set", "output.run_id=n1", "--quiet"]) == 0
    assert main(["run", "--config", config, "--set", "output.run_id=whole", "--set", "output.uri=" +
                 str(root / "whole-out"), "--quiet"]) == 0
    return root, config


def _graph(run) -> dict:
    table = pq.read_table(str(run / "knn"))
    return {r["input_id"]: r["neighbor_ids"] for r in table.to_pylist()}


def _damage_and_rerun(root, config, run_id: str, damage) -> dict:
    part = next((root / "out" / "n1" / "knn").glob("*.parquet"))
    original = part.read_bytes()
    try:
        damage(part)
        assert main(["run", "--config", config, "--set", f"output.run_id={run_id}", "--quiet"]) == 0
    finally:
        part.write_bytes(original)
    # the next night diffs against this one: put latest back on n1
    (root / "out" / "latest").write_text(json.dumps({"run_id": "n1", "uri": str(root / "out" / "n1")}))
    return json.loads((root / "out" / run_id / "run.json").read_text())["knn"]["incremental"]


def test_an_out_of_range_neighbour_id_falls_back_to_a_whole_build_naming_the_file(two_nights):
    root, config = two_nights

    def damage(part):
        table = pq.read_table(part)
        ids = table["neighbor_ids"].to_pylist()
        ids[3][0] = 1_000_000
        pq.write_table(table.set_column(table.column_names.index("neighbor_ids"), "neighbor_ids",
                                        pa.array(ids, table.schema.field("neighbor_ids").type)), part)

    incremental = _damage_and_rerun(root, config, "n2-range", damage)
    assert incremental["used"] is False
    assert "not trusted" in incremental["reason"] and "neighbour id 1000000" in incremental["reason"]
    assert str(root / "out" / "n1" / "knn") in incremental["reason"]
    assert _graph(root / "out" / "n2-range") == _graph(root / "whole-out" / "whole")


def test_a_scrambled_graph_is_caught_by_recomputing_similarities(two_nights):
    root, config = two_nights

    def damage(part):
        table = pq.read_table(part)
        rng = np.random.default_rng(0)
        ids = [list(rng.permutation(row)) for row in table["neighbor_ids"].to_pylist()]
        sims = [[0.999] * len(row) for row in ids]
        table = table.set_column(table.column_names.index("neighbor_ids"), "neighbor_ids",
                                 pa.array(ids, table.schema.field("neighbor_ids").type))
        table = table.set_column(table.column_names.index("neighbor_similarities"), "neighbor_similarities",
                                 pa.array(sims, table.schema.field("neighbor_similarities").type))
        pq.write_table(table, part)

    incremental = _damage_and_rerun(root, config, "n2-scrambled", damage)
    assert incremental["used"] is False and "sampled neighbour similarities differ" in incremental["reason"]
    assert _graph(root / "out" / "n2-scrambled") == _graph(root / "whole-out" / "whole")


def test_a_truncated_graph_says_it_cannot_be_read(two_nights):
    root, config = two_nights

    def damage(part):
        part.write_bytes(part.read_bytes()[:100])

    incremental = _damage_and_rerun(root, config, "n2-truncated", damage)
    assert incremental["used"] is False and "cannot be read" in incremental["reason"]
    assert "no saved graph" not in incremental["reason"]


def test_an_intact_previous_graph_is_still_updated(two_nights):
    root, config = two_nights
    incremental = _damage_and_rerun(root, config, "n2-intact", lambda part: None)
    assert incremental["used"] is True
    assert _graph(root / "out" / "n2-intact") == _graph(root / "whole-out" / "whole")


def test_the_store_follows_the_run_that_published_not_the_one_that_lost(ray_local, tmp_path):
    """Two runs with different inputs start from the same latest; the later one publishes
    first. The loser ends with PublishConflict and the store's CURRENT names the winner's
    snapshot, so the next night reuses the winner's vectors."""
    from PIL import Image

    from curation.io.filesystem import Resolver
    from curation.job import PublishConflict, preflight, run_job

    rng = np.random.default_rng(7)
    for name, n in (("small", 6), ("large", 9)):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")

    def config(name, run_id):
        return load_config(data={"input": {"images": str(tmp_path / name)}, "report": {"map_method": "pca"},
                                 "output": {"uri": str(tmp_path / "out"), "run_id": run_id},
                                 "embedder": {"model": "thumbnail", "weights": "none"}})

    resolver = Resolver()
    loser = config("small", "loser")
    plan = preflight(loser, resolver)
    run_job(config("large", "winner"))
    with pytest.raises(PublishConflict):
        run_job(loser, resolver=resolver, plan=plan)
    (current_file,) = (tmp_path / "out" / "embedding-store").glob("*/CURRENT")  # one folder per embedder
    current = json.loads(current_file.read_text())
    assert current == {"snapshot": "snapshot-winner", "rows": 9}
    night2 = run_job(config("large", "night2"))
    assert night2.info.embedder["store"]["reused"] == 9


def test_a_shards_vector_source_stays_small_enough_to_pass_by_value():
    """Ray puts actor arguments over 100 KB in the object store, and a restartable actor with
    such arguments logs an E-level line: an input.embeddings run of 450k rows with a rejected
    row did. The rejected-rows mask travels packed and compressed, and arrives equal."""
    import pickle

    import cloudpickle

    from curation.index.source import VectorParts
    from curation.io.filesystem import resolve

    keep = np.ones(1_000_000, bool)
    keep[np.random.default_rng(0).choice(1_000_000, 500, replace=False)] = False
    parts = VectorParts([(resolve(f"/data/part-{i}.parquet"), i * 250_000, 250_000) for i in range(4)], keep=keep)
    blob = cloudpickle.dumps(parts)
    assert len(blob) < 20_000
    back = pickle.loads(blob)
    assert back.keep.dtype == bool and np.array_equal(back.keep, keep) and back.parts == parts.parts
    assert parts.keep is keep  # pickling left the original as it was


def test_an_output_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    from curation.io.filesystem import resolve, write_bytes_atomic

    target = tmp_path / "hits.parquet"
    target.write_bytes(b"old")
    write_bytes_atomic(resolve(str(target)), b"new")
    assert target.read_bytes() == b"new" and oct(target.stat().st_mode & 0o777) == "0o644"

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_bytes_atomic(resolve(str(target)), b"half")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["hits.parquet"]
