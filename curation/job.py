"""The curation job as a sequence of phases, each passing a small typed result to the next:

    preflight ─► ingest ─► neighbours ─► scores ─► selections ─► publish

* **preflight** (before any work): config already validated; inputs reachable; the model name and
  weights file checked; the inputs listed (or the precomputed embeddings' files found); every
  selection's ``where`` / ``balance_on`` dry-run against the columns ``samples`` will have.
* **ingest**: the vectors of every ok item end up in storage (``embeddings/`` written by Ray Data
  on the workers, or the ``input.embeddings`` files); the driver keeps one compact row per input.
* **neighbours**: the kNN graph (exact in process, or FAISS shards on Ray actors reading storage).
* **scores** / **selections**: from the compact rows and the graph; vectors are fetched only as
  bounded samples or one class at a time, or scanned by Ray tasks where they are stored.
* **publish**: samples, selections, knn, report, run.json, then ``_SUCCESS`` and ``latest``.

The run holds one Ray session from ingest to selections (:func:`curation.session.ray_session`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.config import Config, ConfigError
from curation.drift import DriftResult
from curation.index.knn import KnnGraph
from curation.index.source import VectorParts, parquet_parts
from curation.io import inputs as inputs_io
from curation.io import outputs
from curation.io.filesystem import Location, PreconditionFailed, Resolver, read_tagged, write_bytes
from curation.io.store import EmbeddingStore
from curation.report import ReportAssets, prepare_report, render_report
from curation.published_run import CORRECTIONS_FILE, PublishedRun, is_published, latest_run_id
from curation.run_diff import diff_runs
from curation.run_info import Counts, RunInfo
from curation.schema import INPUT_COLUMNS, INTERNAL_COLUMNS, SAMPLES_CONTRACT, SAMPLES_EXTRA, is_ok
from curation.session import check_cluster, needs_ray, ray_session, run_tasks

log = logging.getLogger(__name__)


DIFF_CORRECTIONS_LISTED = 1000  # corrections listed one by one in run.json's diff (all are in corrections.parquet)


class PublishConflict(RuntimeError):
    """``latest`` changed while this run ran: another run published first (compare-and-swap)."""


class NothingToPublish(RuntimeError):
    """The run has no usable item (no input, or every input rejected): nothing is published."""


@dataclass
class RunResult:
    run_id: str
    run_uri: str
    samples: pa.Table
    info: RunInfo

    @property
    def run_info(self) -> dict:
        """The run's ``run.json`` as written."""
        return self.info.to_dict()


@dataclass
class Plan:
    """What preflight found: where the run goes and what it reads."""

    output: Location
    run_id: str
    inputs: pa.Table | None = None  # images / manifest mode: one row per input item
    embedding_files: list[Location] = field(default_factory=list)  # input.embeddings mode
    count: int = 0
    latest_tag: str | None = None  # `latest` as this run found it: publication swaps it only if unchanged
    latest: bytes | None = None  # ... and its content
    previous: PublishedRun | None = None  # the run `latest` named at preflight: the diff, drift, graph update, scores
    answers: dict | None = None  # input.label_corrections, parsed and checked at preflight

    @property
    def run(self) -> Location:
        return self.output.child(self.run_id)


@dataclass
class Ingested:
    """One compact row per input (sorted by ``input_id``; ok rows carry ``vector_id``) and where
    the ok rows' vectors are stored (vector id i = i-th vector of ``vectors``)."""

    samples: pa.Table
    vectors: VectorParts  # after the kNN phase, possibly a CachedVectors in front of it
    embedder: dict
    copies: VectorParts | None = None  # the copy descriptors (same ids); None without pixels
    snapshot: object | None = None  # the embedding store's new snapshot (StagedSnapshot), named once published


@dataclass
class Neighbours:
    graph: KnnGraph | None  # released once the scores have used it and knn/ is written
    info: dict
    copy_graph: KnnGraph | None = None  # among the copy descriptors (images mode)


class Clock:
    """Seconds and the driver's peak memory per phase, for run.json, and a log line as each ends."""

    def __init__(self):
        self.start = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.peak_bytes: dict[str, int] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        _reset_peak_memory()
        t = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - t, 3)
        peak = _peak_memory()
        if peak:
            self.peak_bytes[name] = peak
        log.info("phase %s done in %.1fs (driver peak %.0f MiB)", name, self.timings[name], peak / 2**20)


def _reset_peak_memory() -> None:
    """Restart the kernel's peak-RSS counter of this process (Linux; elsewhere a no-op)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _peak_memory() -> int:
    """This process's peak RSS since the last reset, in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


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
            corrections = _apply_corrections(plan, config, resolver, ingested)
        with clock.phase("knn"):
            neighbours = find_neighbours(ingested, config, plan)
        with clock.phase("scores"):
            samples, score_report = score(ingested, neighbours, config, plan)
            clock.timings.update({f"score_{k}": v for k, v in score_report["timings_s"].items()})
            for folder, graph in (("knn", neighbours.graph), ("knn-copies", neighbours.copy_graph)):
                if graph is None:
                    continue
                outputs.write_knn_graph(plan.run.child(folder), samples, graph)
                if graph.margin is not None:  # the next night fills a lost neighbour from these
                    outputs.write_knn_graph(plan.run.child(f"{folder}-margin"), samples, graph.margin)
        with clock.phase("drift"):
            drift = _drift(plan, config, samples, ingested, neighbours.graph,
                           centroids=score_report["artifacts"].get("clusters", {}).get("centroids"))
            # The graph has served its purpose: free it before selections.
            neighbours.graph = neighbours.copy_graph = None
        with clock.phase("leakage"):
            leakage = _split_leakage(samples, ingested, config, resolver)
        with clock.phase("selections"):
            from curation.select import build_selections

            selections = build_selections(samples, config.scores, config.selections, ingested.vectors,
                                          previous=_previous_selections(plan, config))
        with clock.phase("report_data"):
            samples, report = prepare_report(samples, ingested.vectors, selections, config, resolver,
                                             leakage=leakage[0] if leakage is not None else None,
                                             drift=drift.new_region_items if drift is not None else None,
                                             score_summary=score_report["summary"],
                                             previous=_updated_from(neighbours.info, plan))
    return publish(plan, config, Scored(samples, score_report["summary"], selections, report, leakage, corrections,
                                        drift),
                   clock, embedder=ingested.embedder, knn=neighbours.info, snapshot=ingested.snapshot)


# ---------------------------------------------------------------------------------- preflight


def preflight(config: Config, resolver: Resolver) -> Plan:
    """Everything that can fail before work starts; raises ConfigError / EmbedderError /
    StorageError naming the key or URI."""
    inputs_io.check_inputs(config, resolver)
    output = resolver.resolve(config.output.uri)
    plan = Plan(output=output, run_id=config.output.run_id or outputs.new_run_id())
    if is_published(plan.run):
        raise ConfigError(f"config key 'output.run_id': run {plan.run_id!r} is already published at {plan.run.uri} "
                          f"(a published run is never rewritten: choose another run id, or leave it unset)")
    plan.latest, plan.latest_tag = read_tagged(output.child("latest"), config.storage)
    # Resolved once, before anything is written: every later phase diffs against this run.
    plan.previous = PublishedRun.named_by_latest(output, plan.latest)
    if plan.previous is not None and plan.previous.uri == plan.run.uri:
        plan.previous = None
    if config.input.embeddings:
        plan.embedding_files, names, plan.count = inputs_io.embeddings_files(config, resolver)
        metadata = [n for n in names if n not in inputs_io.EMBEDDINGS_COLUMNS]
    else:
        from curation.embedders import check_embedder

        check_embedder(config.embedder.model, config.embedder.weights, resolver=resolver)
        plan.inputs = inputs_io.list_inputs(config, resolver)
        plan.count = plan.inputs.num_rows
        metadata = [n for n in plan.inputs.column_names if n not in INPUT_COLUMNS]
    if config.input.split_column and config.input.split_column not in metadata:
        raise ConfigError(f"config key 'input.split_column': no column {config.input.split_column!r} in the inputs "
                          f"(columns: {', '.join(metadata) or 'none'})")
    _check_selection_columns(config, metadata, plan)
    if config.input.label_corrections:
        plan.answers = _checked_corrections(config, resolver, plan)
    return plan


def _checked_corrections(config: Config, resolver: Resolver, plan: Plan) -> dict[str, list[str]]:
    """``input.label_corrections`` parsed and checked against the inputs' items and classes
    (and the classes the previous run's kept corrections made), before any work."""
    import pyarrow.parquet as pq

    from curation.corrections import CorrectionsError, check_answers, read_answers

    location = resolver.resolve(config.input.label_corrections)
    if plan.inputs is not None:
        uris, labels = plan.inputs["uri"], plan.inputs["label"] if "label" in plan.inputs.column_names else None
    else:
        import pyarrow.dataset as ds

        files = plan.embedding_files  # only the two columns needed here: ingest reads the rest
        dataset = ds.dataset([f.path for f in files], filesystem=files[0].filesystem, format="parquet")
        table = dataset.to_table(columns=[c for c in ("uri", "label") if c in dataset.schema.names])
        uris, labels = table["uri"], table["label"] if "label" in table.column_names else None
    classes = set(pc.unique(labels.cast(pa.string())).drop_null().to_pylist()) if labels is not None else set()
    if plan.previous is not None:
        kept = plan.previous.corrections_file
        try:
            classes |= set(pq.read_table(kept.path, filesystem=kept.filesystem, columns=["label"])["label"]
                           .drop_null().to_pylist())
        except (OSError, pa.ArrowException):
            pass  # that run kept none
    try:
        answers = read_answers(location)
        check_answers(answers, uri=location.uri, items=set(uris.to_pylist()), classes=classes,
                      allow_new_classes=config.input.allow_new_classes)
    except CorrectionsError as exc:
        raise ConfigError(f"config key 'input.label_corrections': {exc}") from None
    return answers


def _check_selection_columns(config: Config, metadata: list[str], plan: Plan) -> None:
    from curation.scores import reserved_columns
    from curation.select import check_selection_columns

    fields = list(SAMPLES_CONTRACT) + list(SAMPLES_EXTRA)
    known = {f.name for f in fields}
    fields += [pa.field(name, pa.float64()) for name in sorted(reserved_columns() - known - set(INTERNAL_COLUMNS))]
    source = plan.inputs.schema if plan.inputs is not None else None
    for name in metadata:
        fields.append(source.field(name) if source is not None else pa.field(name, pa.string()))
    check_selection_columns(config.selections, pa.schema(fields))


# ------------------------------------------------------------------------------------- ingest


def ingest(plan: Plan, config: Config, resolver: Resolver, clock: Clock) -> Ingested:
    """Get every ok item's vector into storage and one compact row per input onto the driver."""
    if plan.inputs is None:
        with clock.phase("read_embeddings"):
            return _ingest_embeddings(plan, config, resolver)
    return _ingest_images(plan, config, resolver, clock)


def _ingest_images(plan: Plan, config: Config, resolver: Resolver, clock: Clock) -> Ingested:
    from curation import pipeline

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
    todo = inputs.filter(pa.array(~reused))
    log.info("inputs: %d; reused from the embedding store: %d; to decode and embed: %d",
             inputs.num_rows, int(reused.sum()), todo.num_rows)
    folder = plan.run.child("embeddings")
    with clock.phase("decode_embed" if todo.num_rows else "copy_stored"):
        compact = pipeline.embed_to_storage(todo, reuse, config, resolver, folder=folder,
                                            model_id=identity["model_id"])
    samples = _join_compact(inputs, compact)
    names = sorted(set(pc.drop_null(samples["vector_file"]).to_pylist())) if "vector_file" in samples.column_names else []
    files = [folder.child(name) for name in names]
    parts = parquet_parts(files)
    samples = _with_vector_ids(samples, names, [first for _, first, _ in parts])
    ok = is_ok(samples["status"])
    counts = {"reused": int(reused.sum()), "embedded": int(ok.sum()) - int(reused.sum()),
              "rejected": int((~ok).sum())}
    identity["store"] = counts
    log.info("embedding store: reused %(reused)d, embedded %(embedded)d, rejected %(rejected)d", counts)
    snapshot = store.stage(files, plan.run_id, rows=int(ok.sum())) if store is not None and files else None
    return Ingested(samples, VectorParts(parts), identity, VectorParts(parts, column="copy_vector"), snapshot)


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


def find_neighbours(ingested: Ingested, config: Config, plan: Plan) -> Neighbours:

    n_ok = ingested.vectors.n
    if n_ok == 0:
        raise NothingToPublish(f"no usable item: {ingested.samples.num_rows} inputs, all rejected "
                               f"(see the log for reasons); nothing published, latest unchanged")
    from curation.drift import profile_sample_ids
    from curation.scores.label_quality import probe_sample_ids
    from curation.index.incremental import neighbour_graph

    previous = plan.previous if config.knn.incremental != "off" else None
    previous_record = previous.info_or_none() if previous is not None else None
    previous_info = previous_record.to_dict() if previous_record is not None else {}
    model_id = str(ingested.embedder.get("model_id"))
    # The drift profile's and the label probe's samples are read with the night's changed items
    # (one read of the store for all three).
    hold = [profile_sample_ids(n_ok, config.drift.sample_size) if config.drift.enabled else np.zeros(0, np.int64)]
    if config.scores.label_probe_weight > 0:
        hold.append(probe_sample_ids(ingested.samples))
    hold = np.concatenate(hold)
    graph, info, ingested.vectors = neighbour_graph(ingested.vectors, config.knn, samples=ingested.samples,
                                                    save_to=plan.run.child("index"), previous=previous,
                                                    previous_info=previous_info, model_id=model_id, hold=hold)
    if hasattr(ingested.vectors, "describe"):  # in storage (possibly with a cache in front)
        info["vectors"] = ingested.vectors.describe()
    log.info("kNN graph: %d vectors x %d, k=%d, %s", n_ok, ingested.vectors.dim, config.knn.k, info.get("method"))
    copy_graph = None
    if ingested.copies is not None:
        # Copy detection has its own graph, in the copy descriptor's space: whatever model
        # embeds the images, a copy is judged by how it looks (see scores/duplicates.py).
        copy_graph, copy_info, ingested.copies = neighbour_graph(ingested.copies, config.knn, samples=ingested.samples,
                                                save_to=plan.run.child("index-copies"), previous=previous,
                                                previous_info=previous_info, model_id=model_id, folder="knn-copies",
                                                index_folder="index-copies")
        if hasattr(ingested.copies, "describe"):
            copy_info["vectors"] = ingested.copies.describe()
        info["copies"] = copy_info
        log.info("copy graph: %d descriptors, %s", n_ok, copy_info.get("method"))
    else:
        info["copies"] = {"method": "none: input.embeddings has no pixels, so copies are judged by the "
                                    "embedding alone (edited copies a semantic model puts near its class "
                                    "are missed; exact copies are found only when the files share hashes)"}
    return Neighbours(graph, info, copy_graph)


def score(ingested: Ingested, neighbours: Neighbours, config: Config, plan: Plan) -> tuple[pa.Table, dict]:
    from curation.scores import run_scores

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
                       ingested: Ingested) -> tuple[pa.Table, dict] | None:
    """Fold in ``input.label_corrections`` and the corrections the previous published run kept
    (see :mod:`curation.corrections`); sets ``label_source`` on every row."""
    import pyarrow.parquet as pq

    from curation.corrections import apply_corrections, read_answers

    answers = plan.answers
    if answers is None and config.input.label_corrections:  # a plan made before this check existed
        answers = read_answers(resolver.resolve(config.input.label_corrections))
    stored = None
    previous = plan.previous
    if previous is not None:
        location = previous.corrections_file
        try:
            stored = pq.read_table(location.path, filesystem=location.filesystem)
        except (OSError, pa.ArrowException):
            stored = None  # that run kept none
    ingested.samples, store, summary = apply_corrections(ingested.samples, stored=stored, answers=answers,
                                                         run_id=plan.run_id)
    if answers is None and stored is None:
        return None
    log.info("label corrections: %(applied)d applied (%(new)d new), %(unknown_uri)d unknown uri, "
             "%(conflicting)d conflicting", summary)
    return store, summary


def _drift(plan: Plan, config: Config, samples: pa.Table, ingested: Ingested, graph, *, centroids=None):
    """Tonight's profile and its comparison with the previous published run (see
    :mod:`curation.drift`); None when ``drift.enabled`` is off."""
    if not config.drift.enabled:
        return None
    from curation.drift import drift_phase

    return drift_phase(samples, ingested.vectors, graph, config.drift, model_id=str(ingested.embedder.get("model_id")),
                       previous=plan.previous, centroids=centroids)


def _split_leakage(samples: pa.Table, ingested: Ingested, config: Config,
                   resolver: Resolver) -> tuple[pa.Table, dict] | None:
    """Copies across splits (see :mod:`curation.leakage`), or None when the run has no split."""
    from curation.leakage import find_leaks, split_values

    inp = config.input
    column = inp.split_column or (None if inp.split_from_path else "split")
    root = resolver.resolve(inp.images).uri if inp.split_from_path else None
    split = split_values(samples, column=column, images_root=root)
    if split is None:
        return None
    table, summary = find_leaks(samples, split, ingested.copies if ingested.copies is not None else ingested.vectors)
    summary["split_from"] = f"column {column!r}" if column else f"the first path component under {root}"
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


# ------------------------------------------------------------------------------------ publish


@dataclass
class Scored:
    """What the scores, selections and report phases produced for publication."""

    samples: pa.Table
    score_summary: dict[str, dict]  # score name -> its run.json summary
    selections: list  # SelectionResult, in config order
    report: ReportAssets | None = None
    leakage: tuple[pa.Table, dict] | None = None  # copies across splits (leakage.parquet, run.json)
    corrections: tuple[pa.Table, dict] | None = None  # label corrections kept with the run, and their counts
    drift: DriftResult | None = None  # tonight's profile, the comparison with the previous run, far new items


def publish(plan: Plan, config: Config, scored: Scored, clock: Clock, *, embedder: dict, knn: dict,
            snapshot=None) -> RunResult:
    """Write every output, then ``_SUCCESS``, then swap ``latest`` (and, when it swapped, point
    the embedding store at this run's snapshot); then apply retention."""
    with clock.phase("write_outputs"):
        samples, counts = _accounted(scored.samples, plan.count)
        info = RunInfo.build(run_id=plan.run_id, uri=plan.run.uri, samples=samples, counts=counts,
                             score_summary=scored.score_summary, selections=scored.selections,
                             embedder=embedder, knn=knn, config=config)
        info.timings_s = clock.timings  # the report shows the phases so far; run.json gets them all
        _write_outputs(plan, config, info, samples, scored)
    clock.timings["total"] = round(time.perf_counter() - clock.start, 3)
    info.driver_peak_bytes = clock.peak_bytes
    info.write(plan.run)
    _swap_latest(plan, config)  # raises PublishConflict when another run published first
    if snapshot is not None:
        snapshot.point()
    removed = outputs.remove_old_runs(plan.output, config.output.keep_runs)
    if removed:
        log.info("retention (output.keep_runs=%d): removed %d older run(s): %s", config.output.keep_runs,
                 len(removed), ", ".join(removed))
    log.info("published %s: %d inputs, %d ok, %d rejected in %.1fs", plan.run.uri, counts.inputs, counts.ok,
             counts.rejected, clock.timings["total"])
    return RunResult(plan.run_id, plan.run.uri, samples, info)


def _accounted(samples: pa.Table, expected: int) -> tuple[pa.Table, Counts]:
    """``samples`` in input order with the contract's column order, and its counts; raises if a
    row was lost or added on the way (every input is ok or rejected, exactly once)."""
    if not (np.diff(samples["input_id"].to_numpy()) > 0).all():
        samples = samples.sort_by("input_id")
    samples = outputs.order_samples(samples)
    ok = int(is_ok(samples["status"]).sum())
    if samples.num_rows != expected:
        raise RuntimeError(f"accounting: {expected} inputs but {samples.num_rows} sample rows")
    return samples, Counts(inputs=expected, ok=ok, rejected=expected - ok)


def _write_outputs(plan: Plan, config: Config, info: RunInfo, samples: pa.Table, scored: Scored) -> None:
    """samples/, diff/ (against the previous published run), selections/ and report.html."""
    run = plan.run
    tables = {r.name: r.table for r in scored.selections}
    outputs.write_samples(run, samples)
    previous = plan.previous
    if previous is not None:
        info.diff = diff_runs(previous, samples, tables, run.child("diff"))
    for name, table in tables.items():
        outputs.write_table(run.child("selections", f"{name}.parquet"), table)
    if scored.corrections is not None:
        store, info.corrections = scored.corrections
        if store.num_rows:
            outputs.write_table(run.child(CORRECTIONS_FILE), store)
        new = store.filter(pc.equal(store["run_id"], plan.run_id)).select(["uri", "given_label", "label"])
        if new.num_rows and info.diff is not None:  # the nightly diff lists the corrections first applied tonight
            info.diff["corrections"] = {"new": new.num_rows,
                                        "listed": new.slice(0, DIFF_CORRECTIONS_LISTED).to_pylist()}
    if scored.leakage is not None:
        outputs.write_table(run.child("leakage.parquet"), scored.leakage[0])
        info.leakage = scored.leakage[1]
    if scored.drift is not None:  # part of the published run, so a retried job cannot lose the alarm
        scored.drift.profile.write(run)
        info.drift = scored.drift.summary
        if scored.drift.new_region_items is not None:
            outputs.write_table(run.child("drift.parquet"), scored.drift.new_region_items)
    report = scored.report or ReportAssets({r.name: r.mode for r in scored.selections})
    info.map = report.map_info
    write_bytes(run.child("report.html"), render_report(
        run_id=plan.run_id, samples=samples, run_info=info, selections=tables, modes=report.modes,
        galleries=report.galleries, thumbnails=report.thumbnails, scores_config=config.scores).encode("utf-8"))


def _swap_latest(plan: Plan, config: Config) -> None:
    """``_SUCCESS``, then ``latest`` -> this run if ``latest`` is still what preflight saw."""
    try:
        outputs.publish(plan.output, plan.run_id, expected_latest=plan.latest_tag, storage=config.storage)
    except PreconditionFailed:
        other = latest_run_id(read_tagged(plan.output.child("latest"), config.storage)[0])
        raise PublishConflict(f"another run ({other}) published to {plan.output.uri} while this one ran: "
                              f"this run is complete at {plan.run.uri} (_SUCCESS written) but latest was left "
                              f"pointing at {other}; rerun to publish a run that includes both") from None
