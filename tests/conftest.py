"""Session fixtures: one real local Ray, one real S3 server on loopback, one small demo set."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Real reference data (MNIST, CIFAR-10); tests that need it skip when it is absent.
SHARED_DATA = os.environ.get("CURATION_TEST_DATA") or os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


# Tests that need a real Ray, the S3 server, a subprocess or a browser are `integration`:
# `make test-fast` runs the rest. A test is one when it uses these fixtures (directly or
# through another fixture), or when its module says so with `pytestmark`.
INTEGRATION_FIXTURES = {"ray_local", "s3", "cluster", "local_run", "undisturbed", "report_run"}


# `make test` runs two pytest-xdist workers, whole files each (`--dist loadfile`), so a file's
# module fixtures (a job run its tests share) run once. (`--dist loadgroup` with xdist_group
# marks did not group at all under pytest 9.2: xdist 3.8 tags a test's group by assigning the
# `_nodeid` attribute pytest no longer reads; tests/test_structure.py checks the grouping.)
# Files are handed out in the order of this list, then the rest in collection order: the
# longest first, so that no long file starts last (times of one suite run on this two-core box).
LONGEST_FIRST = ("test_multinode", "test_faults", "test_end_to_end", "test_ingestion", "test_storage_faults",
                 "test_knn", "test_bad_input", "test_phases", "test_objects", "test_label_studio",
                 "test_objects_nightly", "test_incremental", "test_report", "test_decode_torch", "test_embedders")


def file_rank(module: str) -> int:
    return LONGEST_FIRST.index(module) if module in LONGEST_FIRST else len(LONGEST_FIRST)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
    # a stable sort: the tests of a file keep their order
    items.sort(key=lambda item: file_rank(item.module.__name__.rsplit(".", 1)[-1]))


@pytest.fixture(scope="session")
def ray_local():
    import ray

    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    # Idle workers are kept (Ray keeps as many as CPUs by default): the many small runs of a
    # test session then find workers that have imported torch, scikit-learn and UMAP (whose
    # numba functions compile in each new process, ~8 s) instead of starting new ones.
    ray.init(address="local", num_cpus=2, object_store_memory=256 * 1024 * 1024, include_dashboard=False,
             _temp_dir=temp_dir, _node_ip_address="127.0.0.1", logging_level="WARNING",
             _system_config={"num_workers_soft_limit": 8})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def s3():
    from testkit.s3server import S3Server

    server = S3Server()
    endpoint = server.start()
    endpoint.server = server
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def demo_set(tmp_path_factory):
    """A small labelled set with planted defects (about 300 files) and its truth record."""
    from curation.demo import make_demo_dataset

    root = str(tmp_path_factory.mktemp("demo-set"))
    truth = make_demo_dataset(root, n=240, seed=7, defect_scale=0.25)
    return root, truth


def upload_folder(fs, local_root: str, bucket_path: str) -> None:
    """Copy a local folder to ``bucket/prefix`` on a pyarrow filesystem."""
    for folder, _, files in os.walk(local_root):
        for name in files:
            local = os.path.join(folder, name)
            rel = os.path.relpath(local, local_root)
            with open(local, "rb") as src, fs.open_output_stream(f"{bucket_path}/{rel}") as dst:
                dst.write(src.read())


FLIPS = (3, 13, 23, 33, 43)  # items of class 'a' that flipped_labels_set labels 'b'


def flipped_labels_set(folder, *, review_budget: int) -> tuple[dict, list[str]]:
    """300 embeddings in three classes a/b/c with five planted flips (``FLIPS``), written to
    ``folder/emb.parquet``; returns a config dict with one ``label_review`` selection and the uris."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(12)
    centers = rng.normal(size=(3, 16)) * 3
    x = np.concatenate([c + 0.3 * rng.normal(size=(100, 16)) for c in centers]).astype(np.float32)
    labels = ["abc"[i // 100] for i in range(300)]
    for i in FLIPS:
        labels[i] = "b"
    uris = [f"s3://lake/{i}.jpg" for i in range(300)]
    pq.write_table(pa.table({"uri": uris, "label": labels,
                             "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 16)}),
                   os.path.join(folder, "emb.parquet"))
    data = {"input": {"embeddings": os.path.join(folder, "emb.parquet")}, "report": {"map_method": "pca"},
            "output": {"uri": os.path.join(folder, "out")},
            "selections": [{"name": "label_review", "mode": "label_review", "budget": review_budget}]}
    return data, uris
