"""The run's one Ray session: connecting, watching for stalls, and running tasks.

* :func:`needs_ray` is the single decision whether a run uses Ray at all: images always do (Ray
  Data decodes and embeds them); precomputed embeddings do when the kNN graph is sharded (the
  index parameters decide that: :func:`curation.index.params.choose_params`).
* :func:`ray_session` connects once per run (``RAY_ADDRESS``, or a new local Ray it starts and
  stops) and never reconnects between phases.
* :func:`run_tasks` runs a function over a list of arguments as Ray tasks when Ray is up, in
  process otherwise: the vector passes (validation, cluster assignment) use it, so the driver
  never holds the vectors.
* :func:`check_cluster` is the cluster's preflight (every request the run makes fits a node,
  and every node reaches the input and output); :class:`StallWatchdog` fails a run in which
  nothing finishes while work waits for resources (``cluster.stall_timeout_s``).

What each task and actor asks for is decided in :mod:`curation.sizing`, never here.
"""

from __future__ import annotations

import _thread
import contextlib
import logging
import os
import signal
from typing import Any, Callable, Iterator, Sequence
import threading
import time
import pyarrow.fs as pafs

from curation.config import Config
from curation.index.params import choose_params
from curation.sizing import (ONE_CPU, WAITING, ClusterError, ClusterShape, Request, run_cluster, shard_request,
                             stage_requests, training_request)

log = logging.getLogger(__name__)


class ClusterStalled(ClusterError):
    """Nothing finished for ``cluster.stall_timeout_s`` while work waited for resources."""


def needs_ray(config: Config, n_items: int) -> bool:
    """Whether this run needs Ray: images are decoded and embedded by Ray Data; precomputed
    embeddings only need it for the sharded kNN index (an IVF index, or more than one shard:
    the index parameters the kNN phase will use, before the cluster's CPUs are known)."""
    if not config.input.embeddings:
        return True
    params = choose_params(n_items, 1, config.knn, cpus=1)
    return params.kind == "ivf" or params.shards > 1


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
        with run_cluster(config.cluster), watch_for_stalls(config):
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
        with run_cluster(config.cluster), watch_for_stalls(config):
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
    from curation import reaper  # a process of its own: only a local Ray needs one

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
    remote = ray.remote(**(request or ONE_CPU).options())(fn)
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

    shape = ClusterShape.current(config.cluster)
    if images:
        stage_requests(config.embedder, shape)
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
    probe = ray.remote(**WAITING.options())(_reach)
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
