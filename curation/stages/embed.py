"""Embed decoded pixels with a torch model: a Ray Data actor-pool callable.

The model is loaded once per actor (in ``setup``, called from the constructor) and every batch
runs under ``torch.inference_mode``; output is L2-normalised float32. On GPU the batch is
copied through a pinned buffer without blocking and run channels-last under bf16 autocast; the
embeddings come back through another pinned buffer while the host builds the other columns.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import torch

from curation.embedders import load_embedder
from curation.io.filesystem import Resolver
from curation.schema import STATUS_REJECTED, is_ok
from curation.stages.decode_torch import DecodedFeatures, TorchDecoder


class DeviceDecoded(NamedTuple):
    """Rows of a batch decoded on the embedding actor's device (ascending), their model inputs
    there, and their features on the way to the host (one entry per file sent to the device:
    ``pending.decoded`` marks these rows among them)."""

    rows: np.ndarray
    pixels: torch.Tensor
    pending: DecodedFeatures


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class EmbedStage:
    """Batch callable: ``pixels`` (N, S, S, 3) uint8 -> ``embedding`` fixed_size_list<float32>[D].

    Rows whose ``status`` is not ``ok`` get a null embedding. ``pixels`` is dropped.

    With ``decode`` (``decode.path: torch``), rows whose ``jpeg`` column holds a file are
    decoded here first, as one batch on this actor's device
    (:class:`~curation.stages.decode_torch.TorchDecoder`): their model inputs stay on the
    device for the model, and their size, statistics and hashes fill the batch's columns. The
    other rows' ``pixels`` then arrive as bytes (the read tasks send no placeholder for a
    deferred row). A file that decoder refuses goes through the CPU decode here (it is rare:
    the read tasks sent only plain, complete JPEGs), so its ``rejected`` reason is the CPU
    path's.

    Args:
        model, weights, image_size: see :func:`curation.embedders.load_embedder`.
        device: ``auto`` | ``cpu`` | ``cuda``.
        precision: ``auto`` (bf16 on GPU, fp32 on CPU) | ``fp32`` | ``bf16``.
        num_threads: torch intra-op threads on CPU (match the actor's CPU reservation).
        resolver: for weights given as ``s3://`` URIs.
        decode: ``{"max_pixels": ..., "background": ...}`` to decode the ``jpeg`` column here.
    """

    def __init__(self, *, model: str, weights: str, image_size: int, device: str = "auto",
                 precision: str = "auto", num_threads: int | None = None, resolver: Resolver | None = None,
                 decode: dict | None = None):
        self.decode_settings = decode
        self.model_name = model
        self.weights = weights
        self.image_size = image_size
        self.device = pick_device(device)
        self.precision = precision
        self.num_threads = num_threads
        self.resolver = resolver
        self.setup()

    def setup(self) -> None:
        if self.num_threads and self.device == "cpu":
            torch.set_num_threads(self.num_threads)
        net, self.identity = load_embedder(self.model_name, self.weights, image_size=self.image_size,
                                           resolver=self.resolver)
        self.net = net.to(self.device)
        if self.device == "cuda":
            self.net = self.net.to(memory_format=torch.channels_last)
        mean = torch.tensor(self.identity.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.identity.std, dtype=torch.float32).view(1, 3, 1, 1)
        self.scale = (1.0 / (255.0 * std)).to(self.device)
        self.shift = (mean / std).to(self.device)
        self._staging: torch.Tensor | None = None  # pinned model inputs (GPU)
        self._outputs: torch.Tensor | None = None  # pinned embeddings (GPU)
        use_bf16 = self.precision == "bf16" or (self.precision == "auto" and self.device == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        self.decoder = None
        if self.decode_settings is not None:
            self.decoder = TorchDecoder(image_size=self.image_size, device=self.device)

    def decode_deferred(self, batch: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], DeviceDecoded | None]:
        """Decode the rows the read tasks left as JPEG bytes (see the class). Returns the batch
        without its ``jpeg`` column, and the rows decoded on the device (None when no row was
        left); a file the device refused is decoded here by the CPU path, into the batch."""
        from curation.stages.decode import RejectedInput, decode_image

        files = batch.pop("jpeg")
        rows = np.flatnonzero(np.fromiter((bool(f) for f in files), bool, len(files)))
        if not len(rows):
            return batch, None
        # Written below, so copied: the caller's batch stays as it was (the columns are shallow).
        batch = {key: (value.copy() if isinstance(value, np.ndarray) else value) for key, value in batch.items()}
        data = [files[i] for i in rows]
        pixels, decoded, pending = self.decoder.start(data)
        for j in np.flatnonzero(~decoded):  # the CPU path, for its pixels or its reason (rare)
            i = rows[j]
            try:
                one = decode_image(data[j], image_size=self.image_size, max_pixels=self.decode_settings["max_pixels"],
                                   background=tuple(self.decode_settings["background"]))
            except RejectedInput as exc:
                batch["status"][i], batch["reason"][i], batch["pixel_hash"][i] = STATUS_REJECTED, str(exc), ""
                continue
            batch["pixels"][i] = one.pixels.tobytes()
            for field in dataclasses.fields(one):
                if field.name != "pixels":
                    batch[field.name][i] = getattr(one, field.name)
        if not decoded.all():
            pixels = pixels[torch.as_tensor(np.flatnonzero(decoded), device=pixels.device)]
        return batch, DeviceDecoded(rows=rows[decoded], pixels=pixels, pending=pending)

    def _host_pixels(self, column: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """``(len(rows), S, S, 3)`` uint8 model inputs of ``rows`` from the ``pixels`` column:
        an array of them (the CPU path), or their bytes (read tasks that left JPEGs to this
        actor send only the rows they decoded, as bytes)."""
        size = self.image_size
        if column.dtype != object:
            return column if len(rows) == len(column) else column[rows]
        if not len(rows):
            return np.zeros((0, size, size, 3), np.uint8)
        return np.frombuffer(b"".join(column[i] for i in rows), np.uint8).reshape(len(rows), size, size, 3)

    def _to_device(self, pixels: np.ndarray) -> torch.Tensor:
        """``(N, S, S, 3)`` uint8 on the host -> ``(N, 3, S, S)`` uint8 on this actor's device
        (a view of NHWC memory: channels-last, the layout the GPU path runs in). On a GPU
        through one pinned buffer kept for the actor's life, copied without blocking."""
        if self.device != "cuda":
            with warnings.catch_warnings():  # read-only Arrow memory: forward() reads it, never writes
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                return torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2)
        n = len(pixels)
        if self._staging is None or self._staging.shape[0] < n:
            self._staging = torch.empty((n, *pixels.shape[1:]), dtype=torch.uint8, pin_memory=True)
        staged = self._staging[:n]
        # The previous batch's copy out of this buffer was waited for before that batch returned.
        np.copyto(staged.numpy(), pixels)
        return staged.to(self.device, non_blocking=True).permute(0, 3, 1, 2)

    def model_inputs(self, column: np.ndarray, ok: np.ndarray, decoded_here: DeviceDecoded | None = None
                     ) -> torch.Tensor:
        """``(m, 3, S, S)`` uint8 on this actor's device for the ``ok`` rows, in order: the
        rows ``decoded_here`` from their pixels already on the device, the others from the
        ``pixels`` column."""
        ok_rows = np.flatnonzero(ok)
        if decoded_here is None or not len(decoded_here.rows):
            return self._to_device(self._host_pixels(column, ok_rows))
        device_rows, device_pixels = decoded_here.rows, decoded_here.pixels
        on_device = np.isin(ok_rows, device_rows)
        if on_device.all() and len(device_rows) == len(ok_rows):
            return device_pixels
        size = self.image_size
        x = torch.empty((len(ok_rows), 3, size, size), dtype=torch.uint8, device=self.device)
        at = torch.as_tensor(np.flatnonzero(on_device), device=self.device)
        x[at] = device_pixels[torch.as_tensor(np.searchsorted(device_rows, ok_rows[on_device]), device=self.device)]
        if not on_device.all():
            host_rows = ok_rows[~on_device]
            x[torch.as_tensor(np.flatnonzero(~on_device), device=self.device)] = self._to_device(
                self._host_pixels(column, host_rows))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, S, S)`` uint8 on the device -> ``(N, D)`` float32 L2-normalised, on the
        device (on a GPU, queued: nothing waits for it here)."""
        x = x.float()  # keeps a channels-last view's strides
        x = x.mul_(self.scale).sub_(self.shift)  # (x / 255 - mean) / std in one pass each
        if self.device == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            if self.autocast_dtype is not None:
                with torch.autocast(device_type=self.device, dtype=self.autocast_dtype):
                    feats = self.net(x)
            else:
                feats = self.net(x)
            feats = feats.reshape(feats.shape[0], -1).float()
            return torch.nn.functional.normalize(feats, dim=1)

    def _send(self, feats: torch.Tensor):
        """Start the features' copy to the host; :meth:`_receive` waits for it."""
        if self.device != "cuda":
            return feats, None
        n, dim = feats.shape
        if self._outputs is None or self._outputs.shape[0] < n or self._outputs.shape[1] != dim:
            self._outputs = torch.empty((n, dim), dtype=torch.float32, pin_memory=True)
        host = self._outputs[:n]
        host.copy_(feats, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host, done

    @staticmethod
    def _receive(sent) -> np.ndarray:
        host, done = sent
        if done is None:
            return host.numpy()
        done.synchronize()
        return host.numpy().copy()  # the pinned buffer serves the next batch

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 -> (N, D) float32, L2-normalised."""
        return self._receive(self._send(self.forward(self._to_device(pixels))))

    def embed_crops(self, crops: np.ndarray, crop_rows: np.ndarray, ok: np.ndarray) -> dict[str, pa.Array]:
        """The crops the decode stage cut (``S*S*3`` bytes each, concatenated per row) embedded
        in chunks of at most ``CROP_CHUNK``: ``crop_rows`` (int64 bytes, which boxes) and
        ``crop_vectors`` (their float32 vectors' bytes, in the same order) per row."""
        size, dim = self.image_size, self.identity.dim
        counts = np.array([len(c) // (size * size * 3) if ok[i] and c else 0 for i, c in enumerate(crops)], np.int64)
        vectors = np.zeros((int(counts.sum()), dim), np.float32)
        if len(vectors):
            pixels = np.frombuffer(b"".join(c for i, c in enumerate(crops) if counts[i]), np.uint8)
            pixels = pixels.reshape(-1, size, size, 3)
            for start in range(0, len(pixels), CROP_CHUNK):
                vectors[start:start + CROP_CHUNK] = self.embed(pixels[start:start + CROP_CHUNK])
        ends = np.cumsum(counts)
        starts = ends - counts
        return {"crop_rows": pa.array([crop_rows[i] if counts[i] else b"" for i in range(len(crops))], pa.binary()),
                "crop_vectors": pa.array([vectors[a:b].tobytes() for a, b in zip(starts, ends)], pa.binary())}

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        decoded_here = None
        if "jpeg" in batch:
            batch, decoded_here = self.decode_deferred(dict(batch))
        status = batch["status"]
        decoded_ok = is_ok(np.asarray(status, dtype=object))
        # crop_only rows (a detection run's unchanged image with a changed box): decoded for
        # their crops; the image's own vector comes from the store.
        ok = decoded_ok & ~np.asarray(batch["crop_only"], bool) if "crop_only" in batch else decoded_ok
        n = len(status)
        dim = self.identity.dim
        sent = None
        if ok.any():  # queued on a GPU: the host builds the other columns meanwhile
            sent = self._send(self.forward(self.model_inputs(batch["pixels"], ok, decoded_here)))
        if decoded_here is not None:  # their features (the device's work on them came before the model's)
            for key, values in decoded_here.pending.columns().items():
                batch[key][decoded_here.rows] = values[decoded_here.pending.decoded]
        columns = {key: _to_arrow(value, STRING_COLUMNS.get(key), empty_is_null=key in EMPTY_IS_NULL)
                   for key, value in batch.items()
                   if key not in ("pixels", "copy_vector", "crops", "crop_rows", "crop_keys")}
        if sent is None:
            values = np.zeros((n, dim), np.float32)
        elif ok.all():  # the usual batch
            values = self._receive(sent)
        else:
            values = np.zeros((n, dim), np.float32)
            values[ok] = self._receive(sent)
        flat = pa.array(values.reshape(-1), pa.float32())
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(~ok))
        if "crops" in batch:  # a detection run: the boxes' crops, embedded on the same device
            columns.update(self.embed_crops(batch["crops"], batch["crop_rows"], decoded_ok))
            columns["crop_keys"] = pa.array([k if decoded_ok[i] and batch["crops"][i] else b""
                                             for i, k in enumerate(batch["crop_keys"])], pa.binary())
        if "copy_vector" in batch:  # the copy descriptor travels with the vector, in half precision
            copies = np.asarray(batch["copy_vector"], np.float16)
            columns["copy_vector"] = pa.FixedSizeListArray.from_arrays(
                pa.array(copies.reshape(-1), pa.float16()), copies.shape[1], mask=pa.array(~ok))
        return pa.table(columns)


CROP_CHUNK = 256  # crops embedded per forward pass (an image with hundreds of boxes stays in bounds)

# Columns whose values may all be null in one batch: give them their type explicitly so
# batches concatenate (an all-null object column would otherwise be inferred as null/float).
STRING_COLUMNS = {name: pa.string() for name in ("uri", "label", "status", "reason", "content_hash", "pixel_hash",
                                                     "fingerprint")}


# Text the decode stage ships as "" (not None) so Ray Data keeps the column text; null here.
EMPTY_IS_NULL = ("reason", "content_hash", "pixel_hash")


def _to_arrow(values: np.ndarray, type_: pa.DataType | None = None, *, empty_is_null: bool = False) -> pa.Array:
    if type_ is not None:
        return pa.array([None if v is None or (isinstance(v, float) and v != v) or (empty_is_null and v == "")
                         else str(v) for v in values], type_)
    if values.dtype == object:
        return pa.array(list(values), from_pandas=True)
    return pa.array(values)
