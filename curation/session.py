"""The run's one Ray session, and the sizing rules that depend on the cluster.

* :func:`needs_ray` is the single decision whether a run uses Ray at all: images always do (Ray
  Data decodes and embeds them); precomputed embeddings do when the kNN graph is sharded.
* :func:`ray_session` connects once per run (``RAY_ADDRESS``, an already running Ray, or a
  local Ray it starts and stops) and never reconnects between phases.
* :func:`run_tasks` runs a function over a list of arguments as Ray tasks when Ray is up, in
  process otherwise: the vector passes (validation, cluster assignment) use it, so the driver
  never holds the vectors.
* :class:`ClusterShape` is the one place that sizes tasks and actors: every request (CPUs,
  GPUs, memory) is capped at what one node holds (:meth:`ClusterShape.fit`), from the alive
  nodes and the node types the autoscaler may add; a request nothing can host fails at once
  (:class:`InfeasibleRequest`). :func:`stage_requests`, :func:`shard_request` and
  :func:`training_request` are pure functions of a shape, unit-tested without a cluster.
* :func:`check_cluster` is the cluster's preflight (requests, and every node reaching the
  input and output); :class:`StallWatchdog` fails a run in which nothing finishes while work
  waits for resources (``cluster.stall_timeout_s``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from curation.config import ClusterConfig, Config, EmbedderConfig

log = logging.getLogger(__name__)

GIB = 1024**3


class ClusterError(RuntimeError):
    """The cluster cannot run this job as configured; the message is one line naming the
    request (or node and path) and what the cluster has."""


class InfeasibleRequest(ClusterError):
    """A task or actor that no node, and no node type the cluster may add, can host."""


class ClusterStalled(ClusterError):
    """Nothing finished for ``cluster.stall_timeout_s`` while work waited for resources."""


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
        """From Ray's alive nodes and autoscaler config (without Ray: this machine)."""
        import ray

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
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception as exc:  # an internal API: its absence must not fail the run
        log.debug("no autoscaler config: %s", exc)
        return []
    if config is None:
        return []
    return [(_node_shape(dict(group.resources)), int(group.max_count)) for group in config.node_group_configs]


def needs_ray(config: Config, n_items: int) -> bool:
    """Whether this run needs Ray: images are decoded and embedded by Ray Data; precomputed
    embeddings only need it for the sharded kNN index (see :mod:`curation.index.params`)."""
    if not config.input.embeddings:
        return True
    knn = config.knn
    return knn.index == "ivf" or knn.shards > 1 or (knn.index == "auto" and n_items >= knn.exact_below)


@contextlib.contextmanager
def ray_session(config: Config, *, needed: bool = True) -> Iterator[bool]:
    """Connect to Ray once for the whole run. Yields whether Ray is up.

    Connects to ``RAY_ADDRESS`` when set (``ray job submit`` sets it; ``auto`` joins the
    machine's running cluster on purpose), reuses a Ray already initialised in this process
    (tests, notebooks) and otherwise starts a new local Ray with ``ray.num_cpus`` /
    ``ray.object_store_memory`` -- whatever else runs on the machine: without an address,
    ``ray.init()`` would join the cluster last started here (Ray's ``ray_current_cluster``
    file) -- which it shuts down on exit (so a local run leaves no Ray process behind).
    """
    if not needed:
        yield False
        return
    import ray

    if ray.is_initialized():
        with watch_for_stalls(config):
            yield True
        return
    address = os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
        log.info("connected to Ray at %s", address)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        if config.ray.num_cpus:
            kwargs["num_cpus"] = config.ray.num_cpus
        if config.ray.object_store_memory:
            kwargs["object_store_memory"] = config.ray.object_store_memory
        ray.init(address="local", include_dashboard=False, **kwargs)
        log.info("started a local Ray (%s CPUs)", ray.cluster_resources().get("CPU"))
    # A local Ray is this process's to clean up, even if this process is killed (SIGKILL skips
    # every finally): a watchdog process kills what is left of it then.
    reaper = None if address else _start_reaper()
    try:
        with watch_for_stalls(config):
            yield True
    finally:
        ray.shutdown()
        if reaper is not None:
            reaper.terminate()


STALL_SIGNAL = signal.SIGUSR2  # raised in the main thread by the stall watchdog (see watch_for_stalls)


@contextlib.contextmanager
def watch_for_stalls(config: Config) -> Iterator[None]:
    """Run the body under a :class:`StallWatchdog` (``cluster.stall_timeout_s``); a stall
    surfaces as :class:`ClusterStalled` instead of the interrupt that stopped the body."""
    import threading

    watchdog = StallWatchdog(config.cluster.stall_timeout_s)
    previous = None
    if watchdog.timeout_s > 0 and threading.current_thread() is threading.main_thread():
        # A signal of our own, so that a library's SIGINT handler (which may not raise) cannot
        # swallow the stall; Python runs the handler in this thread, inside ray.get's wait. It
        # raises what Ray expects from an interrupted wait (KeyboardInterrupt, which Ray cleans
        # up after); below it becomes ClusterStalled.
        def stalled(signum, frame):
            raise KeyboardInterrupt

        previous = signal.signal(STALL_SIGNAL, stalled)
        watchdog.signum = STALL_SIGNAL
    try:
        with watchdog:
            yield
    except KeyboardInterrupt:
        if watchdog.message is None:
            raise
        raise ClusterStalled(watchdog.message) from None
    finally:
        if previous is not None:
            signal.signal(STALL_SIGNAL, previous)


def _start_reaper():
    if not os.path.isdir("/proc"):  # the watchdog reads /proc (Linux); elsewhere, Ray's own cleanup
        return None
    from curation import reaper

    return reaper.start()


def run_tasks(fn: Callable, args: Sequence[tuple], *, max_in_flight: int = 0, request: Request | None = None) -> list:
    """``[fn(*a) for a in args]``, as Ray tasks when Ray is initialised, in process otherwise.

    At most ``max_in_flight`` run at once (0 = one per cluster CPU, re-read as tasks finish,
    so nodes that join while the step runs are used). ``request``: each task's resources
    (default 1 CPU; size it with :meth:`ClusterShape.fit`). Results keep the order of
    ``args``; only the (compact) results come back to the caller.
    """
    import ray

    if not ray.is_initialized() or not args:
        return [fn(*a) for a in args]
    remote = ray.remote(**(request or Request(1)).options())(fn)
    results: list = [None] * len(args)
    pending: dict = {}
    for i, a in enumerate(args):
        while len(pending) >= (max_in_flight or _live_cpus()):
            done, _ = ray.wait(list(pending), num_returns=1)
            results[pending.pop(done[0])] = ray.get(done[0])
            progress.tick()
        pending[remote.remote(*a)] = i
    for ref, i in pending.items():
        results[i] = ray.get(ref)
        progress.tick()
    return results


def _live_cpus() -> int:
    """The cluster's CPUs now (cheap: Ray's cached totals, no node list or autoscaler read)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 0)))


def gpu_request(shape: ClusterShape) -> float:
    """GPUs a step that can use one (cuML k-means, the probe, UMAP) asks for: 1 when the cluster
    has a GPU node now and cuML is installed on this driver's image, else 0 (a GPU node that
    may start later is not worth waiting for: these steps run on CPU too)."""
    if not shape.gpus:
        return 0
    import importlib.util

    return 1 if importlib.util.find_spec("cuml") is not None else 0


def training_request(what: str, threads: int, shape: ClusterShape | None = None) -> Request:
    """One multi-threaded training step (index quantiser, k-means, label probe): ``threads``
    CPUs capped at one node's, with a GPU beside them when :func:`gpu_request` says so."""
    shape = shape or ClusterShape.current()
    return shape.fit(what, cpus=threads, gpus=gpu_request(shape))


def stage_requests(embedder: EmbedderConfig, shape: ClusterShape, *, decode_memory: float) -> dict:
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


# --------------------------------------------------------------------- progress and stalls


class Progress:
    """Counts work finished on the driver's side (task results, search batches, Ray Data
    blocks); the stall watchdog reads it. Thread-safe enough: one writer at a time, and a
    missed increment only delays a stall verdict."""

    def __init__(self):
        self.count = 0
        self.streaming = False  # a Ray Data execution is running: it should finish tasks

    def tick(self, n: int = 1) -> None:
        self.count += n


progress = Progress()


class StallWatchdog:
    """Fails a run in which nothing finishes while work waits for resources.

    Every ``poll_s`` it takes a snapshot: :data:`progress`, the cluster's pending resource
    demands (the autoscaler's view, from the GCS), its free CPUs and GPUs and its node count.
    A stall is ``timeout_s`` of identical snapshots while work waits: demands pending (tasks
    asking for resources nobody releases: a request too big for every node) or a Ray Data
    stream running without finishing a task (it submits only what fits, so an actor pool
    holding the last CPU shows no demand). A long task with nothing waiting is not a stall,
    and neither is waiting while the cluster changes (a node starting). On a stall the main thread is interrupted and
    :func:`ray_session` raises :class:`ClusterStalled` listing what waits.
    """

    def __init__(self, timeout_s: float, *, poll_s: float | None = None):
        import threading

        self.timeout_s = timeout_s
        self.poll_s = poll_s or max(0.5, min(30.0, timeout_s / 10))
        self.message: str | None = None
        self.signum = signal.SIGINT  # watch_for_stalls installs a handler of its own when it can
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="curation-stall-watchdog", daemon=True)

    def __enter__(self) -> "StallWatchdog":
        if self.timeout_s > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        import _thread
        import time

        last, since = None, time.monotonic()
        while not self._stop.wait(self.poll_s):
            try:
                demands, snapshot = self._snapshot()
            except Exception as exc:  # the GCS briefly unreachable is not a stall
                log.debug("stall watchdog: no snapshot (%s)", exc)
                continue
            now = time.monotonic()
            if snapshot != last or not (demands or progress.streaming):
                last, since = snapshot, now
                continue
            if now - since >= self.timeout_s:
                waiting = demands or "a Ray Data stream that finishes no task (no demand pending)"
                self.message = (f"no progress for {now - since:.0f} s (cluster.stall_timeout_s={self.timeout_s:g}) "
                                f"while work waits for resources: {waiting}; {ClusterShape.current().describe()}")
                log.error("%s", self.message)
                _thread.interrupt_main(self.signum)
                return

    def _snapshot(self):
        import ray

        demands = pending_demands()
        free = sorted((k, round(v, 3)) for k, v in ray.available_resources().items() if k in ("CPU", "GPU"))
        return demands, (progress.count, demands, tuple(free), len(ray.nodes()))


def pending_demands() -> str:
    """The resource requests waiting in the cluster, as one phrase (``2 x {'CPU': 4.0}``)."""
    import ray
    from ray.autoscaler.v2.sdk import get_cluster_status

    status = get_cluster_status(ray.get_runtime_context().gcs_address)
    parts = []
    for demand in status.resource_demands.ray_task_actor_demand + status.resource_demands.placement_group_demand:
        for bundle in getattr(demand, "bundles_by_count", []):
            parts.append(f"{bundle.count} x {dict(bundle.bundle)}")
    return ", ".join(parts)


# ------------------------------------------------------------------- the cluster's preflight


def check_cluster(config: Config, resolver, *, images: bool, n_items: int) -> ClusterShape:
    """Before any work on a Ray cluster: every request the run will make fits a node (or a
    node type that may join), and every alive node reads the input and writes the output.

    Raises:
        InfeasibleRequest: naming the request and the cluster's nodes.
        NodeCannotReach: naming the node and the path.
    """
    from curation.index.params import choose_params
    from curation.stages.decode import DecodeStage

    shape = ClusterShape.current(config.cluster)
    if images:
        stage_requests(config.embedder, shape, decode_memory=DecodeStage.memory_bytes)
    training_request("k-means training", 1, shape)
    if needs_ray(config, n_items):
        params = choose_params(n_items, 1, config.knn, cpus=shape.cpus)
        if params.shards > 1 or params.kind == "ivf":
            shard_request(params.shards, shape)
    uris = [(key, uri) for key, uri in (("input.images", config.input.images), ("input.manifest", config.input.manifest),
                                        ("input.labels", config.input.labels),
                                        ("input.embeddings", config.input.embeddings)) if uri]
    if shape.may_grow:
        for key, uri in uris + [("output.uri", config.output.uri)]:
            if not resolver.resolve(uri).uri.startswith("s3://"):
                log.warning("%s is a local path (%s) and this cluster may add nodes: every node that joins must "
                            "see it at the same path (a shared mount), or use s3://", key, uri)
    if config.cluster.check_nodes:
        check_nodes(resolver, uris, ("output.uri", config.output.uri))
    log.info("cluster: %s", shape.describe())
    return shape


class NodeCannotReach(ClusterError):
    """An alive node cannot read an input or write the output (a path only the driver sees)."""


NODE_CHECK_TIMEOUT_S = 120


def check_nodes(resolver, inputs: list[tuple[str, str]], output: tuple[str, str]) -> None:
    """One zero-CPU task pinned to every alive node reads each input and writes (then deletes)
    a probe file under the output. Raises :class:`NodeCannotReach` for the first failure."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    probe = ray.remote(num_cpus=0)(_reach)
    refs = [(node, probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
             .remote(resolver, inputs, output, node["NodeID"])) for node in nodes]
    for node, ref in refs:
        try:
            problem = ray.get(ref, timeout=NODE_CHECK_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            problem = f"the check did not finish within {NODE_CHECK_TIMEOUT_S} s"
        except ray.exceptions.RayError as exc:  # the node died meanwhile: its work moves elsewhere
            log.warning("node %s: the reachability check did not run (%s)", node["NodeID"][:12],
                        str(exc).splitlines()[0][:200])
            continue
        if problem:
            raise NodeCannotReach(f"node {node['NodeID'][:12]} ({node.get('NodeManagerAddress')}): {problem}; "
                                  f"every node must see the input and the output (use s3:// or a shared mount)")


def _reach(resolver, inputs: list[tuple[str, str]], output: tuple[str, str], node_id: str) -> str | None:
    """On one node: None when every input is readable and the output writable, else why not."""
    import pyarrow.fs as pafs

    for key, uri in inputs:
        try:
            location = resolver.resolve(uri)
            if location.filesystem.get_file_info(location.path).type == pafs.FileType.NotFound:
                return f"cannot read {key} {uri}: not found there"
        except Exception as exc:
            return f"cannot read {key} {uri}: {str(exc).splitlines()[0][:200]}"
    key, uri = output
    try:
        location = resolver.resolve(uri)
        probe = location.child(f".node-check-{node_id[:16]}")
        location.filesystem.create_dir(location.path, recursive=True)
        with location.filesystem.open_output_stream(probe.path) as fh:
            fh.write(b"ok")
        location.filesystem.delete_file(probe.path)
    except Exception as exc:
        return f"cannot write {key} {uri}: {str(exc).splitlines()[0][:200]}"
    return None
