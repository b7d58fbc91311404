"""The only module that builds the Ray Data graph and sizes actor pools.

inputs table -> decode (CPU tasks) -> embed (autoscaling actor pool) -> materialised dataset.
"""

from __future__ import annotations

import logging
import math
import os

import pyarrow as pa
import ray

from curation.config import Config
from curation.io.filesystem import Resolver
from curation.stages.decode import DecodeStage
from curation.stages.embed import EmbedStage

log = logging.getLogger(__name__)

TARGET_ROWS_PER_BLOCK = 256


def init_ray(config: Config) -> bool:
    """Connect to ``RAY_ADDRESS`` when set, reuse a running Ray, else start a local one.

    Returns True when this call started Ray (so the caller should shut it down).
    """
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    kwargs: dict = {"logging_level": logging.WARNING, "log_to_driver": True}
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
    return True


def embed_pool_size(config: Config) -> dict:
    """Actor-pool sizing that always leaves CPU for read/decode tasks.

    With GPUs: one actor per GPU. On CPU: actors take one CPU each and at most half the
    cluster's CPUs, so on a 2-CPU node exactly one actor runs and decoding keeps the other
    (two CPU actors there deadlock the pipeline).
    """
    resources = ray.cluster_resources()
    cpus = int(resources.get("CPU", 1))
    gpus = int(resources.get("GPU", 0))
    device = config.embedder.device
    use_gpu = gpus > 0 and device in ("auto", "cuda")
    if use_gpu:
        limit = gpus
        per_actor = {"num_gpus": 1, "num_cpus": 1}
    else:
        limit = max(1, cpus // 2)
        per_actor = {"num_cpus": 1}
    max_size = config.embedder.max_actors or limit
    max_size = max(1, min(max_size, limit))
    min_size = min(config.embedder.min_actors, max_size)
    return {"min_size": min_size, "max_size": max_size, "per_actor": per_actor,
            "device": "cuda" if use_gpu else "cpu"}


def decode_and_embed(inputs: pa.Table, config: Config, resolver: Resolver) -> ray.data.Dataset:
    """Build decode -> embed (lazy; executed by :func:`collect_table`). Pixels are dropped."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = log.isEnabledFor(logging.INFO)
    n = inputs.num_rows
    blocks = max(1, math.ceil(n / TARGET_ROWS_PER_BLOCK))
    ds = ray.data.from_arrow(inputs)
    if blocks > 1:
        ds = ds.repartition(blocks)
    # Decoding runs as stateless CPU tasks (the stage holds no model), so Ray Data can scale
    # them with the available CPUs and keep them apart from the embedding actors.
    decode = DecodeStage(
        resolver=resolver,
        image_size=config.embedder.image_size,
        max_pixels=config.decode.max_pixels,
        background=tuple(config.decode.background),
    )
    ds = ds.map_batches(
        _decode_batch,
        fn_kwargs={"stage": decode},
        batch_size=config.decode.batch_size,
        batch_format="numpy",
        num_cpus=DecodeStage.num_cpus,
        # Declaring the decode memory also keeps Ray Data from fusing these tasks into the
        # embedding actors (it fuses ops with identical resource requests), so decoding runs
        # on its own CPUs and the model never waits on a serial decode in the same process.
        memory=DecodeStage.memory_bytes,
    )
    pool = embed_pool_size(config)
    log.info("embedding actor pool: %d..%d actors on %s", pool["min_size"], pool["max_size"], pool["device"])
    ds = ds.map_batches(
        EmbedStage,
        fn_constructor_kwargs={
            "model": config.embedder.model,
            "weights": config.embedder.weights,
            "image_size": config.embedder.image_size,
            "device": pool["device"],
            "precision": config.embedder.precision,
            "num_threads": int(pool["per_actor"].get("num_cpus", 1)),
            "resolver": resolver,
        },
        compute=ray.data.ActorPoolStrategy(min_size=pool["min_size"], max_size=pool["max_size"]),
        batch_size=config.embedder.batch_size,
        batch_format="numpy",
        **pool["per_actor"],
    )
    return ds


def _decode_batch(batch, stage: DecodeStage):
    return stage(batch)


def collect_table(ds: ray.data.Dataset) -> pa.Table:
    """Pull the materialised blocks into one Arrow table on the driver, in input order."""
    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    table = pa.concat_tables(tables, promote_options="permissive")
    return table.sort_by("input_id")
