"""Faults injected into real runs (real local Ray, real processes killed with SIGKILL).

Every case asserts the accounting (inputs = ok + rejected, no uri twice, run.json agrees) and
compares the manifests with an undisturbed run's: a fault may cost time, never an item.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from curation.config import load_config
from curation.demo import demo_config
from curation.job import run_job

FAULT_SET_SIZE = 1200


def owned_by(pid: int, older) -> bool:
    """Whether a process in ``older`` (other than init) is an ancestor of ``pid``."""
    seen = set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                pid = int(fh.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
        if pid > 1 and pid in older:
            return True
    return False


def processes() -> dict[int, bytes]:
    """``{pid: cmdline}`` of the live (non-zombie) processes."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                if fh.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
            with open(f"/proc/{name}/cmdline", "rb") as fh:
                out[int(name)] = fh.read().replace(b"\0", b" ")
        except (OSError, IndexError):
            continue
    return out


def kill_when(marker: bytes, ready, *, timeout: float = 120) -> dict:
    """In a thread: once ``ready()`` holds, SIGKILL the first process whose command line holds
    ``marker``. Returns a dict that gets ``pid`` when it fired."""
    fired: dict = {}

    def run():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and "pid" not in fired:
            if ready():
                for pid, cmdline in processes().items():
                    if marker in cmdline and pid != os.getpid():
                        os.kill(pid, signal.SIGKILL)
                        fired["pid"] = pid
                        fired["cmdline"] = cmdline.decode(errors="replace")[:120]
                        return
            time.sleep(0.02)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    fired["thread"] = thread
    return fired


def manifests(run_path: str, fs=None) -> dict:
    """The published tables of a run (a local folder, or a path on ``fs``), in a comparable form
    (``vector_id`` is where a vector sits in storage, not part of what was decided)."""
    import pyarrow.fs as pafs

    fs = fs or pafs.LocalFileSystem()
    samples = pq.read_table(f"{run_path}/samples", filesystem=fs)
    out = {"samples": samples.drop_columns([c for c in ("vector_id",) if c in samples.column_names])}
    for info in sorted(fs.get_file_info(pafs.FileSelector(f"{run_path}/selections")), key=lambda i: i.path):
        out[info.base_name] = pq.read_table(info.path, filesystem=fs)
    return out


def assert_same_manifests(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].schema == b[name].schema, name
        left, right = a[name].to_pandas(), b[name].to_pandas()
        for column in left.columns:  # pandas' equals: NaN equals NaN (Arrow's does not)
            if left[column].dtype.kind == "f":
                # A cosine computed over vectors read in other batches (a resumed run's parts)
                # may differ in its last bits (BLAS blocking); anything more is a difference.
                assert np.allclose(left[column], right[column], rtol=0, atol=1e-6, equal_nan=True), \
                    f"{name}.{column} differs"
            else:
                assert left[column].equals(right[column]), f"{name}.{column} differs"


def readable_rows(run_folder: str) -> int:
    """Rows in a run's complete ``embeddings/`` parts (a part cut short by a kill is skipped,
    as the rerun skips it)."""
    rows = 0
    for part in glob.glob(os.path.join(run_folder, "embeddings", "*.parquet")):
        try:
            rows += pq.read_metadata(part).num_rows
        except (OSError, pa.ArrowException):
            pass
    return rows


@dataclass
class Rerun:
    run_uri: str


def assert_accounting(result) -> None:
    samples = pq.read_table(os.path.join(result.run_uri, "samples"))
    uris = samples["uri"].to_pylist()
    status = samples["status"].to_pylist()
    info = json.load(open(os.path.join(result.run_uri, "run.json")))
    assert len(uris) == len(set(uris)) == info["counts"]["inputs"]
    assert info["counts"]["ok"] == status.count("ok") and info["counts"]["rejected"] == status.count("rejected")
    assert info["counts"]["ok"] + info["counts"]["rejected"] == info["counts"]["inputs"]


@pytest.fixture(scope="module")
def fault_set(tmp_path_factory):
    """A demo set large enough that a run is still embedding when the first parts are written."""
    from curation.demo import make_demo_dataset

    root = str(tmp_path_factory.mktemp("fault-set"))
    make_demo_dataset(root, n=FAULT_SET_SIZE, seed=11, defect_scale=0.2)
    return root


def fault_config(root: str, out: str, **sections) -> dict:
    data = demo_config(root, out, budget=60)
    data["selections"][1]["budget"] = 20
    data["selections"][2]["budget"] = 60
    # A real (random-weight, seeded) CNN and small batches: embedding takes a few seconds in
    # many batches, so a kill lands mid-stream.
    data["embedder"] = {"model": "resnet18", "weights": "none", "image_size": 64, "batch_size": 16}
    data["knn"] = {"index": "ivf", "shards": 2, "nlist": 16, "nprobe": 16}  # the sharded path
    data["report"] = {"map_method": "pca", "thumbnails": 50}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return data


@pytest.fixture(scope="module")
def undisturbed(ray_local, fault_set, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("undisturbed"))
    result = run_job(load_config(data=fault_config(fault_set, out, store={"enabled": False})))
    assert_accounting(result)
    return result


def test_embedding_actor_killed_mid_run_loses_nothing(undisturbed, fault_set, tmp_path):
    """Also determinism, on the sharded kNN path (IVF over two shard actors): a second run of the
    same input and config gives the same manifests, whatever happened on its way."""
    out = str(tmp_path)
    parts = os.path.join(out, "*", "embeddings", "*.parquet")
    fired = kill_when(b"EmbedStage)).submit", lambda: bool(glob.glob(parts)))
    result = run_job(load_config(data=fault_config(fault_set, out, store={"enabled": False})))
    fired["thread"].join(1)
    assert "pid" in fired, "the embedding actor was never seen running"
    assert result.run_info["knn"]["shards"] == 2
    assert_accounting(result)
    assert result.run_info["embedder"]["store"]["embedded"] == result.run_info["counts"]["ok"]
    assert_same_manifests(manifests(undisturbed.run_uri), manifests(result.run_uri))


def test_index_shard_killed_during_search_is_rebuilt_or_named(ray_local, monkeypatch):
    from curation.index import sharded
    from curation.index.params import IndexParams

    rng = np.random.default_rng(0)
    x = rng.normal(size=(30_000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    params = IndexParams(kind="flat", nlist=0, nprobe=0, train_size=0, shards=2, codec="flat")
    clean, _ = sharded.sharded_knn(x, 5, params, query_batch=500)

    # Killed while searching: Ray restarts the shard, which refills itself; the graph is the same.
    fired = kill_when(b"IndexShard.search", lambda: True)
    graph, _ = sharded.sharded_knn(x, 5, params, query_batch=500)
    fired["thread"].join(1)
    assert "pid" in fired
    assert np.array_equal(graph.ids, clean.ids) and np.allclose(graph.sims, clean.sims)

    # No restarts left: the search fails, naming the shard, instead of a graph with holes.
    monkeypatch.setattr(sharded, "SHARD_RESTARTS", 0)
    fired = kill_when(b"IndexShard.search", lambda: True)
    with pytest.raises(sharded.ShardLost, match=r"kNN index shard \d"):
        sharded.sharded_knn(x, 5, params, query_batch=500)
    fired["thread"].join(1)


def test_driver_killed_mid_run_then_rerun_resumes_from_its_checkpoint(undisturbed, fault_set, tmp_path):
    """SIGKILL of the job process: nothing published, no Ray process left; the rerun reuses the
    vectors the killed run had written and publishes the same manifests. The rerun is a whole
    run with a deliberately small object store (Ray's minimum, 80 MB): it spills or waits, never
    fails."""
    out = str(tmp_path / "runs")
    # A published run to protect (the undisturbed one, copied in): latest must not move when a
    # later run dies.
    import shutil

    first_uri = os.path.join(out, undisturbed.run_id)
    shutil.copytree(undisturbed.run_uri, first_uri)
    with open(os.path.join(out, "latest"), "w") as fh:
        json.dump({"run_id": undisturbed.run_id, "uri": first_uri}, fh)
    latest_before = open(os.path.join(out, "latest")).read()
    config = fault_config(fault_set, out, ray={"num_cpus": 2, "object_store_memory": 200 * 1024**2})
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump(config))
    before = set(processes())
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    job = subprocess.Popen([sys.executable, "-m", "curation", "run", "--config", str(config_path)],
                           stdout=subprocess.DEVNULL, stderr=open(tmp_path / "job.err", "wb"), env=env)
    deadline = time.monotonic() + 180
    while not sum(readable_rows(d) for d in glob.glob(os.path.join(out, "2*")) if d != first_uri):
        assert job.poll() is None, ("the job ended before writing any vectors: "
                                    + (tmp_path / "job.err").read_text(errors="replace")[-3000:])
        assert time.monotonic() < deadline, "no vectors written in 180 s"
        time.sleep(0.02)
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    killed = [d for d in glob.glob(os.path.join(out, "2*")) if d != first_uri]
    assert len(killed) == 1 and not os.path.exists(os.path.join(killed[0], "_SUCCESS"))
    assert open(os.path.join(out, "latest")).read() == latest_before
    checkpointed = readable_rows(killed[0])
    assert checkpointed > 0
    # The killed run's local Ray goes with it (the watchdog kills what Ray leaves behind).
    deadline = time.monotonic() + 20

    def ray_left():
        """New processes of Ray (or of the job) that no process older than the job owns: the
        killed job's are orphans now, while a Ray that another test process runs meanwhile (the
        other pytest-xdist worker's) starts workers under that older process."""
        return {p: c for p, c in processes().items()
                if p not in before and (b"ray" in c or b"curation" in c) and not owned_by(p, before)}

    while (left := ray_left()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, left

    config["ray"]["object_store_memory"] = 80 * 1024**2
    config_path.write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "curation", "run", "--config", str(config_path), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    latest = json.load(open(os.path.join(out, "latest")))
    assert latest["run_id"] not in (undisturbed.run_id, os.path.basename(killed[0]))
    rerun = Rerun(latest["uri"])
    assert_accounting(rerun)
    info = json.load(open(os.path.join(rerun.run_uri, "run.json")))
    store = info["embedder"]["store"]
    assert store["reused"] >= checkpointed and store["embedded"] == info["counts"]["ok"] - store["reused"]
    assert_same_manifests(manifests(undisturbed.run_uri), manifests(rerun.run_uri))
