"""The curation job as a sequence of phases; each returns a new value for the next and none
edits an earlier phase's result (the README's *Pipeline* lists them, as ``run.json`` →
``timings_s`` names them):

    preflight ─► cluster_check ─► ingest ─► corrections ─► [objects] ─► knn ─► scores ─► write_knn ─► drift
    ─► leakage ─► selections ─► report_data ─► publish

* **preflight** (:mod:`curation.preflight`, before any work): inputs reachable, the model
  checked, the inputs listed, every ``where`` dry-run, corrections parsed, the previous
  published run resolved once (:class:`~curation.published_run.PublishedRun`).
* **ingest**: the vectors of every ok item end up in storage (``embeddings/`` written by Ray Data
  on the workers, or the ``input.embeddings`` files); the driver keeps one compact row per input.
* **objects** (detection runs, ``input.annotations``): the boxes placed on their decoded images
  (:mod:`curation.objects`).
* **knn**: the kNN graphs (exact in process, or FAISS shards on Ray actors reading storage).
* **scores** / **selections**: from the compact rows and the graph; vectors are fetched only as
  bounded samples or one class at a time, or scanned by Ray tasks where they are stored.
  ``knn/`` is written right after the scores, so the graphs are freed before the selections.
* **publish** (:mod:`curation.publish`): samples, selections, diff, report, run.json, then
  ``_SUCCESS`` and ``latest``.

The run holds one Ray session from ingest to the report (:func:`curation.session.ray_session`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.config import Config
from curation.index.knn import KnnGraph
from curation.index.source import VectorParts, parquet_parts
from curation.select import build_selections
from curation.io import inputs as inputs_io, outputs
from curation.io.filesystem import Resolver
from curation.io.store import EmbeddingStore
from curation.report import prepare_report
from curation.report.box_map import box_map_coordinates
from curation.published_run import PublishedRun
from curation.schema import is_ok
from curation.session import check_cluster, needs_ray, ray_session, run_tasks

from curation.clock import Clock
from curation.preflight import Plan, preflight  # noqa: F401 (public here too)
from curation.publish import (NothingToPublish, PublishConflict, RunResult, Scored,  # noqa: F401
                              publish)
from curation.drift import drift_phase, profile_sample_ids
from curation.scores.label_quality import probe_sample_ids
from curation.index.incremental import neighbour_graph
from curation.scores import run_scores
from curation.corrections import apply_corrections, read_answers
from curation.leakage import find_leaks, split_values
from curation.crop_store import CropStore, CropWork, copy_stored_crops, plan_crops
from curation.object_vectors import joined_to_samples
from curation.objects import (ObjectVectors, PlacedObjects, objects_summary, place_objects,
                              read_object_vectors, with_object_vectors)
from curation.object_profile import leaked_boxes
from curation.object_scores import CropGraph, per_image, score_objects
from curation.index.sharded import knn_graph
from curation.run_layout import OBJECT_EMBEDDINGS_FOLDER
log = logging.getLogger(__name__)


@dataclass
class Ingested:
    """One compact row per input (sorted by ``input_id``; ok rows carry ``vector_id``) and where
    the ok rows' vectors are stored (vector id i = i-th vector of ``vectors``)."""

    samples: pa.Table
    vectors: VectorParts  # after the kNN phase, possibly a CachedVectors in front of it
    embedder: dict
    copies: VectorParts | None = None  # the copy descriptors (same ids); None without pixels
    snapshot: object | None = None  # the embedding store's new snapshot (StagedSnapshot), named once published
    crops: ObjectVectors | None = None  # detection runs: the boxes' crop vectors as stored


@dataclass
class Neighbours:
    graph: KnnGraph | None  # released once the scores have used it and knn/ is written
    info: dict
    copy_graph: KnnGraph | None = None  # among the copy descriptors (images mode)


def run_job(config: Config, *, resolver: Resolver | None = None, plan: Plan | None = None) -> RunResult:
    """Run the whole job; returns after ``_SUCCESS`` and ``latest`` are written."""
    resolver = resolver or Resolver(config.storage)
    clock = Clock()
    with clock.phase("preflight"):
        plan = plan or preflight(config, resolver)
    log.info("run %s -> %s (%d inputs)", plan.run_id, plan.run.uri, plan.count)
    if plan.count == 0:
        raise NothingToPublish("no input items found; nothing published, latest unchanged")
    with ray_session(config, needed=needs_ray(config, plan.count)) as with_ray:
        if with_ray:
            with clock.phase("cluster_check"):
                check_cluster(config, resolver, images=plan.inputs is not None, n_items=plan.count)
        ingested = ingest(plan, config, resolver, clock)
        with clock.phase("corrections"):
            ingested, corrections = _apply_corrections(plan, config, resolver, ingested)
        if plan.objects is not None:
            with clock.phase("objects"):
                ingested, objects = _place_objects(plan, config, ingested)
        else:
            objects = None
        with clock.phase("knn"):
            ingested, neighbours = find_neighbours(ingested, config, plan)
        with clock.phase("scores"):
            samples, score_report = score(ingested, neighbours, config, plan)
            clock.timings.update({f"score_{k}": v for k, v in score_report["timings_s"].items()})
        with clock.phase("write_knn"):  # now, not at publication: the graphs are freed before selections
            _write_graphs(plan, samples, neighbours)
        with clock.phase("drift"):
            drift = _drift(plan, config, samples, ingested, neighbours.graph,
                           centroids=score_report["artifacts"].get("clusters", {}).get("centroids"),
                           objects=objects.table if objects is not None else None)
        neighbours = dataclasses.replace(neighbours, graph=None, copy_graph=None)  # the graphs' last reference
        with clock.phase("leakage"):
            leakage = _split_leakage(samples, ingested, config, resolver, objects.table if objects is not None else None)
        with clock.phase("selections"):
            selections = build_selections(samples, config.scores, config.selections, ingested.vectors,
                                          previous=_previous_selections(plan, config),
                                          objects=objects.table if objects is not None else None)
        with clock.phase("report_data"):
            if objects is not None:
                objects = _box_map(objects, config)
            samples, report = prepare_report(samples, ingested.vectors, selections, config, resolver,
                                             leakage=leakage[0] if leakage is not None else None,
                                             drift=drift.new_region_items if drift is not None else None,
                                             score_summary=score_report["summary"],
                                             previous=_updated_from(neighbours.info, plan),
                                             objects=objects.table if objects is not None else None)
    return publish(plan, config, Scored(samples, score_report["summary"], selections, report, leakage, corrections,
                                        drift, objects),
                   clock, embedder=ingested.embedder, knn=neighbours.info, snapshot=ingested.snapshot)


# ------------------------------------------------------------------------------------- ingest


def ingest(plan: Plan, config: Config, resolver: Resolver, clock: Clock) -> Ingested:
    """Get every ok item's vector into storage and one compact row per input onto the driver."""
    if plan.inputs is None:
        with clock.phase("read_embeddings"):
            return _ingest_embeddings(plan, config, resolver)
    return _ingest_images(plan, config, resolver, clock)


def _ingest_images(plan: Plan, config: Config, resolver: Resolver, clock: Clock) -> Ingested:
    from curation import pipeline  # Ray Data, only when images are decoded and embedded

    inputs = plan.inputs
    identity = run_tasks(_describe_embedder, [(config, resolver)])[0]  # the model loads on a worker
    store = None
    reused = np.zeros(inputs.num_rows, bool)
    reuse = None
    if config.store.enabled:
        location = resolver.resolve(config.store.uri) if config.store.uri else plan.output.child("embedding-store")
        store = EmbeddingStore(location, identity["model_id"])
        # What a run that stopped before publishing had already embedded is reused too: its
        # embeddings/ parts are written as blocks complete (the checkpoint).
        resume = outputs.interrupted_vector_files(plan.output, plan.run_id, skip=(store.snapshot_run(),))
        reused, reuse = store.lookup(inputs, resume=resume)
        if resume:
            log.info("resuming: %d vector part(s) of interrupted runs considered", len(resume))
    # A detection run sends each image's boxes to the decode stage, which cuts the crops the
    # crop store does not hold from the same decode (curation.crop_store).
    todo, work, crop_cfg = inputs.filter(pa.array(~reused)), None, None
    if plan.objects is not None:
        crop_plan = plan_crops(plan.objects, inputs, config.objects)
        crop_store = CropStore(store) if store is not None else None
        work = crop_store.plan(crop_plan, reused) if crop_store is not None else CropWork.whole(crop_plan)
        with_boxes = inputs
        for name, column in work.decode_columns(crop_plan).items():
            with_boxes = with_boxes.append_column(name, column)
        todo = with_boxes.filter(pa.array(~reused | work.crop_only))
        crop_cfg = crop_plan.settings
    log.info("inputs: %d; reused from the embedding store: %d; to decode and embed: %d%s",
             inputs.num_rows, int(reused.sum()), int((~reused).sum()),
             f" (+{int(work.crop_only.sum())} decoded for changed boxes only)" if work is not None else "")
    folder = plan.run.child("embeddings")
    object_folder = plan.run.child(OBJECT_EMBEDDINGS_FOLDER)
    with clock.phase("decode_embed" if todo.num_rows else "copy_stored"):
        compact = pipeline.embed_to_storage(todo, reuse, config, resolver, folder=folder,
                                            model_id=identity["model_id"], objects=crop_cfg,
                                            object_folder=object_folder)
        copied = copy_stored_crops(work.reuse, folder=object_folder) \
            if work is not None and work.reuse is not None else []
    crops = None
    if plan.objects is not None:
        compact, crops = _split_crops(compact, object_folder, copied)
    samples = _join_compact(inputs, compact)
    names = sorted(set(pc.drop_null(samples["vector_file"]).to_pylist())) if "vector_file" in samples.column_names else []
    files = [folder.child(name) for name in names]
    parts = parquet_parts(files)
    samples = _with_vector_ids(samples, names, [first for _, first, _ in parts])
    ok = is_ok(samples["status"])
    counts = {"reused": int(reused.sum()), "embedded": int(ok.sum()) - int(reused.sum()),
              "rejected": int((~ok).sum())}
    if crops is not None:
        counts.update(crops_embedded=len(crops.rows) - crops.copied, crops_copied=crops.copied)
    identity["store"] = counts
    log.info("embedding store: reused %(reused)d, embedded %(embedded)d, rejected %(rejected)d", counts)
    snapshot = store.stage(files, plan.run_id, rows=int(ok.sum())) if store is not None and files else None
    if snapshot is not None and crops is not None and crops.parts:
        staged = CropStore(store).stage([p[0] for p in crops.parts], plan.run_id, rows=len(crops.rows))
        snapshot = dataclasses.replace(snapshot, also=(staged,))
    return Ingested(samples, VectorParts(parts), identity, VectorParts(parts, column="copy_vector"), snapshot,
                    crops)


def _split_crops(compact: pa.Table | None, object_folder, copied: list[str]) -> tuple[pa.Table | None, ObjectVectors]:
    """The crop vectors written tonight (named by the compact rows) and copied from the store,
    and the compact rows without the crop-only rows (their image row came from the store)."""
    names = copied
    if compact is not None and "object_vector_file" in compact.column_names:
        names = sorted(set(pc.drop_null(compact["object_vector_file"]).to_pylist())) + copied
        compact = compact.drop_columns(["object_vector_file"])
    crops = read_object_vectors(object_folder, names, copied=copied)
    if compact is not None and "crop_only" in compact.column_names:
        crop_only = pc.fill_null(compact["crop_only"], False).to_numpy(zero_copy_only=False)
        compact = compact.filter(pa.array(~crop_only)).drop_columns(["crop_only"])
    return compact, crops


def _describe_embedder(config: Config, resolver: Resolver) -> dict:
    from curation.embedders import load_embedder

    _, identity = load_embedder(config.embedder.model, config.embedder.weights,
                                image_size=config.embedder.image_size, resolver=resolver)
    return identity.to_dict()


def _join_compact(inputs: pa.Table, compact: pa.Table | None) -> pa.Table:
    """The inputs (uri, label, metadata) beside what decoding and embedding said of each row."""
    n = inputs.num_rows
    if compact is None:
        compact = pa.table({"input_id": pa.array([], pa.int64())})
    compact = compact.sort_by("input_id")
    ids = compact["input_id"].to_numpy()
    if len(ids) != n or not np.array_equal(ids, np.arange(n)):
        raise RuntimeError(f"accounting: {n} inputs but {len(ids)} rows came back from decoding "
                           f"({len(np.unique(ids))} distinct input ids)")
    samples = inputs.drop_columns(["input_error"]) if "input_error" in inputs.column_names else inputs
    for name in compact.column_names:
        if name not in samples.column_names:
            samples = samples.append_column(name, compact[name])
    return samples


def _with_vector_ids(samples: pa.Table, names: list[str], offsets: list[int]) -> pa.Table:
    """``vector_id`` = the first row of the item's vector file + its row there."""
    n = samples.num_rows
    if not names:
        vector_id = pa.nulls(n, pa.int64())
    else:
        file_index = pc.index_in(samples["vector_file"], value_set=pa.array(names)).to_numpy(zero_copy_only=False)
        valid = ~np.isnan(file_index.astype(np.float64))
        base = np.asarray(offsets, np.int64)[np.where(valid, np.nan_to_num(file_index), 0).astype(np.int64)]
        values = base + samples["vector_row"].to_numpy(zero_copy_only=False)
        vector_id = pa.array(values, pa.int64(), mask=~valid)
    samples = samples.drop_columns([c for c in ("vector_file", "vector_row") if c in samples.column_names])
    return samples.append_column("vector_id", vector_id)


def _ingest_embeddings(plan: Plan, config: Config, resolver: Resolver) -> Ingested:
    """``input.embeddings``: the driver reads every column but the vectors; Ray tasks (or this
    process, for small inputs) check each file's vectors where they are stored."""
    meta, model_id = inputs_io.read_embeddings_metadata(plan.embedding_files)
    checks = run_tasks(inputs_io.check_vectors, [(location,) for location in plan.embedding_files])
    lengths = np.concatenate([c[0] for c in checks]) if checks else np.zeros(0, np.int64)
    finite = np.concatenate([c[1] for c in checks]) if checks else np.zeros(0, bool)
    checksums = np.concatenate([c[2] for c in checks]) if checks else np.zeros(0, np.uint64)
    samples = inputs_io.samples_from_embeddings(meta, lengths, finite, checksums)
    ok = is_ok(samples["status"])
    vectors = VectorParts(parquet_parts(plan.embedding_files), keep=ok)
    identity = {"model": "precomputed", "source": config.input.embeddings, "model_id": model_id}
    return Ingested(samples, vectors, identity)


# --------------------------------------------------------------------------- neighbours, scores


def find_neighbours(ingested: Ingested, config: Config, plan: Plan) -> tuple[Ingested, Neighbours]:
    """The kNN graphs (the embedding's, and the copy descriptors'), and ``ingested`` with the
    vector sources the later phases read (a cache in front of storage when the graph update
    read some rows anyway)."""

    n_ok = ingested.vectors.n
    if n_ok == 0:
        raise NothingToPublish(f"no usable item: {ingested.samples.num_rows} inputs, all rejected "
                               f"(see the log for reasons); nothing published, latest unchanged")

    previous = plan.previous if config.knn.incremental != "off" else None
    model_id = str(ingested.embedder.get("model_id"))
    # The drift profile's and the label probe's samples are read with the night's changed items
    # (one read of the store for all three).
    hold = [profile_sample_ids(n_ok, config.drift.sample_size) if config.drift.enabled else np.zeros(0, np.int64)]
    if config.scores.label_probe_weight > 0:
        hold.append(probe_sample_ids(ingested.samples))
    hold = np.concatenate(hold)
    graph, info, vectors = neighbour_graph(ingested.vectors, config.knn, samples=ingested.samples,
                                           save_to=plan.run.child("index"), previous=previous,
                                           model_id=model_id, hold=hold)
    if hasattr(vectors, "describe"):  # in storage (possibly with a cache in front)
        info["vectors"] = vectors.describe()
    log.info("kNN graph: %d vectors x %d, k=%d, %s", n_ok, vectors.dim, config.knn.k, info.get("method"))
    copy_graph, copies = None, ingested.copies
    if ingested.copies is not None:
        # Copy detection has its own graph, in the copy descriptor's space: whatever model
        # embeds the images, a copy is judged by how it looks (see scores/duplicates.py).
        copy_graph, copy_info, copies = neighbour_graph(ingested.copies, config.knn, samples=ingested.samples,
                                                        save_to=plan.run.child("index-copies"), previous=previous,
                                                        model_id=model_id,
                                                        folder="knn-copies", index_folder="index-copies")
        if hasattr(copies, "describe"):
            copy_info["vectors"] = copies.describe()
        info["copies"] = copy_info
        log.info("copy graph: %d descriptors, %s", n_ok, copy_info.get("method"))
    else:
        info["copies"] = {"method": "none: input.embeddings has no pixels, so copies are judged by the "
                                    "embedding alone (edited copies a semantic model puts near its class "
                                    "are missed; exact copies are found only when the files share hashes)"}
    return dataclasses.replace(ingested, vectors=vectors, copies=copies), Neighbours(graph, info, copy_graph)


def score(ingested: Ingested, neighbours: Neighbours, config: Config, plan: Plan) -> tuple[pa.Table, dict]:
    budgets = [sel.budget for sel in config.selections if sel.mode == "representative" and sel.budget]
    return run_scores(ingested.samples, ingested.vectors, neighbours.graph, config.scores,
                      budget=max(budgets, default=None), copies=ingested.copies, copy_knn=neighbours.copy_graph,
                      previous=_updated_from(neighbours.info, plan), persist_to=plan.run)


def _updated_from(knn: dict, plan: Plan) -> PublishedRun | None:
    """The previous run when tonight's graph is an update of its graph (None when it was built
    whole): the scores' state, and the map's positions, carry over only then."""
    update = knn.get("incremental") or {}
    return plan.previous if update.get("used") and plan.previous is not None else None


def _apply_corrections(plan: Plan, config: Config, resolver: Resolver,
                       ingested: Ingested) -> tuple[Ingested, tuple[pa.Table, dict] | None]:
    """Fold in ``input.label_corrections`` and the corrections the previous published run kept
    (see :mod:`curation.corrections`); sets ``label_source`` on every row."""
    answers = plan.answers
    if answers is None and config.input.label_corrections and plan.objects is None:  # (a detection run's are of boxes)
        answers = read_answers(resolver.resolve(config.input.label_corrections))
    stored = None
    previous = plan.previous
    if previous is not None:
        location = previous.corrections_file
        try:
            stored = pq.read_table(location.path, filesystem=location.filesystem)
        except (OSError, pa.ArrowException):
            stored = None  # that run kept none
    samples, store, summary = apply_corrections(ingested.samples, stored=stored, answers=answers, run_id=plan.run_id)
    ingested = dataclasses.replace(ingested, samples=samples)
    if answers is None and stored is None:
        return ingested, None
    log.info("label corrections: %(applied)d applied (%(new)d new), %(unknown_uri)d unknown uri, "
             "%(conflicting)d conflicting", summary)
    return ingested, (store, summary)


def _place_objects(plan: Plan, config: Config, ingested: Ingested) -> tuple[Ingested, PlacedObjects]:
    """The annotations' boxes on their decoded images (see :mod:`curation.objects`), and
    ``object_count`` on every input's row."""
    samples = ingested.samples.sort_by("input_id")
    objects_in, crops = plan.objects, ingested.crops
    if objects_in.vector_files is not None:  # input.object_embeddings: the vectors as given, checked where stored
        checks = run_tasks(inputs_io.check_vectors, [(location,) for location in objects_in.vector_files])
        objects_in, crops = joined_to_samples(objects_in, samples, checks)
    table = place_objects(objects_in, samples, config.objects)
    crops = crops or ObjectVectors([], np.zeros(0, np.int64), np.zeros(0, np.int64))
    table, keep = with_object_vectors(table, crops.rows)
    summary = objects_summary(table, objects_in.object_count)
    if objects_in.correction_counts is not None:
        summary["corrections"] = objects_in.correction_counts
    log.info("objects: %(annotations)d boxes, %(ok)d ok, %(rejected)d rejected", summary)
    graph = None
    nodes = keep | (crops.rows == -1)  # the ok boxes' crops and the background squares
    if keep.any():  # the crops' own kNN graph, through the same index as the images' (built whole)
        graph, info = knn_graph(VectorParts(crops.parts, keep=nodes), config.knn,
                                save_to=plan.run.child("index-objects"))
        summary["knn"] = {"boxes": int(keep.sum()), "background_squares": int((crops.rows == -1).sum()),
                          "method": info.get("method")}
    crop_graph = CropGraph(graph, crops.rows[nodes], crops.images[nodes], VectorParts(crops.parts, keep=keep))
    table, summary["scores"] = score_objects(table, crop_graph, config.objects,
                                             probe_weight=config.scores.label_probe_weight,
                                             predictions=objects_in.predictions, classes_listed=objects_in.classes)
    samples = samples.drop_columns([c for c in ("orientation",) if c in samples.column_names])
    samples = samples.append_column("object_count", objects_in.object_count)
    for name, column in per_image(table, samples.num_rows).items():
        samples = samples.append_column(name, column)
    return dataclasses.replace(ingested, samples=samples), PlacedObjects(table, summary, crop_graph.vectors)


def _box_map(objects: PlacedObjects, config: Config) -> PlacedObjects:
    """The report's box map: ``x``, ``y`` of the plotted boxes (:mod:`curation.report.box_map`)."""
    table, info = box_map_coordinates(objects.table, objects.vectors, config.report)
    return dataclasses.replace(objects, table=table, summary={**objects.summary, "map": info})


def _write_graphs(plan: Plan, samples: pa.Table, neighbours: Neighbours) -> None:
    """``knn/`` and ``knn-copies/`` (and their ``-margin`` rows, where the next night fills a
    lost neighbour from)."""
    for folder, graph in (("knn", neighbours.graph), ("knn-copies", neighbours.copy_graph)):
        if graph is None:
            continue
        outputs.write_knn_graph(plan.run.child(folder), samples, graph)
        if graph.margin is not None:
            outputs.write_knn_graph(plan.run.child(f"{folder}-margin"), samples, graph.margin)


def _drift(plan: Plan, config: Config, samples: pa.Table, ingested: Ingested, graph, *, centroids=None,
           objects: pa.Table | None = None):
    """Tonight's profile and its comparison with the previous published run (see
    :mod:`curation.drift`); None when ``drift.enabled`` is off."""
    if not config.drift.enabled:
        return None

    return drift_phase(samples, ingested.vectors, graph, config.drift, model_id=str(ingested.embedder.get("model_id")),
                       previous=plan.previous, centroids=centroids, objects=objects)


def _split_leakage(samples: pa.Table, ingested: Ingested, config: Config, resolver: Resolver,
                   objects: pa.Table | None = None) -> tuple[pa.Table, dict] | None:
    """Copies across splits (see :mod:`curation.leakage`), or None when the run has no split."""
    inp = config.input
    column = inp.split_column or (None if inp.split_from_path else "split")
    root = resolver.resolve(inp.images).uri if inp.split_from_path else None
    split = split_values(samples, column=column, images_root=root)
    if split is None:
        return None
    table, summary = find_leaks(samples, split, ingested.copies if ingested.copies is not None else ingested.vectors)
    summary["split_from"] = f"column {column!r}" if column else f"the first path component under {root}"
    if objects is not None:  # a leaked image leaks its boxes: by split, class and size
        summary["objects"] = leaked_boxes(objects, pa.concat_arrays([table["uri_a"].combine_chunks(),
                                                                     table["uri_b"].combine_chunks()]),
                                          pa.concat_arrays([table["split_a"].combine_chunks(),
                                                            table["split_b"].combine_chunks()]))
    log.info("leakage: %d pairs of copies across splits", summary["pairs"])
    return table, summary


def _previous_selections(plan: Plan, config: Config) -> dict[str, pa.Table]:
    """The previous published run's ``to_label`` and ``validation`` selections (uri, rank), by
    name: a queue an annotation team is working through keeps its order from night to night, and
    a validation item never moves into training."""

    names = [sel.name for sel in config.selections if sel.mode in ("to_label", "validation")]
    previous = plan.previous if names else None
    out: dict[str, pa.Table] = {}
    for name in names if previous is not None else []:
        table = previous.selection(name, ["uri", "rank"])
        if table is None or table.column_names != ["uri", "rank"]:  # a new selection, or a run before it existed
            log.info("selection %s: no previous queue in %s", name, previous.uri)
        else:
            out[name] = table
    return out
