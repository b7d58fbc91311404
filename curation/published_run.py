"""A published run: one typed object for its layout and what the next night, ``similar`` and
``export`` read of it.

A run folder is published when it holds ``_SUCCESS`` (written after every other output); the
output folder's ``latest`` names the newest published run (JSON ``{"run_id", "uri"}``, moved by
compare-and-swap). Everything that reads a published run goes through :class:`PublishedRun`:
preflight resolves the previous run once (``PublishedRun.named_by_latest``), the diff, drift,
the graph update, the map, the label probe and stored corrections take it; ``curation similar``
and ``curation export`` resolve theirs with :meth:`PublishedRun.resolve`. The file names of a
run's layout are spelled in :mod:`curation.run_layout` (writers and this reader share them).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import cached_property

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.dataset as ds

from curation.config import Config, is_run_id, recorded_config
from curation.io.filesystem import Location, read_bytes
from curation.run_layout import (CORRECTIONS_FILE, LATEST, PROBE_FILE, SUCCESS,  # noqa: F401 (public here too)
                                 TRAINED_INDEX, shard_file)
from curation.run_info import RunInfo
from curation.schema import is_ok
from curation.drift_profile import Profile

log = logging.getLogger(__name__)

def latest_run_id(data: bytes | None) -> str | None:
    """The run id a ``latest`` file names (its bytes), or None when absent or unreadable: the
    one parser of ``latest``. A ``latest`` naming anything but a plain run folder (``../x``,
    ``a/b``: written by hand or by an older version) is unreadable, never followed."""
    if not data:
        return None
    try:
        run_id = json.loads(data)["run_id"]
    except (ValueError, KeyError, TypeError):
        return None
    if not is_run_id(run_id):
        log.warning("latest names %r, which is not a run folder name: ignored", run_id)
        return None
    return run_id


def latest_bytes(data: dict) -> bytes:
    """What ``latest`` holds when it names the run ``data`` describes (``run_id``, ``uri``)."""
    return json.dumps(data, indent=1).encode()


def is_published(location: Location) -> bool:
    return location.filesystem.get_file_info(location.child(SUCCESS).path).type == pafs.FileType.File


@dataclass(frozen=True)
class PublishedRun:
    """A complete run folder (it holds ``_SUCCESS``). Build one with :meth:`at`,
    :meth:`named_by_latest` or :meth:`resolve`, which return None when there is none."""

    location: Location

    # ------------------------------------------------------------------ finding one

    @classmethod
    def at(cls, location: Location) -> PublishedRun | None:
        """The run at ``location`` when it is published."""
        return cls(location) if is_published(location) else None

    @classmethod
    def named_by_latest(cls, output: Location, latest: bytes | None) -> PublishedRun | None:
        """The published run ``latest`` (its bytes, as read once) names under ``output``."""
        run_id = latest_run_id(latest)
        return cls.at(output.child(run_id)) if run_id is not None else None

    @classmethod
    def resolve(cls, location: Location) -> PublishedRun | None:
        """``location`` itself when it is a published run, else the published run its
        ``latest`` names (an output folder meaning its newest run); None when neither. The one
        resolver for commands that read a published run."""
        if is_published(location):
            return cls(location)
        try:
            latest = read_bytes(location.child(LATEST))
        except OSError:
            return None
        return cls.named_by_latest(location, latest)

    # ------------------------------------------------------------------ where things are

    @property
    def uri(self) -> str:
        return self.location.uri

    @property
    def run_id(self) -> str:
        return self.location.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def filesystem(self):
        return self.location.filesystem

    @property
    def path(self) -> str:
        return self.location.path

    def child(self, *parts: str) -> Location:
        return self.location.child(*parts)

    # ------------------------------------------------------------------ what it holds

    @cached_property
    def info(self) -> RunInfo:
        """Its ``run.json`` (``ValueError`` naming the file when it cannot be read)."""
        return RunInfo.read(self.location)

    @cached_property
    def config(self) -> Config:
        """The config the run recorded, typed (:func:`~curation.config.recorded_config`): readers
        take its values and defaults from here, never restate them."""
        return recorded_config(self.info.config)

    def info_or_none(self) -> RunInfo | None:
        """Its ``run.json``, or None when it cannot be read (the next night then builds afresh)."""
        try:
            return self.info
        except (OSError, ValueError):
            return None

    def items(self, columns: list[str], *, ok_only: bool = True) -> pa.Table | None:
        """Its ``samples/`` rows (the ok ones unless ``ok_only`` is off): the item key columns
        (``uri``, ``fingerprint``) and those of ``columns`` it has; None when unreadable."""
        folder = self.child("samples")
        try:
            dataset = ds.dataset(folder.path, filesystem=folder.filesystem, format="parquet")
            wanted = dict.fromkeys(["uri", "fingerprint", "status", *columns])
            table = dataset.to_table(columns=[c for c in wanted if c in dataset.schema.names])
        except (OSError, pa.ArrowException, ValueError):
            return None
        if ok_only and "status" in table.column_names:
            table = table.filter(pa.array(is_ok(table["status"])))
        return table

    def selection(self, name: str, columns: list[str] | None = None) -> pa.Table | None:
        """Its selection ``name`` (those of ``columns`` it has), or None when it has none."""
        location = self.child("selections", f"{name}.parquet")
        try:
            dataset = ds.dataset(location.path, filesystem=location.filesystem, format="parquet")
            names = dataset.schema.names
            return dataset.to_table(columns=[c for c in columns if c in names] if columns is not None else None)
        except (OSError, pa.ArrowException, ValueError):
            return None

    def probe_state(self) -> bytes | None:
        """The label probe's saved models (None when the run kept none)."""
        try:
            return read_bytes(self.child(PROBE_FILE))
        except (FileNotFoundError, OSError):
            return None

    def profile(self):
        """Its drift profile (:class:`~curation.drift_profile.Profile`; None when it kept none)."""
        return Profile.read(self.location)

    @property
    def corrections_file(self) -> Location:
        return self.child(CORRECTIONS_FILE)
