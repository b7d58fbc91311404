"""The job on a Ray cluster of several nodes, simulated on this machine with Ray's own helper
(``ray.cluster_utils.Cluster``): a head with 0 CPUs (as KubeRay recommends) and two 1-CPU
workers, each its own raylet and object store. Drivers are separate processes (the CLI with
``RAY_ADDRESS``, and ``ray job submit`` to the head's job server); nodes are added while a run
goes on (what an autoscaler does) and removed mid-phase (a lost node). Every run is compared
with a single-node run of the same input and config.

The cluster's processes are stopped by their own ids (the cluster's temp dir), never with
``ray stop``.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from curation.config import load_config
from curation.demo import demo_config
from tests.conftest import upload_folder
from tests.contract import check_run_outputs

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
ENCODER = os.path.join(ROOT, "benchmarks", "models", "cifar10_cnn.pt")
SELECTIONS = ["train", "edge_cases", "label_review", "clean"]
WORKER = {"num_cpus": 1, "object_store_memory": 80 * 1024 * 1024, "node_ip_address": "127.0.0.1"}
# Ray rewrites a loopback address to the machine's own unless multi-node clusters are "off"
# (the variable's only other effect is on `ray start` for workers, which the helper does not
# use): with it every driver and node here stays on 127.0.0.1.
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
# Ray Data's own actor pools pass their context and transformer as object-store arguments to
# actors with max_restarts=-1 (ray/data/.../actor_pool_map_operator.py); Ray core logs that at
# E level for every pool. The driver owns both for the whole run, so the case it warns of
# cannot happen; every other E-level line fails the test.
RAY_DATA_POOL_NOTICE = "'MapWorker(MapBatches(EmbedStage))'"
# The raylet's disk monitor reports the host's own disk (over 95% full on some CI machines);
# it says nothing about the job, so it is no false alarm of ours.
HOST_DISK_NOTICE = "file_system_monitor.cc"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_under(marker: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    if marker.encode() in fh.read():
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


@contextlib.contextmanager
def _environment(values: dict):  # None: unset
    """Nodes inherit this process's environment when they start."""
    saved = {k: os.environ.get(k) for k in values}
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class SimulatedCluster:
    """A head (0 CPUs, with its dashboard: the job server) and 1-CPU workers on loopback."""

    def __init__(self, s3):
        from ray.cluster_utils import Cluster

        self.temp = tempfile.mkdtemp(prefix="mn-", dir="/tmp")  # short: socket paths have a length limit
        self.dashboard_port = _free_port()
        self.env = {**LOOPBACK, "AWS_ENDPOINT_URL": s3.url, "AWS_ACCESS_KEY_ID": s3.access_key,
                    "AWS_SECRET_ACCESS_KEY": s3.secret_key, "AWS_REGION": "us-east-1",
                    # as from an activated virtualenv: a submitted job's `python` is this one
                    "PATH": BIN + os.pathsep + os.environ.get("PATH", ""),
                    "VIRTUAL_ENV": os.path.dirname(BIN),
                    # ray.init in this process exports its own local Ray's address: not for the nodes
                    "RAY_ADDRESS": None}
        # Cluster's head node records its address in Ray's default temp folder (/tmp/ray), not in
        # temp_dir, and fails on a fresh machine where no Ray has made that folder yet.
        from ray._private.utils import get_ray_address_file

        os.makedirs(os.path.dirname(get_ray_address_file(None)), exist_ok=True)
        with _environment(self.env):
            self.cluster = Cluster(initialize_head=True, shutdown_at_exit=False, head_node_args={
                "num_cpus": 0, "object_store_memory": 100 * 1024 * 1024, "node_ip_address": "127.0.0.1",
                "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": self.dashboard_port,
                "dashboard_agent_listen_port": _free_port(), "temp_dir": self.temp,
                # a removed node is declared dead in ~2 s instead of ~15 s (Ray's default)
                "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 2}})
        # What `ray start --head` records and a submitted job's supervisor reads to find "its"
        # cluster (else it may pick another Ray running on this machine, such as the suite's).
        from ray._private.utils import write_ray_address

        write_ray_address(self.cluster.address, self.temp)
        self.workers = [self.add_worker(wait=False) for _ in range(2)]
        self.cluster.wait_for_nodes()

    @property
    def address(self) -> str:
        return self.cluster.address

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def add_worker(self, wait: bool = True):
        with _environment(self.env):
            # each node's agent on its own port (the default one is fixed: nodes here share a host)
            node = self.cluster.add_node(wait=wait, dashboard_agent_listen_port=_free_port(), **WORKER)
        if wait:
            self.cluster.wait_for_nodes()
        return node

    def remove_worker(self, node) -> None:
        self.cluster.remove_node(node, allow_graceful=False)

    def driver_env(self, **extra) -> dict:
        return {**os.environ, **{k: v for k, v in self.env.items() if v is not None}, "RAY_ADDRESS": self.address,
                **extra}

    def stop(self) -> None:
        try:
            self.cluster.shutdown()
        finally:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for pid in _processes_under(self.temp):
                    with contextlib.suppress(OSError):
                        os.kill(pid, sig)
                time.sleep(1)
            shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(s3):
    nodes = SimulatedCluster(s3)
    try:
        yield nodes
    finally:
        nodes.stop()


def cluster_config(images: str, out: str) -> dict:
    """The issue's shape: the trained encoder, sharded kNN, small batches (many tasks)."""
    if not os.path.exists(ENCODER):
        pytest.fail(f"{ENCODER} is part of the repository")
    data = demo_config("/unused", out, budget=60)
    data["input"] = {"images": os.path.join(images, "images"), "labels": os.path.join(images, "labels.csv")}
    data["selections"][1]["budget"] = 20
    data["selections"][2]["budget"] = 60
    data["embedder"] = {"model": "torchscript", "weights": ENCODER, "image_size": 32, "batch_size": 16}
    data["decode"] = {"batch_size": 16}
    data["knn"] = {"exact_below": 500, "shards": 2}
    data["report"] = {"map_method": "pca", "thumbnails": 50}
    data["store"] = {"enabled": False}
    return data


@pytest.fixture(scope="module")
def single_node(ray_local, demo_set, tmp_path_factory):
    """The same input and config on this process's one-node Ray: the answers to match."""
    from curation.job import run_job

    root, _ = demo_set
    out = str(tmp_path_factory.mktemp("single-node"))
    result = run_job(load_config(data=cluster_config(root, out)))
    return result.run_uri, root


def manifests(run: str, images_root: str, fs=None) -> dict:
    """samples and selections as pandas frames, URIs relative to the image root (the runs
    read the same files from a folder or from S3)."""
    fs = fs or pafs.LocalFileSystem()
    out = {}
    tables = {"samples": pq.read_table(f"{run}/samples", filesystem=fs)}
    for info in fs.get_file_info(pafs.FileSelector(f"{run}/selections")):
        tables[info.base_name] = pq.read_table(info.path, filesystem=fs)
    prefix = images_root.rstrip("/") + "/"
    for name, table in tables.items():
        # vector_id: where a vector sits in storage; fingerprint: size and mtime as the store reports them
        frame = table.drop_columns([c for c in ("vector_id", "fingerprint") if c in table.column_names]).to_pandas()
        for column in frame.columns:  # uri, dup_of, and reasons that name another item
            if frame[column].dtype.kind not in "fiub":
                frame[column] = frame[column].map(lambda v: v.replace(prefix, "") if isinstance(v, str) else v)
        out[name] = frame
    return out


def assert_same_answers(a: dict, b: dict) -> None:
    """Discrete columns equal, floats within 1e-5."""
    assert a.keys() == b.keys()
    for name in a:
        left, right = a[name], b[name]
        assert list(left.columns) == list(right.columns), name
        assert len(left) == len(right), name
        for column in left.columns:
            if left[column].dtype.kind == "f":
                x, y = left[column].to_numpy(np.float64), right[column].to_numpy(np.float64)
                assert np.array_equal(np.isnan(x), np.isnan(y)), f"{name}.{column} nulls differ"
                assert np.allclose(x, y, rtol=0, atol=1e-5, equal_nan=True), f"{name}.{column} differs"
            else:
                assert left[column].equals(right[column]), f"{name}.{column} differs"


def error_lines(log: str) -> list[str]:
    """E-level lines (Ray core's ``[... E pid tid]`` and Python's ``ERROR``), and Ray Data's
    'will hang' warning, minus Ray Data's own actor-pool notice and the host-disk monitor
    (see above)."""
    bad = []
    for line in log.splitlines():
        if re.search(r"\d E \d+ \d+\]", line) and RAY_DATA_POOL_NOTICE not in line \
                and HOST_DISK_NOTICE not in line:
            bad.append(line)
        elif " ERROR " in line or "will hang" in line:
            bad.append(line)
    return bad


def start_driver(cluster: SimulatedCluster, config: dict, folder: str, *, prefix: list[str] | None = None,
                 env: dict | None = None) -> tuple[subprocess.Popen, str]:
    path = os.path.join(folder, "curation.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(config, fh)
    log = os.path.join(folder, "driver.log")
    proc = subprocess.Popen([*(prefix or []), os.path.join(BIN, "curation"), "run", "--config", path],
                            env=env or cluster.driver_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc, log


def finish(proc: subprocess.Popen, log: str, timeout: float = 240) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"the driver did not finish within {timeout} s:\n" + open(log).read()[-3000:])
    return open(log).read()


def wait_for(predicate, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def submit(cluster: SimulatedCluster, submission_id: str, config_uri: str) -> subprocess.CompletedProcess:
    """``ray job submit`` of the job's entrypoint, as on a cluster whose image has the project
    installed (retried while the head's job agent is still starting: it answers 'No
    available agent' for a few seconds after the head).

    Without ``--working-dir``: the simulated nodes share one session folder on this machine,
    so each node's runtime-env agent would unpack the uploaded package into the same path,
    replacing the driver's copy under it mid-run (on a real cluster each node has its own disk).
    """
    deadline = time.monotonic() + 90
    while True:
        done = subprocess.run([os.path.join(BIN, "ray"), "job", "submit", "--address", cluster.dashboard,
                               "--submission-id", submission_id, "--",
                               "python", os.path.join(ROOT, "jobs", "curate.py"), "run", "--config", config_uri],
                              env=cluster.driver_env(), capture_output=True, text=True, timeout=420)
        if "No available agent" not in done.stderr or time.monotonic() > deadline:
            return done
        time.sleep(2)


# ------------------------------------------------------------------------------------ tests


def test_ray_job_submit_on_three_nodes_gives_the_single_node_answers(cluster, s3, demo_set, single_node):
    from ray.job_submission import JobSubmissionClient

    root, truth = demo_set
    fs = s3.pyarrow_fs()
    fs.create_dir("multinode")
    upload_folder(fs, root, "multinode/raw")
    config = cluster_config("s3://multinode/raw", "s3://multinode/out")
    config["input"]["labels"] = "raw/labels.csv"  # relative to the config's own location
    with fs.open_output_stream("multinode/curation.yaml") as fh:
        fh.write(yaml.safe_dump(config).encode())
    done = submit(cluster, "curation-3-nodes", "s3://multinode/curation.yaml")
    assert "curation-3-nodes" in done.stdout + done.stderr, done.stdout[-2000:] + done.stderr[-2000:]
    client = JobSubmissionClient(cluster.dashboard)
    logs = client.get_job_logs("curation-3-nodes")
    assert done.returncode == 0 and client.get_job_status("curation-3-nodes") == "SUCCEEDED", logs[-4000:]

    with fs.open_input_stream("multinode/out/latest") as fh:
        run_id = json.loads(fh.read())["run_id"]
    check_run_outputs(fs, "multinode/out", run_id, images_uri="s3://multinode/raw/images", truth=truth,
                      selection_names=SELECTIONS)
    info = json.loads(fs.open_input_stream(f"multinode/out/{run_id}/run.json").read())
    assert info["knn"]["shards"] == 2
    single_run, _ = single_node
    assert_same_answers(manifests(single_run, root), manifests(f"multinode/out/{run_id}", "s3://multinode/raw", fs))
    # the summary, never the credentials, and no false alarm
    assert f"run {run_id}: " in logs and s3.secret_key not in logs
    assert error_lines(logs) == []


def test_a_bad_config_fails_the_submitted_job_with_its_one_line_error(cluster, s3):
    from ray.job_submission import JobSubmissionClient

    fs = s3.pyarrow_fs()
    fs.create_dir("multinode")
    with fs.open_output_stream("multinode/bad.yaml") as fh:
        fh.write(yaml.safe_dump({"input": {"images": "s3://multinode/none"}, "output": {"uri": "s3://multinode/o"},
                                 "knn": {"k": 0}}).encode())
    done = submit(cluster, "curation-bad", "s3://multinode/bad.yaml")
    assert done.returncode != 0
    client = JobSubmissionClient(cluster.dashboard)
    assert client.get_job_status("curation-bad") == "FAILED"
    errors = [line for line in client.get_job_logs("curation-bad").splitlines() if line.startswith("curation: error:")]
    assert errors and "knn.k" in errors[0]


def test_an_impossible_request_fails_at_once_with_one_line(cluster, demo_set, tmp_path):
    root, _ = demo_set
    config = cluster_config(root, str(tmp_path / "out"))
    config["embedder"]["device"] = "cuda"  # no node has a GPU, and none may join
    proc, log = start_driver(cluster, config, str(tmp_path))
    text = finish(proc, log, timeout=120)
    assert proc.returncode == 2, text[-2000:]
    errors = [line for line in text.splitlines() if line.startswith("curation: error:")]
    assert len(errors) == 1, text[-2000:]
    assert "embedder.device=cuda" in errors[0] and "1 CPU + 1 GPU" in errors[0] and "2 x (1 CPU" in errors[0]
    assert not os.path.exists(tmp_path / "out" / "latest")


def test_an_input_only_the_driver_sees_fails_preflight_naming_the_node(cluster, demo_set, tmp_path):
    """The driver runs in its own mount namespace, where the images sit on a private tmpfs."""
    if shutil.which("unshare") is None:
        pytest.skip("util-linux's unshare is not installed")
    root, _ = demo_set
    private = str(tmp_path / "driver-only")
    os.makedirs(private)
    config = cluster_config(private, str(tmp_path / "out"))
    script = (f"mount -t tmpfs none {private} && cp -r {root}/. {private}/ && exec \"$@\"")
    proc, log = start_driver(cluster, config, str(tmp_path),
                             prefix=["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh"])
    text = finish(proc, log, timeout=120)
    if proc.returncode != 2 and "mount" in text[:500]:
        pytest.skip(f"no private mount here: {text[:200]}")
    errors = [line for line in text.splitlines() if line.startswith("curation: error:")]
    assert proc.returncode == 2 and errors, text[-2000:]
    assert "node " in errors[0] and "input.images" in errors[0] and private in errors[0]


def test_a_node_lost_mid_search_leaves_the_graph_exact(cluster, tmp_path):
    """At the ``sharded_knn`` level: two shards on two nodes, one node removed while the
    queries run (a replacement joins first); the restarted shard refills from the source and
    the graph equals an undisturbed search's."""
    from curation.index.knn import exact_knn

    script = tmp_path / "knn_driver.py"
    script.write_text(textwrap.dedent(f"""
        import logging, sys
        import numpy as np, ray
        sys.path.insert(0, {ROOT!r})
        from curation.index import sharded
        from curation.index.params import IndexParams
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
        ray.init(logging_level="WARNING")  # RAY_ADDRESS
        x = np.random.default_rng(0).normal(size=(10_000, 32)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        params = IndexParams(kind="flat", codec="flat", nlist=0, nprobe=0, train_size=0, shards=2)
        clean, _ = sharded.sharded_knn(x, 5, params, query_batch=250)
        print("undisturbed search done", flush=True)
        graph, timing = sharded.sharded_knn(x, 5, params, query_batch=250)
        np.savez({str(tmp_path / 'graph.npz')!r}, ids=graph.ids, sims=graph.sims, clean_ids=clean.ids,
                 clean_sims=clean.sims)
        print("done", timing["shard_sizes"], flush=True)
    """))
    log = tmp_path / "knn.log"
    proc = subprocess.Popen([sys.executable, str(script)], env=cluster.driver_env(), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    def searching() -> bool:
        text = log.read_text()
        return "kNN search:" in text.split("undisturbed search done", 1)[-1] and "undisturbed search done" in text

    wait_for(lambda: searching() or proc.poll() is not None, "the second search to start")
    assert proc.poll() is None, log.read_text()[-2000:]
    cluster.workers.append(cluster.add_worker())
    lost = cluster.workers.pop(0)
    cluster.remove_worker(lost)
    text = finish(proc, str(log), timeout=180)
    assert proc.returncode == 0 and "done" in text, text[-3000:]

    graph = np.load(tmp_path / "graph.npz")
    assert np.array_equal(graph["ids"], graph["clean_ids"]) and np.array_equal(graph["sims"], graph["clean_sims"])
    # ... and both are the exact graph (a flat index searched in two halves and merged)
    x = np.random.default_rng(0).normal(size=(10_000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    exact = exact_knn(x, 5)
    assert (graph["ids"] == exact.ids).mean() > 0.999 and np.allclose(graph["sims"], exact.sims, atol=1e-5)


def test_a_node_lost_mid_embedding_is_survived_and_a_node_that_joins_is_used(cluster, demo_set, single_node,
                                                                             tmp_path):
    from ray.util.state import list_tasks

    root, truth = demo_set
    out = str(tmp_path / "out")
    proc, log = start_driver(cluster, cluster_config(root, out), str(tmp_path))
    # Mid-embedding: the pool is up and blocks are flowing (16-image batches, ~20 of them).
    wait_for(lambda: "embedding actor pool" in open(log).read() or proc.poll() is not None, "the embedding phase")
    time.sleep(1.5)
    assert proc.poll() is None and not glob.glob(os.path.join(out, "*", "_SUCCESS")), open(log).read()[-2000:]
    joined = cluster.add_worker()  # what an autoscaler does
    cluster.workers.append(joined)
    lost = cluster.workers.pop(0)
    cluster.remove_worker(lost)
    removed_at = time.strftime("%H:%M:%S")
    text = finish(proc, log)
    assert proc.returncode == 0, text[-4000:]
    embedded_at = re.search(r"^(\d\d:\d\d:\d\d) INFO curation.job: phase decode_embed done", text, re.M).group(1)
    assert embedded_at >= removed_at, "the node was removed after the embedding phase"

    run = text.strip().splitlines()[-1]
    check_run_outputs(pafs.LocalFileSystem(), out, os.path.basename(run), images_uri=os.path.join(root, "images"),
                      truth=truth, selection_names=SELECTIONS)
    single_run, _ = single_node
    assert_same_answers(manifests(single_run, root), manifests(run, root))
    # one part per block of vectors, whatever was retried: name order is vector order
    parts = sorted(os.listdir(os.path.join(run, "embeddings")))
    rows = [pq.read_metadata(os.path.join(run, "embeddings", p)).num_rows for p in parts]
    ok = pq.read_table(os.path.join(run, "samples"), columns=["status"])["status"].to_pylist().count("ok")
    assert sum(rows) == ok
    # the node that joined mid-run ran some of the run's tasks
    ran_there = list_tasks(address=cluster.dashboard, filters=[("node_id", "=", joined.node_id)], limit=10_000,
                           raise_on_missing_output=False)
    assert ran_there, "no task ran on the node that joined"
