"""Every task and actor sized to fit one node (no Ray: shapes are plain values)."""

from __future__ import annotations

import pytest

from curation.config import ClusterConfig, EmbedderConfig
from curation.sizing import (GIB, ClusterShape, InfeasibleRequest, NodeShape, shard_count, shard_request,
                              stage_requests, training_request)

HEAD = NodeShape(0, 0, 8 * GIB)  # KubeRay's recommended head: schedules, runs no task


def cluster(*nodes: NodeShape, groups=(), config: ClusterConfig | None = None) -> ClusterShape:
    return ClusterShape.from_reports(tuple(nodes), list(groups), config)


def test_a_training_task_asks_for_at_most_one_nodes_cpus():
    # The hang: 2 workers x 2 CPUs, a 0-CPU head; the task asked min(8, 4 total) = 4 CPUs.
    shape = cluster(HEAD, NodeShape(2), NodeShape(2))
    assert shape.cpus == 4
    assert training_request("k-means", 8, shape).cpus == 2
    assert training_request("k-means", 8, cluster(HEAD, NodeShape(1), NodeShape(1))).cpus == 1
    assert training_request("k-means", 8, cluster(NodeShape(16), NodeShape(4))).cpus == 8
    assert training_request("k-means", 8, cluster(NodeShape(4), NodeShape(6))).cpus == 6


def test_a_cpu_and_gpu_request_fits_one_gpu_node():
    shape = cluster(HEAD, NodeShape(32), NodeShape(4, 1))
    request = shape.fit("probe", cpus=8, gpus=1)
    assert (request.cpus, request.gpus) == (4, 1)  # the GPU node's CPUs, not the big CPU node's


def test_existing_nodes_are_preferred_to_node_types_that_may_join():
    shape = cluster(HEAD, NodeShape(2), groups=[(NodeShape(16), 10)])
    assert shape.fit("train", cpus=8).cpus == 2  # never wait for a bigger node to start
    assert shape.max_cpus == 160 and shape.cpus == 2
    # ... but a GPU request with no GPU node up yet (a GPU group at 0 replicas) fits the type.
    gpu = cluster(HEAD, NodeShape(4), groups=[(NodeShape(8, 1), 4)])
    assert gpu.fit("embed", cpus=1, gpus=1).gpus == 1


def test_an_impossible_request_names_itself_and_the_cluster():
    shape = cluster(HEAD, NodeShape(2), NodeShape(2))
    with pytest.raises(InfeasibleRequest) as info:
        stage_requests(EmbedderConfig(device="cuda"), shape, decode_memory=GIB)
    message = str(info.value)
    assert "embedder.device=cuda" in message and "1 CPU + 1 GPU" in message and "2 x (2 CPU)" in message
    assert "\n" not in message
    with pytest.raises(InfeasibleRequest, match="decode task"):  # memory no node has
        stage_requests(EmbedderConfig(), cluster(NodeShape(4, 0, 0.5 * GIB)), decode_memory=GIB)
    with pytest.raises(InfeasibleRequest):
        cluster(HEAD).fit("anything", cpus=1)  # a head alone runs nothing


def test_cluster_keys_describe_the_largest_node_that_may_join():
    keys = ClusterConfig(max_node_cpus=8, max_node_gpus=1)
    shape = cluster(HEAD, NodeShape(2), config=keys)
    assert shape.may_grow and shape.has_gpus
    pool = stage_requests(EmbedderConfig(device="cuda"), shape, decode_memory=GIB)
    assert pool["device"] == "cuda" and pool["actor"].gpus == 1
    assert pool["calls"] == 2  # Ray Data batches beside the GPU's batch; CPU actors take one call
    assert stage_requests(EmbedderConfig(), ClusterShape.single(2), decode_memory=GIB)["calls"] == 1


def test_cpu_embedding_pool_leaves_every_node_room_to_decode():
    pool = stage_requests(EmbedderConfig(), ClusterShape.single(2), decode_memory=GIB)
    assert (pool["min_size"], pool["max_size"], pool["device"]) == (1, 1, "cpu")
    assert pool["actor"].cpus + pool["decode"].cpus <= 2
    # An explicit max above half the CPUs is capped: two CPU actors on 2 CPUs starve the readers.
    assert stage_requests(EmbedderConfig(max_actors=4), ClusterShape.single(2), decode_memory=GIB)["max_size"] == 1
    assert stage_requests(EmbedderConfig(), ClusterShape.single(16), decode_memory=GIB)["max_size"] == 8
    # One-CPU nodes: an actor restarted on the node left after a loss must not take its only CPU.
    small = stage_requests(EmbedderConfig(), cluster(HEAD, NodeShape(1), NodeShape(1)), decode_memory=GIB)
    assert small["actor"].cpus + small["decode"].cpus <= 1
    assert small["decode"].memory == GIB
    # A cluster that may grow sizes its pool for the CPUs it may reach.
    grows = stage_requests(EmbedderConfig(), cluster(HEAD, NodeShape(2), groups=[(NodeShape(4), 5)]), decode_memory=GIB)
    assert grows["max_size"] == 10


def test_gpu_pool_counts_gpus_that_may_join_and_honours_max_actors():
    shape = cluster(HEAD, NodeShape(8), groups=[(NodeShape(8, 1), 6)])
    pool = stage_requests(EmbedderConfig(), shape, decode_memory=GIB)
    assert (pool["device"], pool["max_size"], pool["actor"].gpus, pool["actor"].cpus) == ("cuda", 6, 1, 1)
    assert stage_requests(EmbedderConfig(max_actors=2), shape, decode_memory=GIB)["max_size"] == 2
    assert stage_requests(EmbedderConfig(device="cpu"), shape, decode_memory=GIB)["device"] == "cpu"


def test_shards_share_the_cpus_with_threads_within_one_node():
    request, threads, use_gpu = shard_request(2, cluster(HEAD, NodeShape(1), NodeShape(1)))
    assert (request.cpus, threads, use_gpu) == (1, 1, False)
    request, threads, _ = shard_request(2, cluster(HEAD, NodeShape(4), NodeShape(4), NodeShape(4), NodeShape(4)))
    assert (request.cpus, threads) == (1, 4)  # 16 CPUs / 2 shards = 8 threads, but a node has 4
    request, threads, _ = shard_request(4, ClusterShape.single(2))
    assert (request.cpus, threads) == (0.5, 1)


def test_shard_count():
    assert shard_count(0, 1_000_000, 16) == 8
    assert shard_count(3, 1_000_000, 2) == 3
    assert shard_count(0, 1, 16) == 1


def test_within_a_run_every_shape_is_read_under_the_runs_cluster_keys(monkeypatch):
    """A step deep in the job (an index shard, the map's task) asks ClusterShape.current() with
    no config: it still sees the run's cluster.max_node_* (ray_session holds them)."""
    import ray

    from curation import sizing

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}])
    monkeypatch.setattr(sizing, "_autoscaler_node_groups", lambda: [])
    assert not sizing.ClusterShape.current().may_grow
    with sizing.run_cluster(ClusterConfig(max_node_cpus=16, max_node_gpus=1)):
        shape = sizing.ClusterShape.current()
        assert shape.may_grow and shape.has_gpus
    assert not sizing.ClusterShape.current().may_grow
