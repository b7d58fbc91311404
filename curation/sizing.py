"""Sizing: the one place that decides what every Ray task and actor asks for.

* :class:`ClusterShape` holds the nodes a run may use (alive now, and the node types the
  autoscaler may add, or the ``cluster.max_node_*`` keys); every request (CPUs, GPUs, memory)
  is capped at what one node holds (:meth:`ClusterShape.fit`), and a request nothing can host
  fails at once (:class:`InfeasibleRequest`).
* :func:`stage_requests`, :func:`shard_request`, :func:`training_request` and
  :func:`shard_count` are pure functions of a shape, unit-tested without a cluster.
* :data:`TRAIN_THREADS`: the CPUs a multi-threaded training step (index quantiser, k-means,
  label probe) asks for, at most one node's.

Every ``num_cpus=``/``num_gpus=``/``memory=`` the job passes to Ray comes from here
(``Request.options()``); a test fails when one is written anywhere else.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator
from dataclasses import dataclass
import importlib.util

from curation.config import ClusterConfig, EmbedderConfig

log = logging.getLogger(__name__)

_RUN_CLUSTER: list[ClusterConfig] = []  # the running job's cluster keys (see run_cluster)


@contextlib.contextmanager
def run_cluster(cluster: ClusterConfig) -> Iterator[None]:
    """Within the body, every :meth:`ClusterShape.current` sizes under the job's ``cluster.*``
    keys (``ray_session`` holds it for the run), however deep the step that asks."""
    _RUN_CLUSTER.append(cluster)
    try:
        yield
    finally:
        _RUN_CLUSTER.pop()


TRAIN_THREADS = 8  # CPUs a training step asks for (capped at one node's by training_request)
# One batch of decoded images and PIL's working set, over the worker's libraries: Ray Data
# measured decode workers at up to 734 MiB resident on a 16-CPU GPU node (torch's pages included).
DECODE_TASK_MEMORY = 1024**3

GIB = 1024**3


class ClusterError(RuntimeError):
    """The cluster cannot run this job as configured; the message is one line naming the
    request (or node and path) and what the cluster has."""


class InfeasibleRequest(ClusterError):
    """A task or actor that no node, and no node type the cluster may add, can host."""


@dataclass(frozen=True)
class Resources:
    """CPUs, GPUs and bytes of memory (0 = none, or not reported): what one node offers Ray,
    or what one task or actor asks of it (``ray.remote(**request.options())``)."""

    cpus: float
    gpus: float = 0
    memory: float = 0

    def describe(self) -> str:
        text = f"{self.cpus:g} CPU"
        if self.gpus:
            text += f" + {self.gpus:g} GPU"
        if self.memory:
            text += f", {self.memory / GIB:.1f} GiB"
        return text

    @property
    def threads(self) -> int:
        """Threads a step running under this request should use: one per whole CPU reserved."""
        return max(1, int(self.cpus))

    def options(self) -> dict:
        out: dict = {"num_cpus": self.cpus, "num_gpus": self.gpus}
        if self.memory:
            out["memory"] = int(self.memory)
        return out


NodeShape = Resources  # what a node offers
Request = Resources  # what a task or actor asks for

ONE_CPU = Request(1)  # a single-threaded step: a vector read, a standardised sample
WAITING = Request(0)  # a task that mostly waits on actors or storage (kNN queries, node probes):
#                       it takes no CPU slot, the actors it calls hold theirs


@dataclass(frozen=True)
class ClusterShape:
    """The nodes a run may use, which every task and actor is sized from.

    ``nodes`` are the alive nodes now; ``node_types`` what the cluster may add (the
    autoscaler's node groups when Ray reports them, or the largest node the
    ``cluster.max_node_*`` keys describe). Parallelism follows the cluster's totals, but every
    single request is capped at what one node holds: Ray never splits a task over nodes, and a
    request no node can hold waits forever.
    """

    nodes: tuple[NodeShape, ...]
    node_types: tuple[NodeShape, ...] = ()
    potential_cpus: float = 0  # the most CPUs the cluster may hold (autoscaler limits); 0 = now
    potential_gpus: float = 0

    @classmethod
    def single(cls, cpus: float, gpus: float = 0, memory: float = 0) -> "ClusterShape":
        """One node (a laptop, a unit test)."""
        return cls((NodeShape(cpus, gpus, memory),))

    @classmethod
    def current(cls, cluster: ClusterConfig | None = None) -> "ClusterShape":
        """From Ray's alive nodes and autoscaler config (without Ray: this machine), under
        ``cluster`` (default: the running job's ``cluster`` keys, see :func:`run_cluster`)."""
        import ray

        cluster = cluster or (_RUN_CLUSTER[-1] if _RUN_CLUSTER else None)

        if not ray.is_initialized():
            return cls.single(os.cpu_count() or 1)
        nodes = tuple(_node_shape(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive"))
        return cls.from_reports(nodes, _autoscaler_node_groups(), cluster)

    @classmethod
    def from_reports(cls, nodes: tuple[NodeShape, ...], groups: list[tuple[NodeShape, int]],
                     cluster: ClusterConfig | None = None) -> "ClusterShape":
        """``groups``: the autoscaler's node types and their max counts."""
        types = [shape for shape, _ in groups]
        potential_cpus = sum(shape.cpus * count for shape, count in groups)
        potential_gpus = sum(shape.gpus * count for shape, count in groups)
        if cluster is not None and (cluster.max_node_cpus or cluster.max_node_gpus or cluster.max_node_memory):
            types.append(NodeShape(cluster.max_node_cpus, cluster.max_node_gpus, cluster.max_node_memory))
        return cls(tuple(nodes), tuple(types), potential_cpus, potential_gpus)

    @property
    def cpus(self) -> int:
        """CPUs of the alive nodes (at least 1: a 0-CPU head alone still sizes pools)."""
        return max(1, int(sum(n.cpus for n in self.nodes)))

    @property
    def gpus(self) -> int:
        return int(sum(n.gpus for n in self.nodes))

    @property
    def may_grow(self) -> bool:
        return bool(self.node_types)

    @property
    def has_gpus(self) -> bool:
        """GPUs now, or a node type with GPUs the autoscaler may start."""
        return self.gpus > 0 or any(t.gpus > 0 for t in self.node_types)

    @property
    def max_cpus(self) -> int:
        """CPUs now or, when more may join, the most the cluster may hold."""
        return max(self.cpus, int(self.potential_cpus))

    @property
    def max_gpus(self) -> int:
        return max(self.gpus, int(self.potential_gpus))

    @property
    def min_worker_cpus(self) -> float:
        """CPUs of the smallest node that runs CPU work (a 0-CPU head runs none)."""
        cpus = [n.cpus for n in self.nodes + self.node_types if n.cpus > 0]
        return min(cpus) if cpus else 1

    def fit(self, what: str, *, cpus: float, gpus: float = 0, memory: float = 0,
            min_cpus: float | None = None) -> Request:
        """The request for ``what``: ``cpus`` capped at the largest node that can host it (with
        ``gpus`` and ``memory`` on the same node), never below ``min_cpus`` (default: ``cpus``
        or 1, whichever is less). Nodes that exist are preferred to node types that may join,
        so a multi-threaded step never waits for a bigger node to be started.

        Raises:
            InfeasibleRequest: no node and no node type can host it; the message names
                ``what``, the request and the nodes.
        """
        floor = min(cpus, 1) if min_cpus is None else min_cpus

        def hosts(shapes):
            return [n for n in shapes if n.cpus >= floor and n.gpus >= gpus and (not memory or not n.memory
                                                                                  or n.memory >= memory)]

        candidates = hosts(self.nodes) or hosts(self.node_types)
        if not candidates:
            raise InfeasibleRequest(f"{what} needs {NodeShape(floor, gpus, memory).describe()} on one node, "
                                    f"but {self.describe()}")
        return Request(max(floor, min(cpus, max(n.cpus for n in candidates))), gpus, memory)

    def describe(self) -> str:
        """One phrase: the alive nodes and the node types that may join."""
        groups: dict[tuple, list[float]] = {}
        for node in self.nodes:
            groups.setdefault((node.cpus, node.gpus), []).append(node.memory)
        listed = []
        for (cpus, gpus), memory in sorted(groups.items(), reverse=True):
            text = NodeShape(cpus, gpus).describe()
            if max(memory):
                low, high = min(memory) / GIB, max(memory) / GIB
                text += f", {low:.1f} GiB" if high - low < 0.05 else f", {low:.1f}-{high:.1f} GiB"
            listed.append(f"{len(memory)} x ({text})")
        text = "the cluster has " + (", ".join(listed) or "no node")
        if self.node_types:
            text += "; node types that may join: " + ", ".join(f"({t.describe()})" for t in self.node_types)
        else:
            text += " and reports no node type it may add (see cluster.max_node_*)"
        return text


def _node_shape(resources: dict) -> NodeShape:
    return NodeShape(float(resources.get("CPU", 0)), float(resources.get("GPU", 0)),
                     float(resources.get("memory", 0)))


def _autoscaler_node_groups() -> list[tuple[NodeShape, int]]:
    """The autoscaler's node types and max counts, as it reported them to the GCS (autoscaler
    v2, KubeRay); empty when it reports none (a fixed cluster, or autoscaler v1)."""
    try:
        # Internal: the GCS's cluster config (autoscaler v2 node groups) has no public reader;
        # ray.autoscaler.v2.sdk's status lists nodes, not the types that may be added.
        # tests/test_ray_internals.py fails when it moves.
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception as exc:  # an internal API: its absence must not fail the run
        log.debug("no autoscaler config: %s", exc)
        return []
    if config is None:
        return []
    return [(_node_shape(dict(group.resources)), int(group.max_count)) for group in config.node_group_configs]


def gpu_request(shape: ClusterShape) -> float:
    """GPUs a step that can use one (cuML k-means, the probe, UMAP) asks for: 1 when the cluster
    has a GPU node now and cuML is installed on this driver's image, else 0 (a GPU node that
    may start later is not worth waiting for: these steps run on CPU too)."""
    if not shape.gpus:
        return 0

    return 1 if importlib.util.find_spec("cuml") is not None else 0


def training_request(what: str, threads: int, shape: ClusterShape | None = None) -> Request:
    """One multi-threaded training step (index quantiser, k-means, label probe): ``threads``
    CPUs capped at one node's, with a GPU beside them when :func:`gpu_request` says so."""
    shape = shape or ClusterShape.current()
    return shape.fit(what, cpus=threads, gpus=gpu_request(shape))


def stage_requests(embedder: EmbedderConfig, shape: ClusterShape, *, decode_memory: float = DECODE_TASK_MEMORY) -> dict:
    """Resources and pool bounds of the two Ray Data stages, sized together.

    * **GPU** (``device: cuda``, or ``auto`` when the cluster has or may add GPU nodes): one
      actor per GPU with one CPU beside it on the same node; ``max_actors`` (default: every GPU
      the cluster has or may add) bounds the pool. Each GPU actor takes two calls at once
      (``calls``: Ray Data's ``max_concurrent_calls_per_actor``): the model still runs one batch at
      a time, while Ray Data batches the next batch's input and the last one's output beside it
      instead of with the GPU idle.
    * **CPU**: at most half the cluster's CPUs (now, or as many as it may grow to) run embedding
      actors, so decoding always keeps CPUs. Every CPU node must hold one actor *and* one decode
      task at once — otherwise an actor restarted on a one-CPU node left after a node loss would
      starve decoding there — so on nodes of fewer than 2 CPUs both ask for half a CPU.

    Returns:
        ``{"min_size", "max_size", "actor": Request, "decode": Request, "device", "calls"}``.

    Raises:
        InfeasibleRequest: e.g. ``device: cuda`` on a cluster with no GPU node, now or later.
    """
    use_gpu = embedder.device == "cuda" or (embedder.device == "auto" and shape.has_gpus)
    decode_cpus = 1.0
    if use_gpu:
        actor = shape.fit(f"an embedding actor (embedder.device={embedder.device}, GPU)", cpus=1, gpus=1)
        max_size = embedder.max_actors or max(1, shape.max_gpus)
    else:
        cpu_actor = 1.0 if shape.min_worker_cpus >= 2 else 0.5
        decode_cpus = cpu_actor
        actor = shape.fit("an embedding actor (CPU)", cpus=cpu_actor)
        limit = max(1, shape.max_cpus // 2)
        max_size = min(embedder.max_actors or limit, limit)
    decode = shape.fit("a decode task (decode.batch_size images in memory)", cpus=decode_cpus, memory=decode_memory)
    return {"min_size": min(embedder.min_actors, max_size), "max_size": max_size, "actor": actor,
            "decode": decode, "device": "cuda" if use_gpu else "cpu", "calls": 2 if use_gpu else 1}


def shard_count(requested: int, n_items: int, cpus: int) -> int:
    """Index shard actors: ``knn.shards`` when set, else one per 2 cluster CPUs; never more
    than there are items, never fewer than one."""
    shards = requested or max(1, cpus // 2)
    return max(1, min(shards, max(1, n_items)))


def shard_request(shards: int, shape: ClusterShape) -> tuple[Request, int, bool]:
    """Each index shard actor's resources, its FAISS threads and whether it uses a GPU: the
    cluster's CPUs shared among the shards (at most one CPU reserved each, so the query tasks
    and other steps keep room), threads at most one node's CPUs."""
    use_gpu = shape.gpus >= shards
    threads = max(1, min(shape.cpus // shards, int(max(n.cpus for n in shape.nodes) or 1)))
    request = shape.fit("a kNN index shard actor", cpus=min(1.0, shape.cpus / shards), gpus=1 if use_gpu else 0,
                        min_cpus=min(1.0, shape.cpus / shards))
    return request, threads, use_gpu
