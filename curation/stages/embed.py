"""Embed decoded pixels with a torch model: a Ray Data actor-pool callable.

The model is loaded once per actor (in ``setup``, called from the constructor) and every batch
runs under ``torch.inference_mode``; output is L2-normalised float32. On GPU the batch is
copied from pinned memory and run channels-last under bf16 autocast.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from curation.embedders import load_embedder
from curation.io.filesystem import Resolver
from curation.schema import is_ok


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class EmbedStage:
    """Batch callable: ``pixels`` (N, S, S, 3) uint8 -> ``embedding`` fixed_size_list<float32>[D].

    Rows whose ``status`` is not ``ok`` get a null embedding. ``pixels`` is dropped.

    With ``decode`` (``decode.path: torch``), rows whose ``jpeg`` column holds a file are
    decoded here first, as one batch on this actor's device
    (:class:`~curation.stages.decode_torch.TorchDecoder`), filling their ``pixels``, size,
    statistics and hashes; a file that decoder refuses goes through the CPU decode here (it is
    rare: the read tasks sent only plain, complete JPEGs), so its ``rejected`` reason is the
    CPU path's.

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
        self.mean = torch.tensor(self.identity.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.identity.std, device=self.device).view(1, 3, 1, 1)
        use_bf16 = self.precision == "bf16" or (self.precision == "auto" and self.device == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        self.decoder = None
        if self.decode_settings is not None:
            from curation.stages.decode_torch import TorchDecoder

            self.decoder = TorchDecoder(image_size=self.image_size, device=self.device)

    def decode_deferred(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Decode the rows the read tasks left as JPEG bytes (see the class); the batch with
        them filled in and without its ``jpeg`` column."""
        from curation.schema import STATUS_REJECTED
        from curation.stages.decode import RejectedInput, ThumbnailFeatures, decode_into

        files = batch.pop("jpeg")
        rows = np.flatnonzero(np.fromiter((bool(f) for f in files), bool, len(files)))
        if not len(rows):
            return batch
        batch = {key: (value.copy() if isinstance(value, np.ndarray) and not value.flags.writeable else value)
                 for key, value in batch.items()}
        data = [bytes(files[i]) for i in rows]
        pixels, features, decoded = self.decoder(data)
        batch["pixels"][rows] = pixels
        for key, values in features.items():
            if key == "pixel_hash":
                batch[key][rows] = values
            else:
                batch[key][rows[decoded]] = values[decoded]
        for j in np.flatnonzero(~decoded):  # the CPU path, for its pixels or its reason
            i = rows[j]
            try:
                width, height, batch["pixel_hash"][i], grey = decode_into(
                    data[j], image_size=self.image_size, max_pixels=self.decode_settings["max_pixels"],
                    background=tuple(self.decode_settings["background"]), pixels_out=batch["pixels"][i])
            except RejectedInput as exc:
                batch["status"][i], batch["reason"][i], batch["pixel_hash"][i] = STATUS_REJECTED, str(exc), ""
                batch["pixels"][i] = 0
                continue
            batch["width"][i], batch["height"][i] = width, height
            one = ThumbnailFeatures(1)
            one.add(0, grey)
            for key, values in one.finish().items():
                batch[key][i] = values[0]
        return batch

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 -> (N, D) float32, L2-normalised."""
        x = torch.from_numpy(np.ascontiguousarray(pixels))
        if self.device == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        x = (x - self.mean) / self.std
        if self.device == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            if self.autocast_dtype is not None:
                with torch.autocast(device_type=self.device, dtype=self.autocast_dtype):
                    feats = self.net(x)
            else:
                feats = self.net(x)
            feats = feats.reshape(feats.shape[0], -1).float()
            feats = torch.nn.functional.normalize(feats, dim=1)
        return feats.cpu().numpy().astype(np.float32, copy=False)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        if "jpeg" in batch:
            batch = self.decode_deferred(dict(batch))
        status = batch["status"]
        ok = is_ok(np.asarray(status, dtype=object))
        n = len(status)
        dim = self.identity.dim
        if n and ok.all():  # the usual batch: no copy of its pixels to select the ok rows
            values = self.embed(batch["pixels"])
        else:
            values = np.zeros((n, dim), np.float32)
            if ok.any():
                values[ok] = self.embed(batch["pixels"][ok])
        flat = pa.array(values.reshape(-1), pa.float32())
        embedding = pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(~ok))
        columns = {key: _to_arrow(value, STRING_COLUMNS.get(key), empty_is_null=key in EMPTY_IS_NULL)
                   for key, value in batch.items()
                   if key not in ("pixels", "copy_vector")}
        columns["embedding"] = embedding
        if "copy_vector" in batch:  # the copy descriptor travels with the vector, in half precision
            copies = np.asarray(batch["copy_vector"], np.float16)
            columns["copy_vector"] = pa.FixedSizeListArray.from_arrays(
                pa.array(copies.reshape(-1), pa.float16()), copies.shape[1], mask=pa.array(~ok))
        return pa.table(columns)


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
