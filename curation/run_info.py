"""``run.json``: what a run did, as one typed record.

The job builds it once (:meth:`RunInfo.build`, at publication); everything that reads a run's
summary (the CLI's closing screen, the report's header, the demo, a later command reading a
published run) goes through :class:`RunInfo` instead of indexing the JSON by string keys. The
JSON written is :meth:`RunInfo.to_dict`; ``docs/contract.md`` documents its keys.

The records are pydantic dataclasses: reading a ``run.json`` validates its types once
(:meth:`RunInfo.from_dict`). ``knn`` is typed (:class:`KnnRecord`: what the next night's graph
update and ``curation similar`` read; the index's other figures ride along as extra keys);
``config`` is the redacted config as written, read back typed by
:attr:`curation.published_run.PublishedRun.config`. Sections whose shape belongs to another module
stay plain dicts, owned there: ``scores`` (each score's ``summary``, read back by that score),
``balance`` (:mod:`curation.balance`), ``map`` (the report's map), ``diff``
(:mod:`curation.run_diff`).
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import field, fields
from typing import TYPE_CHECKING, Any
from importlib.metadata import PackageNotFoundError, version

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass
import pyarrow.compute as pc
from curation import __version__
from curation.balance import balance_stats
from curation.io.filesystem import StorageError, read_bytes, write_bytes
from curation.scores import REGISTRY

if TYPE_CHECKING:
    import pyarrow as pa

    from curation.config import Config
    from curation.io.filesystem import Location
    from curation.select_view import SelectionResult

FILE_NAME = "run.json"

# Reading a run.json: types checked, numbers as JSON has them; keys a newer version added are ignored.
_READ = ConfigDict(extra="ignore", arbitrary_types_allowed=True)


class _Open(BaseModel):
    """A record whose other keys (timings, sizes: figures for people) ride along unchanged."""

    model_config = ConfigDict(extra="allow")


class VectorsRecord(_Open):
    """Where a run's vectors are: Parquet ``files`` (in vector-id order), their ``column``."""

    files: list[str]
    column: str
    skips_rejected_rows: bool = False  # input.embeddings files: rejected rows hold no vector id


class IncrementalRecord(_Open):
    """Whether the graph was updated from the previous night's (``used``) or built whole (``reason``)."""

    used: bool = False
    reason: str | None = None
    nights_since_rebuild: int = 0
    margin: int = 0  # neighbours kept beyond k, for the next night's update


class KnnRecord(_Open):
    """How a run's neighbours were found (``run.json`` -> ``knn``; ``copies``: the copy graph's)."""

    k: int = 0
    kind: str | None = None
    codec: str | None = None
    nlist: int = 0
    nprobe: int = 0
    shards: int = 0
    shard_sizes: list[int] = []
    saved_to: str | None = None  # the index shards' folder, when saved
    coarse_distance: float | None = None
    method: str | None = None
    vectors: VectorsRecord | None = None
    incremental: IncrementalRecord | None = None
    copies: KnnRecord | None = None

    def to_dict(self) -> dict:
        """What was recorded, as it was given (no default added)."""
        return self.model_dump(exclude_unset=True)

    # Read like the JSON object it is written as (``info.knn["method"]``): the figures that have
    # no field of their own are reached this way.
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.to_dict()

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)


@dataclass(frozen=True, config=_READ)
class Counts:
    """Every input is either ``ok`` or ``rejected``; ``inputs = ok + rejected`` always."""

    inputs: int
    ok: int
    rejected: int


@dataclass(frozen=True, config=_READ)
class SelectionSummary:
    name: str
    mode: str
    rows: int
    eligible: int
    note: str | None = None
    pending: int | None = None  # to_label: items kept at the head from the previous run's queue
    details: dict | None = None  # validation: label/cluster TV distances, sticky members, leakage


@dataclass(config=_READ)
class RunInfo:
    """One run's ``run.json``.

    Attributes:
        run_id: The run's id (a folder under ``output.uri``).
        uri: Where the run was written.
        version: The curation package version that wrote it.
        counts: Inputs, ok and rejected items.
        flags: Items per flag (``is_exact_duplicate`` … ), from the scores' declarations.
        scores: Each score's own summary, by score name.
        class_balance: Ok items per label.
        balance: Label and metadata distributions, overall and per selection.
        embedder: The embedder's identity (``model_id`` …) and, in images mode, the store's counts.
        knn: How the neighbours were found (kind, parameters, timings, shard sizes).
        selections: One summary per selection.
        config: The config the run used, credentials redacted.
        versions: Python and library versions.
        map: How the report's embedding map was made.
        timings_s: Seconds per phase (and ``score_<name>`` per score, and ``total``).
        driver_peak_bytes: The driver's peak memory per phase.
        diff: Changes since the previous published run (absent on a first run).
        leakage: Copies across splits (absent when the run has no split).
        corrections: Label corrections applied, new, kept from earlier runs, unknown, conflicting.
        drift: Changes in the data since the previous published run and the alarm
            (:mod:`curation.drift`); ``skipped`` with the reason when they do not compare.
        objects: Detection runs: boxes in, ok, rejected, per class and by reason
            (:func:`curation.objects.objects_summary`).
    """

    run_id: str
    uri: str
    version: str
    counts: Counts
    flags: dict[str, int]
    scores: dict[str, dict]
    class_balance: dict[str, int]
    balance: dict
    embedder: dict
    knn: KnnRecord
    selections: list[SelectionSummary]
    config: dict
    versions: dict[str, str]
    map: dict = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    driver_peak_bytes: dict[str, int] = field(default_factory=dict)
    diff: dict | None = None
    leakage: dict | None = None
    corrections: dict | None = None
    drift: dict | None = None
    objects: dict | None = None

    # ---------------------------------------------------------------------------- building

    # Nine keyword parameters, kept: run.json gathers every phase's record; each arrives by name.
    @classmethod
    def build(cls, *, run_id: str, uri: str, samples: pa.Table, counts: Counts, score_summary: dict[str, dict],
              selections: list[SelectionResult], embedder: dict, knn: dict, config: Config) -> RunInfo:
        """The record of a finished run, from what its phases produced (``samples`` ordered and
        counted already)."""
        flags = {name: value for summary in score_summary.values() for name, value in summary.get("flags", {}).items()}
        labels = samples["label"].drop_null()
        class_balance = ({str(v["values"]): int(v["counts"]) for v in pc.value_counts(labels).to_pylist()}
                         if len(labels) else {})
        tables = {r.name: r.table for r in selections}
        return cls(
            run_id=run_id, uri=uri, version=__version__, counts=counts, flags=flags, scores=score_summary,
            class_balance=class_balance,
            balance=balance_stats(samples, tables, {c for s in REGISTRY for c in s.columns}),
            embedder=embedder, knn=KnnRecord.model_validate(knn),
            selections=[SelectionSummary(r.name, r.mode, r.table.num_rows, r.eligible, r.note, r.pending, r.details)
                        for r in selections],
            config=config.to_dict(redact=True), versions=package_versions())

    # ------------------------------------------------------------------------------ reading

    @property
    def model_id(self) -> str:
        """The embedder's id (``model@weights/size``), or what an embeddings-mode run recorded."""
        return str(self.embedder.get("model_id") or self.embedder.get("model") or "-")

    @property
    def store(self) -> dict | None:
        """The embedding store's ``{reused, embedded, rejected}`` for this run (images mode)."""
        return self.embedder.get("store")

    @property
    def input_uri(self) -> str:
        """What the run read: ``input.images``, ``input.manifest`` or ``input.embeddings``."""
        source = self.config.get("input") or {}
        return str(source.get("images") or source.get("manifest") or source.get("embeddings") or "-")

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["counts"] = {f.name: getattr(self.counts, f.name) for f in fields(Counts)}
        data["selections"] = [{f.name: getattr(s, f.name) for f in fields(SelectionSummary)} for s in self.selections]
        data["knn"] = self.knn.to_dict()
        for optional in ("diff", "leakage", "corrections", "drift", "objects"):
            if data[optional] is None:
                del data[optional]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> RunInfo:
        """Read a ``run.json`` document; raises ``ValueError`` naming what is missing or mistyped."""
        if not isinstance(data, dict):
            raise ValueError(f"run.json: expected an object, got {type(data).__name__}")
        missing = [name for name in ("run_id", "uri", "counts", "selections") if name not in data]
        if missing:
            raise ValueError(f"run.json: missing {', '.join(missing)}")
        values = dict(data)
        for name, default in (("version", ""), ("flags", {}), ("scores", {}), ("class_balance", {}), ("balance", {}),
                              ("embedder", {}), ("knn", {}), ("config", {}), ("versions", {})):
            if values.get(name) is None:
                values[name] = default
        try:
            return _RUN_INFO.validate_python(values)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"])
            raise ValueError(f"run.json: {where}: {error['msg']}") from None

    def write(self, run: Location) -> None:
        # Strict JSON (no NaN / Infinity tokens, which strict readers refuse): a non-finite
        # number is written as null.
        text = json.dumps(finite(self.to_dict()), indent=2, default=str, allow_nan=False)
        write_bytes(run.child(FILE_NAME), text.encode("utf-8"))

    @classmethod
    def read(cls, run: Location) -> RunInfo:
        """The ``run.json`` of the run at ``run``; ``ValueError`` naming the file when it is not one."""
        location = run.child(FILE_NAME)
        try:
            data = read_bytes(location)
        except FileNotFoundError:
            raise ValueError(f"{location.uri}: missing (the run has _SUCCESS but no run.json: "
                             f"it was damaged after it was published)") from None
        except (OSError, StorageError) as exc:
            raise ValueError(f"{location.uri}: cannot read ({str(exc).splitlines()[0][:200]})") from None
        try:
            return cls.from_dict(json.loads(data))
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"{location.uri}: not a run.json this version can read ({exc})") from None


_RUN_INFO = TypeAdapter(RunInfo)


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float (in dicts, lists and tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if hasattr(value, "dtype") and getattr(value, "shape", None) == ():  # a numpy scalar
        return finite(value.item())
    return value


def package_versions() -> dict[str, str]:
    """Package versions from their metadata (importing torch on the driver would cost ~300 MB)."""
    out = {"python": platform.python_version()}
    for name in ("ray", "torch", "torchvision", "faiss-cpu", "pyarrow", "scikit-learn", "cuml-cu13"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out
