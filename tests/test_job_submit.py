"""The path our users take: a real Ray head (`ray start --head`), `ray job submit --working-dir`
with the config in S3 and the data in the test S3 server, outputs checked with the contract
helpers; a bad config ends FAILED with its one-line error in `ray job logs`. The head is
stopped by its own process ids (never `ray stop`, which would take down every Ray here)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

from curation.demo import demo_config
from tests.conftest import upload_folder
from tests.contract import check_run_outputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")
SELECTIONS = ["train", "edge_cases", "label_review", "clean"]


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _processes_under(marker: str) -> list[int]:
    """PIDs whose command line mentions ``marker`` (the head's own temp dir)."""
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


@pytest.fixture(scope="module")
def ray_head(s3):
    """A Ray head on 127.0.0.1 with its dashboard (the job server), on free ports, whose
    processes carry the S3 test server's credentials in their environment."""
    if not os.path.exists(RAY):
        pytest.fail(f"the ray CLI is missing from {RAY}: ray[default] is a dependency")
    temp = tempfile.mkdtemp(prefix="rh-", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dashboard, agent_http, agent_grpc, runtime_env, metrics, node_manager, object_manager = _free_ports(8)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "AWS_ENDPOINT_URL": s3.url, "AWS_ACCESS_KEY_ID": s3.access_key,
           "AWS_SECRET_ACCESS_KEY": s3.secret_key, "AWS_REGION": "us-east-1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    # As from an activated virtualenv: the job's `python` is the one Ray and the project live in.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["VIRTUAL_ENV"] = os.path.dirname(os.path.dirname(sys.executable))
    command = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--include-dashboard=true",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
               f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
               f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
               "--num-cpus=2", "--object-store-memory=300000000", f"--temp-dir={temp}", "--disable-usage-stats"]
    started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        address = f"http://127.0.0.1:{dashboard}"
        yield address, env
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _processes_under(temp):
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            time.sleep(2)
        shutil.rmtree(temp, ignore_errors=True)


def _submit(address: str, env: dict, *args: str, timeout: int = 420) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, "job", "submit", "--address", address, "--working-dir", ROOT, *args],
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_ray_job_submit_runs_the_job_on_a_ray_head(ray_head, s3, demo_set):
    address, env = ray_head
    root, truth = demo_set
    fs = s3.pyarrow_fs()
    fs.create_dir("shared-tests")  # one bucket, a prefix per test
    upload_folder(fs, root, "shared-tests/submit/raw")
    config = demo_config("/unused", "s3://shared-tests/submit/out", budget=60)
    config["input"] = {"images": "s3://shared-tests/submit/raw/images", "labels": "raw/labels.csv"}  # relative to the config
    config["selections"][1]["budget"] = 10
    config["selections"][2]["budget"] = 40
    with fs.open_output_stream("shared-tests/submit/curation.yaml") as fh:
        fh.write(yaml.safe_dump(config).encode())

    done = _submit(address, env, "--submission-id", "curation-ok", "--",
                   "python", "jobs/curate.py", "run", "--config", "s3://shared-tests/submit/curation.yaml")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = _client(address)
    assert client.get_job_status("curation-ok") == "SUCCEEDED"
    run_id = _latest(fs, "shared-tests/submit/out")
    samples = check_run_outputs(fs, "shared-tests/submit/out", run_id, images_uri="s3://shared-tests/submit/raw/images",
                                truth=truth, selection_names=SELECTIONS)
    assert samples.num_rows > 0 and samples["label"].null_count < samples.num_rows  # labels via the relative path
    # the job's log shows the run summary, never the credentials
    logs = client.get_job_logs("curation-ok")
    assert f"s3://shared-tests/submit/out/{run_id}" in logs
    # ... after the one-screen summary
    assert f"run {run_id}: " in logs and "  selections: train " in logs and "  flags: " in logs
    assert s3.secret_key not in logs


def test_a_bad_config_fails_the_job_with_its_one_line_error(ray_head, s3):
    address, env = ray_head
    fs = s3.pyarrow_fs()
    fs.create_dir("shared-tests")
    with fs.open_output_stream("shared-tests/submit-bad/curation.yaml") as fh:
        fh.write(yaml.safe_dump({"input": {"images": "s3://shared-tests/submit-bad/none"},
                                 "output": {"uri": "s3://shared-tests/submit-bad/out"}, "knn": {"k": 0}}).encode())
    done = _submit(address, env, "--submission-id", "curation-bad", "--",
                   "python", "jobs/curate.py", "run", "--config", "s3://shared-tests/submit-bad/curation.yaml", timeout=240)
    assert done.returncode != 0
    client = _client(address)
    assert client.get_job_status("curation-bad") == "FAILED"
    logs = client.get_job_logs("curation-bad")
    errors = [line for line in logs.splitlines() if line.startswith("curation: error:")]
    assert errors and "knn.k" in errors[0], logs[-2000:]


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def _latest(fs, output: str) -> str:
    import json

    with fs.open_input_stream(f"{output}/latest") as fh:
        return json.loads(fh.read())["run_id"]
