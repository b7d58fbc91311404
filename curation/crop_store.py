"""Crop vectors from night to night: what makes a detection run's objects incremental.

Every crop vector a run stores (``object-embeddings/``) carries its ``crop_key``
(:func:`curation.item_key.crop_keys`: its image's version, the box's geometry as the
annotations give it, and the crop settings). The embedding store keeps them beside the image
vectors (``<store>/<model>/objects/snapshot-<run_id>/``, its own ``CURRENT``), and the next
night sorts each image with boxes into one of three cases:

* image and every crop stored: nothing is read or decoded; its vector and its crops' vectors
  are copied from the store;
* image stored, some crops not (a box added, moved or resized): the image is decoded for
  those crops only -- its own vector is copied, not embedded again, and so are its unchanged
  boxes' crops (``crop_only`` rows: the decode stage cuts the missing crops, the embedding
  actors embed only them; :func:`copy_stored_crops` copies the rest, one Ray task per file);
* image not stored (new or changed file): decoded and embedded whole, every crop cut.

Background squares (the spurious-box evidence) are placed away from the image's boxes, so
their keys depend on the whole box set: a changed box set cuts them again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.annotations import box_matrix
from curation.config_sections import ObjectsConfig
from curation.io.filesystem import Location
from curation.io.store import EmbeddingStore, StagedSnapshot, current_snapshot_files
from curation.item_key import background_keys, crop_keys, key_hashes
from curation.objects import ObjectsInput, within_cap
from curation.schema import is_ok
from curation.session import run_tasks

log = logging.getLogger(__name__)

CROP_KEY = "crop_key"


@dataclass(frozen=True)
class CropPlan:
    """A detection run's crops, before any decode: every usable box (within the per-image cap)
    sorted by its image (``owner``: its ``input_id``; ``rows``: its row in the objects table;
    ``raw``: ``[x, y, w, h]`` as given; ``keys``: its crop key; ``bounds``: each input's slice),
    and ``backgrounds`` (``(n_inputs, objects.background_crops)``: the keys of each image's
    background squares; only images with boxes get any)."""

    rows: np.ndarray
    owner: np.ndarray
    raw: np.ndarray
    keys: np.ndarray
    bounds: np.ndarray
    backgrounds: np.ndarray
    settings: dict

    @property
    def has_boxes(self) -> np.ndarray:
        return np.diff(self.bounds) > 0


def crop_settings(objects: ObjectsInput, cfg: ObjectsConfig) -> dict:
    """The decode stage's ``objects`` argument."""
    return {"units": objects.units, "margin": cfg.context_margin, "tolerance_px": cfg.clip_tolerance_px,
            "min_size_px": cfg.min_size_px, "backgrounds": cfg.background_crops}


def plan_crops(objects: ObjectsInput, inputs: pa.Table, cfg: ObjectsConfig) -> CropPlan:
    """The crops of a detection run (see :class:`CropPlan`); placement is the decode stage's,
    by the same rule as :func:`curation.objects.place_objects`."""
    boxes = objects.boxes
    n = inputs.num_rows
    usable = is_ok(boxes["status"]) & within_cap(boxes, cfg.max_per_image) & boxes["input_id"].is_valid().to_numpy(
        zero_copy_only=False)
    rows = np.flatnonzero(usable)
    owner = boxes["input_id"].to_numpy(zero_copy_only=False)[rows].astype(np.int64)
    raw = box_matrix(boxes["bbox"].take(pa.array(rows)))[0]
    order = np.argsort(owner, kind="stable")
    rows, owner, raw = rows[order], owner[order], raw[order]
    bounds = np.searchsorted(owner, np.arange(n + 1))
    settings = crop_settings(objects, cfg)
    salt = json.dumps(settings, sort_keys=True)
    image_keys = key_hashes(inputs["uri"], inputs["fingerprint"]) if "fingerprint" in inputs.column_names \
        else np.zeros(n, np.int64)
    keys = crop_keys(image_keys[owner], raw, salt=salt)
    has = np.diff(bounds) > 0
    backgrounds = background_keys(np.where(has, image_keys, 0), [keys[a:b] for a, b in zip(bounds[:-1], bounds[1:])],
                                  cfg.background_crops, salt=salt)
    return CropPlan(rows, owner, raw, keys, bounds, backgrounds, settings)


@dataclass(frozen=True)
class CropWork:
    """What tonight does with each crop of a :class:`CropPlan`: ``cut`` (per planned box: cut
    and embed it), ``cut_backgrounds`` (per input: cut its background squares), ``crop_only``
    (per input: decoded only for crops; its image vector comes from the store) and the stored
    crops to copy (``reuse``: None when none)."""

    cut: np.ndarray
    cut_backgrounds: np.ndarray
    crop_only: np.ndarray
    reuse: "StoredCrops | None"

    @staticmethod
    def whole(plan: CropPlan) -> "CropWork":
        """Every crop cut (no crop store)."""
        has = plan.has_boxes
        return CropWork(np.ones(len(plan.keys), bool), has, np.zeros(len(has), bool), None)

    def decode_columns(self, plan: CropPlan) -> dict[str, pa.Array]:
        """Per input, the decode stage's box columns (see
        :class:`~curation.stages.decode.DecodeStage`) and ``crop_only``."""
        boxes, rows, cut, keys = [], [], [], []
        for i, (a, b) in enumerate(zip(plan.bounds[:-1], plan.bounds[1:])):
            decoded = b > a and (self.cut[a:b].any() or self.cut_backgrounds[i])
            # Every box of the image travels (they set the decode scale and keep the
            # background squares off themselves); box_cut says which to cut.
            boxes.append(plan.raw[a:b].tobytes() if decoded else b"")
            rows.append(plan.rows[a:b].astype(np.int64).tobytes() if decoded else b"")
            cut.append(self.cut[a:b].astype(np.uint8).tobytes() if decoded else b"")
            extra = plan.backgrounds[i] if self.cut_backgrounds[i] else np.zeros(0, np.int64)
            keys.append(np.concatenate([plan.keys[a:b], extra]).astype(np.int64).tobytes() if decoded else b"")
        return {"boxes": pa.array(boxes, pa.binary()), "box_rows": pa.array(rows, pa.binary()),
                "box_cut": pa.array(cut, pa.binary()), "box_keys": pa.array(keys, pa.binary()),
                "crop_only": pa.array(self.crop_only, pa.bool_())}


@dataclass(frozen=True)
class StoredCrops:
    """Crop vectors of the store that tonight copies: ``keys`` (sorted), for each the
    objects-table row (``object_rows``; -1 for a background square) and image (``input_ids``)
    it becomes tonight, and the ``files`` holding them (``owners``: which file supplies each)."""

    files: list[Location]
    keys: np.ndarray
    object_rows: np.ndarray
    input_ids: np.ndarray
    owners: np.ndarray
    model_id: str

    @property
    def count(self) -> int:
        return len(self.keys)


class CropStore:
    """The crop vectors of one embedder identity, beside its image vectors."""

    def __init__(self, store: EmbeddingStore):
        self.root = store.root.child("objects")
        self.model_id = store.model_id

    def stored_keys(self) -> tuple[list[Location], np.ndarray, np.ndarray]:
        """The stored crop keys (sorted, unique), the files and, per key, the file holding it
        (the first one). Only keys are read here (8 bytes a crop)."""
        files, keys, owner = [], [], []
        for location in current_snapshot_files(self.root):
            try:
                table = pq.read_table(location.path, columns=[CROP_KEY, "model_id"], filesystem=location.filesystem)
            except (OSError, pa.ArrowException) as exc:
                log.warning("crop store: skipping unreadable %s (%s)", location.uri, str(exc).splitlines()[0])
                continue
            mine = pc.equal(table["model_id"], self.model_id).to_numpy(zero_copy_only=False)
            keys.append(table[CROP_KEY].to_numpy()[mine])
            owner.append(np.full(int(mine.sum()), len(files), np.int32))
            files.append(location)
        if not keys:
            return [], np.zeros(0, np.int64), np.zeros(0, np.int32)
        unique, first = np.unique(np.concatenate(keys), return_index=True)
        return files, unique, np.concatenate(owner)[first]

    def plan(self, plan: CropPlan, image_reused: np.ndarray) -> CropWork:
        """Sort tonight's crops (see the module's docstring). ``image_reused``: per input,
        whether its image vector comes from the embedding store."""
        files, stored, owner = self.stored_keys()
        box_stored = np.isin(plan.keys, stored) & (plan.keys != 0)
        bg = plan.backgrounds
        # A crowded image may have had fewer squares cut than asked: its first one stands for the set.
        bg_stored = np.isin(bg[:, 0], stored) if bg.shape[1] else np.ones(len(bg), bool)
        has = plan.has_boxes
        missing = has & ((np.bincount(plan.owner[~box_stored], minlength=len(has)) > 0) | ~bg_stored)
        whole = ~image_reused  # decoded and embedded whole: every crop cut
        crop_only = image_reused & missing
        reuse_box = box_stored & image_reused[plan.owner]
        reuse_bg = has & bg_stored & image_reused
        cut = ~reuse_box
        cut_backgrounds = has & (whole | ~bg_stored)
        wanted_keys = [plan.keys[reuse_box]]
        wanted_rows = [plan.rows[reuse_box]]
        wanted_images = [plan.owner[reuse_box]]
        for i in np.flatnonzero(reuse_bg):
            present = bg[i][np.isin(bg[i], stored)]
            wanted_keys.append(present)
            wanted_rows.append(np.full(len(present), -1, np.int64))
            wanted_images.append(np.full(len(present), i, np.int64))
        keys = np.concatenate(wanted_keys).astype(np.int64)
        reuse = None
        if len(keys):
            order = np.argsort(keys, kind="stable")
            keys = keys[order]
            reuse = StoredCrops(files, keys, np.concatenate(wanted_rows).astype(np.int64)[order],
                                np.concatenate(wanted_images).astype(np.int64)[order],
                                owner[np.searchsorted(stored, keys)], self.model_id)
        log.info("crop store: %d crops stored for %d images; tonight %d copied, %d cut (%d images decoded only "
                 "for crops)", len(stored), int(has.sum()), len(keys), int(cut.sum()), int(crop_only.sum()))
        return CropWork(cut, cut_backgrounds, crop_only, reuse)

    def stage(self, vector_files: list[Location], run_id: str, rows: int) -> StagedSnapshot:
        """Copy tonight's crop vector files into a new snapshot (``CURRENT`` moves once the
        run has published, with the image vectors')."""
        return EmbeddingStore.stage_into(self.root, vector_files, run_id, rows)


def copy_stored_crops(reuse: StoredCrops, *, folder: Location) -> list[str]:
    """Copy the crop vectors ``reuse`` names from the crop store into ``folder``: one Ray task
    per stored file, given only that file's keys (the vectors never reach the driver). Returns
    the names of the files written."""
    args = []
    for f, location in enumerate(reuse.files):
        mine = reuse.owners == f
        if mine.any():
            args.append((location, reuse.keys[mine], reuse.object_rows[mine], reuse.input_ids[mine],
                         reuse.model_id, folder))
    return sorted(name for name in run_tasks(_copy_one_file, args) if name)


def _copy_one_file(location: Location, keys: np.ndarray, object_rows: np.ndarray, input_ids: np.ndarray,
                   model_id: str, folder: Location) -> str | None:
    """The rows of one stored crop file that tonight copies (``keys`` sorted), renumbered to
    tonight's objects table and inputs, written to ``folder``."""
    table = pq.read_table(location.path, columns=[CROP_KEY, "embedding", "model_id"], filesystem=location.filesystem)
    found = table[CROP_KEY].to_numpy()
    pos = np.minimum(np.searchsorted(keys, found), max(len(keys) - 1, 0))
    hit = (len(keys) > 0) & (keys[pos] == found) & pc.equal(table["model_id"], model_id).to_numpy(
        zero_copy_only=False)
    where = pos[hit]
    mask = pa.array(hit)
    return write_stored_crops(folder, pa.table({
        "object_row": pa.array(object_rows[where], pa.int64()), "input_id": pa.array(input_ids[where], pa.int64()),
        "embedding": table["embedding"].filter(mask), "model_id": table["model_id"].filter(mask),
        CROP_KEY: pa.array(found[hit], pa.int64())}))


def write_stored_crops(folder: Location, rows: pa.Table) -> str | None:
    """One block of copied crop vectors as an ``object-embeddings/`` file named by its content
    (``stored-<hash>.parquet``: a write task Ray reruns overwrites its own file)."""
    if not rows.num_rows:
        return None
    rows = rows.sort_by(CROP_KEY)
    digest = hashlib.blake2b(rows[CROP_KEY].to_numpy().tobytes(), digest_size=8).hexdigest()
    name = f"stored-{digest}.parquet"
    folder.filesystem.create_dir(folder.path, recursive=True)
    target = folder.child(name)
    pq.write_table(rows, target.path, filesystem=target.filesystem)
    return name
