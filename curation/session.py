"""The run's one Ray session, and the sizing rules that depend on the cluster.

* :func:`needs_ray` is the single decision whether a run uses Ray at all: images always do (Ray
  Data decodes and embeds them); precomputed embeddings do when the kNN graph is sharded.
* :func:`ray_session` connects once per run (``RAY_ADDRESS``, an already running Ray, or a
  local Ray it starts and stops) and never reconnects between phases.
* :func:`run_tasks` runs a function over a list of arguments as Ray tasks when Ray is up, in
  process otherwise: the vector passes (validation, cluster assignment) use it, so the driver
  never holds the vectors.
* :func:`embed_pool_size` and :func:`shard_count` are pure functions of the cluster's CPUs and
  GPUs and the config, so they are unit-tested without a cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from curation.config import Config, EmbedderConfig

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ClusterResources:
    """CPUs and GPUs the run may use (Ray's cluster resources; without Ray, this machine's CPUs)."""

    cpus: int
    gpus: int

    @classmethod
    def current(cls) -> "ClusterResources":
        import ray

        if not ray.is_initialized():
            return cls(os.cpu_count() or 1, 0)
        resources = ray.cluster_resources()
        return cls(max(1, int(resources.get("CPU", 1))), int(resources.get("GPU", 0)))


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

    Connects to ``RAY_ADDRESS`` when set, reuses a Ray already initialised in this process (tests,
    notebooks) and otherwise starts a local Ray with ``ray.num_cpus`` / ``ray.object_store_memory``,
    which it shuts down on exit (so a local run leaves no Ray process behind).
    """
    if not needed:
        yield False
        return
    import ray

    if ray.is_initialized():
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
        ray.init(include_dashboard=False, **kwargs)
        log.info("started a local Ray (%s CPUs)", ray.cluster_resources().get("CPU"))
    # A local Ray is this process's to clean up, even if this process is killed (SIGKILL skips
    # every finally): a watchdog process kills what is left of it then.
    reaper = None if address else _start_reaper()
    try:
        yield True
    finally:
        ray.shutdown()
        if reaper is not None:
            reaper.terminate()


def _start_reaper():
    if not os.path.isdir("/proc"):  # the watchdog reads /proc (Linux); elsewhere, Ray's own cleanup
        return None
    from curation import reaper

    return reaper.start()


def run_tasks(fn: Callable, args: Sequence[tuple], *, max_in_flight: int = 0, num_cpus: float = 1,
              num_gpus: float = 0) -> list:
    """``[fn(*a) for a in args]``, as Ray tasks when Ray is initialised (at most
    ``max_in_flight`` at once; 0 = one per cluster CPU), in process otherwise. Results keep the
    order of ``args``; only the (compact) results come back to the caller."""
    import ray

    if not ray.is_initialized() or not args:
        return [fn(*a) for a in args]
    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(fn)
    limit = max_in_flight or ClusterResources.current().cpus
    results: list = [None] * len(args)
    pending: dict = {}
    for i, a in enumerate(args):
        if len(pending) >= limit:
            done, _ = ray.wait(list(pending), num_returns=1)
            results[pending.pop(done[0])] = ray.get(done[0])
        pending[remote.remote(*a)] = i
    for ref, i in pending.items():
        results[i] = ray.get(ref)
    return results


def embed_pool_size(embedder: EmbedderConfig, resources: ClusterResources) -> dict:
    """Embedding actor pool bounds and per-actor resources.

    With GPUs: one actor per GPU, one CPU each; an explicit ``max_actors`` is honoured even above
    the GPUs present now, because an autoscaling cluster adds GPU workers when actors wait for
    them. On CPU: one CPU per actor and at most half the CPUs, so reading and decoding always
    keep CPUs (two CPU actors on a 2-CPU node deadlock the pipeline); an explicit ``max_actors``
    is capped there for the same reason.
    """
    use_gpu = embedder.device == "cuda" or (embedder.device == "auto" and resources.gpus > 0)
    if use_gpu:
        max_size = embedder.max_actors or max(1, resources.gpus)
        per_actor = {"num_gpus": 1, "num_cpus": 1}
    else:
        limit = max(1, resources.cpus // 2)
        max_size = min(embedder.max_actors or limit, limit)
        per_actor = {"num_cpus": 1}
    min_size = min(embedder.min_actors, max_size)
    return {"min_size": min_size, "max_size": max_size, "per_actor": per_actor,
            "device": "cuda" if use_gpu else "cpu"}


def shard_count(requested: int, n_items: int, resources: ClusterResources) -> int:
    """Index shard actors: ``knn.shards`` when set, else one per 2 cluster CPUs; never more
    than there are items, never fewer than one."""
    shards = requested or max(1, resources.cpus // 2)
    return max(1, min(shards, max(1, n_items)))
