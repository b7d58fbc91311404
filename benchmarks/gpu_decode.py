"""The decode measurements of ``benchmarks/gpu.py``: the CPU decode stage per process and per
node, the bare codec, the torch path, nvJPEG and the hardware JPEG engine (run from gpu.py)."""

from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _decode_stage(defer: bool = False):
    """The job's decode stage as the pipeline builds it for a 224-px model (``defer``: as for
    ``decode.path: torch``, where it only reads and hashes the JPEGs)."""
    from curation.io.filesystem import Resolver
    from curation.stages.decode import DecodeStage

    return DecodeStage(resolver=Resolver(), image_size=224, max_pixels=100_000_000, defer_jpegs=defer)


def decoded_batch(paths: list[str], defer: bool = False) -> dict:
    """One decoded batch of ``paths`` (what the embedding actors receive)."""
    return _decode_stage(defer)({"uri": np.array(paths, dtype=object), "input_id": np.arange(len(paths))})


def read_rate(paths: list[str]) -> float:
    """The read tasks' work on ``decode.path: torch`` (read, hash, check the header: what a
    CPU still does per image on a GPU node), images/s in one process."""
    stage = _decode_stage(defer=True)
    batch = {"uri": np.array(paths, dtype=object)}
    stage(batch)
    t = time.perf_counter()
    stage(batch)
    return len(paths) / (time.perf_counter() - t)


def torch_decode_rate(paths: list[str], device: str, batch: int, seconds: float) -> float:
    """``TorchDecoder`` alone on ``device`` (decode, model input, thumbnail and its features,
    those back on the host), files in memory, ``batch`` at a time: images/s."""
    from curation.stages.decode_torch import TorchDecoder

    files = [open(p, "rb").read() for p in paths[:batch]]
    decoder = TorchDecoder(image_size=224, device=device)
    decoder(files)  # warm-up
    done, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        pixels, _, _ = decoder(files)
        done += len(files)
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
    return done / (time.perf_counter() - t)


def busy_cpus(run) -> tuple[object, float]:
    """``run()``'s result and the CPUs busy meanwhile, machine-wide (every Ray worker is
    its own process): CPU seconds of all processes over wall seconds, from ``/proc/stat``."""

    def busy_seconds() -> float:
        with open("/proc/stat") as fh:
            user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fh.readline().split()[1:8])
        return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")

    before, t = busy_seconds(), time.perf_counter()
    result = run()
    return result, (busy_seconds() - before) / (time.perf_counter() - t)


def decode_rates(paths: list[str]) -> tuple[float, float]:
    from PIL import Image

    stage = _decode_stage()
    batch = {"uri": np.array(paths, dtype=object)}
    stage(batch)
    t = time.perf_counter()
    stage(batch)
    ours = len(paths) / (time.perf_counter() - t)
    t = time.perf_counter()
    for p in paths:
        im = Image.open(p)
        im.draft("RGB", (224, 224))
        im.convert("RGB").load()
    bare = len(paths) / (time.perf_counter() - t)
    return ours, bare


def _decode_chunk(paths: list[str]) -> int:
    stage = _decode_stage()
    for start in range(0, len(paths), 64):
        stage({"uri": np.array(paths[start:start + 64], dtype=object)})
    return len(paths)


def decode_all_cpus(paths: list[str]) -> float:
    """The decode stage in one process per CPU: the node's decode ceiling, images/s."""
    import multiprocessing

    workers = os.cpu_count()
    chunks = [paths[i::workers] for i in range(workers)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(_decode_chunk, [c[:16] for c in chunks])  # imports and first use, untimed
        t = time.perf_counter()
        done = sum(pool.map(_decode_chunk, chunks))
        return done / (time.perf_counter() - t)


def nvjpeg_rate(paths: list[str], batch: int = 128) -> float:
    """nvJPEG through ``torchvision.io.decode_jpeg(device='cuda')``, batched, at full size, then
    the model input as the decode stage makes it (centre square, antialiased bilinear to 224),
    on the GPU: images/s, file reads included."""
    import torch
    import torch.nn.functional as functional
    from torchvision.io import decode_jpeg, read_file

    def run(chunk: list[str]) -> None:
        images = decode_jpeg([read_file(p) for p in chunk], device="cuda")
        for image in images:
            _, h, w = image.shape
            side = min(h, w)
            top, left = (h - side) // 2, (w - side) // 2
            square = image[None, :, top:top + side, left:left + side].float()
            functional.interpolate(square, size=(224, 224), mode="bilinear", antialias=True)

    run(paths[:batch])
    torch.cuda.synchronize()
    t = time.perf_counter()
    for start in range(0, len(paths), batch):
        run(paths[start:start + batch])
    torch.cuda.synchronize()
    return len(paths) / (time.perf_counter() - t)


def hardware_jpeg_rates(paths: list[str], batch: int = 128) -> dict:
    """nvImageCodec's JPEG decode on the GPU's hardware engine (``HW_GPU_ONLY``; A100, H100 and
    H200 have one) beside its CUDA decoder (``GPU_ONLY``), batched, files in memory, decoded
    images handed to torch: images/s each, or why a backend could not run. Only when
    nvImageCodec is installed (the GPU machine reaches no index: carry the wheels, see the
    module docstring)."""
    try:
        from nvidia import nvimgcodec
    except ImportError as exc:
        return {"note": f"nvImageCodec not installed ({exc})"}
    import torch

    files = [open(p, "rb").read() for p in paths]
    out: dict = {"nvimgcodec": getattr(nvimgcodec, "__version__", "?")}
    for name, kind in (("hardware", "HW_GPU_ONLY"), ("cuda", "GPU_ONLY")):
        try:
            decoder = nvimgcodec.Decoder(backends=[nvimgcodec.Backend(getattr(nvimgcodec.BackendKind, kind))])
            decoder.decode(files[:batch])
            torch.cuda.synchronize()
            t = time.perf_counter()
            for start in range(0, len(files), batch):
                images = decoder.decode(files[start:start + batch])
                if any(image is None for image in images):
                    raise RuntimeError("the backend left some files undecoded")
                for image in images:
                    torch.as_tensor(image, device="cuda")
            torch.cuda.synchronize()
            out[f"{name}_img_s"] = round(len(files) / (time.perf_counter() - t), 1)
        except Exception as exc:  # noqa: BLE001 -- recorded: the rest of the run goes on
            out[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return out
