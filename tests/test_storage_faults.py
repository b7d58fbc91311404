"""Storage faults: the job against the real S3 server through a fault-injecting proxy.

Transient faults (503 SlowDown, 500, connection resets, delays) on reads and writes are
retried with backoff and change nothing in the outputs; a permanent failure fails the run
naming what could not be written, and publishes nothing.
"""

from __future__ import annotations

import json

import pyarrow.fs as pafs
import pytest

from curation.config import load_config
from curation.demo import demo_config
from curation.job import run_job
from testkit.faultproxy import FaultProxy
from tests.conftest import upload_folder
from tests.test_faults import assert_same_manifests, manifests

BUCKET = "shared-tests"


def _config(s3, endpoint: str, prefix: str) -> dict:
    data = demo_config("/unused", f"s3://{BUCKET}/{prefix}/out", budget=60)
    data["input"] = {"images": f"s3://{BUCKET}/{prefix}/raw/images", "labels": f"s3://{BUCKET}/{prefix}/raw/labels.csv"}
    data["selections"][1]["budget"] = 10
    data["selections"][2]["budget"] = 40
    data["report"] = {"map_method": "pca", "thumbnails": 100}
    data["storage"] = {**s3.storage(), "endpoint_url": endpoint}
    return data


@pytest.fixture(scope="module")
def uploaded(s3, demo_set):
    fs = s3.pyarrow_fs()
    fs.create_dir(BUCKET)
    root, _ = demo_set
    upload_folder(fs, root, f"{BUCKET}/storage-faults/raw")
    return fs


def test_transient_s3_faults_are_retried_and_change_nothing(ray_local, s3, uploaded):
    fs = uploaded
    clean = run_job(load_config(data=_config(s3, s3.url, "storage-faults")))
    # A few percent: each 503 or 500 costs the client ~1.4 s of backoff (the AWS SDK's standard
    # retry mode), and a few dozen faults of every kind are enough to show they change nothing.
    with FaultProxy(s3.url, rate=0.03, delay_s=0.1, seed=3) as proxy:
        data = _config(s3, proxy.url, "storage-faults")
        data["output"]["uri"] = f"s3://{BUCKET}/storage-faults/out-faulty"
        faulty = run_job(load_config(data=data))
    # Every kind of fault happened, on reads and on writes, and the run still completed.
    assert all(proxy.counts[f] >= 3 for f in ("slowdown", "internal", "reset", "delay")), proxy.counts
    assert proxy.counts["requests"] > 200
    info = faulty.run_info
    assert info["counts"] == clean.run_info["counts"]
    latest = json.loads(fs.open_input_stream(f"{BUCKET}/storage-faults/out-faulty/latest").read())
    assert latest["run_id"] == faulty.run_id
    assert_same_manifests(manifests(f"{BUCKET}/storage-faults/out/{clean.run_id}", fs),
                          manifests(f"{BUCKET}/storage-faults/out-faulty/{faulty.run_id}", fs))


@pytest.mark.parametrize("methods", [(), ("PUT", "POST")], ids=["outage", "writes-refused"])
def test_permanent_s3_failure_fails_clearly_and_publishes_nothing(ray_local, s3, uploaded, methods):
    """Every request to the output fails (at preflight), or only writes do (mid-run, from the
    workers writing vectors): either way the run fails naming the output, and no latest."""
    fs = uploaded
    output = f"{BUCKET}/storage-faults/out-broken-{len(methods)}"
    with FaultProxy(s3.url, rate=0.0, permanent=f"/{output}/", permanent_methods=methods) as proxy:
        data = _config(s3, proxy.url, "storage-faults")
        data["output"]["uri"] = f"s3://{output}"
        data["storage"]["max_attempts"] = 3  # bounded: the failure arrives after 3 tries each
        with pytest.raises(Exception) as failure:
            run_job(load_config(data=data))
    assert proxy.counts["permanent"] > 0
    message = str(failure.value)
    assert f"storage-faults/out-broken-{len(methods)}" in message, message  # it names where it failed
    assert s3.secret_key not in message and s3.access_key not in message
    assert fs.get_file_info(f"{output}/latest").type == pafs.FileType.NotFound
