"""The job's last phase: every output written, then ``_SUCCESS``, then ``latest`` swapped by
compare-and-swap (see :func:`publish`)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.config import Config
from curation.drift import DriftResult
from curation.io import outputs
from curation.io.filesystem import PreconditionFailed, read_tagged, write_bytes
from curation.objects import PlacedObjects
from curation.report import ReportAssets, render_report
from curation.published_run import CORRECTIONS_FILE, latest_run_id
from curation.run_layout import OBJECT_CORRECTIONS_FILE, OBJECTS_FOLDER
from curation.run_diff import diff_runs
from curation.run_info import Counts, RunInfo
from curation.schema import is_ok

log = logging.getLogger(__name__)


from curation.clock import Clock
from curation.preflight import Plan

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
class Scored:
    """What the scores, selections and report phases produced for publication."""

    samples: pa.Table
    score_summary: dict[str, dict]  # score name -> its run.json summary
    selections: list  # SelectionResult, in config order
    report: ReportAssets | None = None
    leakage: tuple[pa.Table, dict] | None = None  # copies across splits (leakage.parquet, run.json)
    corrections: tuple[pa.Table, dict] | None = None  # label corrections kept with the run, and their counts
    drift: DriftResult | None = None  # tonight's profile, the comparison with the previous run, far new items
    objects: PlacedObjects | None = None  # detection runs: objects/, its run.json summary, the crop vectors


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
        info.diff = diff_runs(previous, samples, tables, run.child("diff"),
                              objects=scored.objects.table if scored.objects is not None else None)
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
    if scored.objects is not None:
        outputs.write_parquet_parts(run.child(OBJECTS_FOLDER), scored.objects.table)
        info.objects = scored.objects.summary
        if plan.objects is not None and plan.objects.corrections is not None:  # kept for the next nights
            outputs.write_table(run.child(OBJECT_CORRECTIONS_FILE), plan.objects.corrections)
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
        galleries=report.galleries, thumbnails=report.thumbnails, scores_config=config.scores,
        objects=scored.objects.table if scored.objects is not None else None).encode("utf-8"))


def _swap_latest(plan: Plan, config: Config) -> None:
    """``_SUCCESS``, then ``latest`` -> this run if ``latest`` is still what preflight saw."""
    try:
        outputs.publish(plan.output, plan.run_id, expected_latest=plan.latest_tag, storage=config.storage)
    except PreconditionFailed:
        other = latest_run_id(read_tagged(plan.output.child("latest"), config.storage)[0])
        raise PublishConflict(f"another run ({other}) published to {plan.output.uri} while this one ran: "
                              f"this run is complete at {plan.run.uri} (_SUCCESS written) but latest was left "
                              f"pointing at {other}; rerun to publish a run that includes both") from None
