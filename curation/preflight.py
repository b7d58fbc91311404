"""The job's first phase: everything that can fail before any work, and the :class:`Plan` it
hands the others (where the run goes, what it reads, the previous published run resolved once,
the corrections parsed and checked)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from curation.config import Config, ConfigError
from curation.io import inputs as inputs_io, outputs
from curation.io.filesystem import Location, Resolver, read_tagged
from curation.published_run import PublishedRun, is_published
from curation.schema import INPUT_COLUMNS, INTERNAL_COLUMNS, SAMPLES_CONTRACT, SAMPLES_EXTRA
from curation.corrections import CorrectionsError, check_answers, read_answers
from curation.embedder_check import check_embedder
from curation.annotations import AnnotationsError
from curation.box_corrections import read_box_answers, with_box_corrections
from curation.run_layout import OBJECT_CORRECTIONS_FILE
from curation.objects import ObjectsInput, read_objects
from curation.object_vectors import read_object_embeddings
from curation.scores import reserved_columns
from curation.object_scores import OBJECTS_MANIFEST
from curation.select import check_selection_columns
from curation.select_boxes import MODE as BOX_MODE, OBJECT_LABEL

log = logging.getLogger(__name__)


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
    objects: ObjectsInput | None = None  # input.annotations' boxes, joined to the inputs

    @property
    def run(self) -> Location:
        return self.output.child(self.run_id)


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
        if config.input.object_embeddings:
            plan.objects = read_object_embeddings(config, resolver)
    else:
        check_embedder(config.embedder.model, config.embedder.weights, resolver=resolver)
        plan.inputs = inputs_io.list_inputs(config, resolver)
        plan.count = plan.inputs.num_rows
        if config.input.annotations:
            try:
                plan.objects = read_objects(config, resolver, plan.inputs)
            except AnnotationsError as exc:
                raise ConfigError(f"config key 'input.annotations': {exc}") from None
        metadata = [n for n in plan.inputs.column_names if n not in INPUT_COLUMNS]
    if config.input.split_column and config.input.split_column not in metadata:
        raise ConfigError(f"config key 'input.split_column': no column {config.input.split_column!r} in the inputs "
                          f"(columns: {', '.join(metadata) or 'none'})")
    _check_selection_columns(config, metadata, plan)
    if plan.objects is not None and plan.inputs is not None:  # a detection run's corrections are of boxes
        plan.objects = _box_corrections(config, resolver, plan)
    elif config.input.label_corrections:
        plan.answers = _checked_corrections(config, resolver, plan)
    return plan


def _box_corrections(config: Config, resolver: Resolver, plan: Plan):
    """The box corrections of ``input.label_corrections`` (checked before any work) and those
    the previous published run kept, applied to the boxes (:mod:`curation.box_corrections`)."""
    new = None
    if config.input.label_corrections:
        location = resolver.resolve(config.input.label_corrections)
        try:
            new, skipped = read_box_answers(location)
            if new.num_rows and not pc.any(pc.is_in(new["uri"], value_set=plan.inputs["uri"])).as_py():
                raise CorrectionsError(f"{location.uri}: none of its {new.num_rows} box corrections is on an input "
                                       f"of this run (e.g. {new['uri'][0].as_py()[:200]!r})")
            unknown = sorted(set(new["label"].drop_null().to_pylist()) - set(plan.objects.classes))
            if unknown and not config.input.allow_new_classes:
                raise CorrectionsError(f"{location.uri}: {len(unknown)} label(s) the annotations have no class for, "
                                       f"e.g. {unknown[0][:80]!r}; set input.allow_new_classes to add classes")
        except CorrectionsError as exc:
            raise ConfigError(f"config key 'input.label_corrections': {exc}") from None
        log.info("box corrections: %d in %s (%s)", new.num_rows, location.uri, skipped)
    stored = None
    if plan.previous is not None:
        kept = plan.previous.child(OBJECT_CORRECTIONS_FILE)
        try:
            stored = pq.read_table(kept.path, filesystem=kept.filesystem)
        except (OSError, pa.ArrowException):
            stored = None  # that run kept none
    if new is None and stored is None:
        return plan.objects
    return with_box_corrections(plan.objects, plan.inputs, new=new, stored=stored, run_id=plan.run_id)


def _checked_corrections(config: Config, resolver: Resolver, plan: Plan) -> dict[str, list[str]]:
    """``input.label_corrections`` parsed and checked against the inputs' items and classes
    (and the classes the previous run's kept corrections made), before any work."""
    location = resolver.resolve(config.input.label_corrections)
    if plan.inputs is not None:
        uris, labels = plan.inputs["uri"], plan.inputs["label"] if "label" in plan.inputs.column_names else None
    else:
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
    fields = list(SAMPLES_CONTRACT) + list(SAMPLES_EXTRA)
    known = {f.name for f in fields}
    fields += [pa.field(name, pa.float64()) for name in sorted(reserved_columns() - known - set(INTERNAL_COLUMNS))]
    source = plan.inputs.schema if plan.inputs is not None else None
    for name in metadata:
        fields.append(source.field(name) if source is not None else pa.field(name, pa.string()))
    images = [sel for sel in config.selections if sel.mode != BOX_MODE]
    boxes = [sel for sel in config.selections if sel.mode == BOX_MODE]
    if boxes and plan.objects is None:
        raise ConfigError(f"selection {boxes[0].name!r}: mode {BOX_MODE} selects boxes; it needs input.annotations")
    by_objects = [sel for sel in images if sel.balance_on == OBJECT_LABEL]
    if by_objects and plan.objects is None:
        raise ConfigError(f"selection {by_objects[0].name!r}: balance_on {OBJECT_LABEL} balances over the boxes' "
                          f"classes; it needs input.annotations")
    to_label = [sel for sel in by_objects if sel.mode == "to_label"]
    if to_label:
        raise ConfigError(f"selection {to_label[0].name!r}: balance_on {OBJECT_LABEL} does not apply to mode to_label "
                          f"(it picks images the annotations do not list, which have no boxes to balance by)")
    images = [sel.model_copy(update={"balance_on": None}) if sel.balance_on == OBJECT_LABEL else sel for sel in images]
    check_selection_columns(images, pa.schema(fields))
    check_selection_columns(boxes, OBJECTS_MANIFEST)  # a box_review's where and balance_on name box columns
