"""Ingestion benchmark: decode alone, embed alone, and the whole decode->embed pipeline.

Generates N photo-like JPEGs (640x480, ~60-120 KB) in a local folder (and, with ``--s3``, in a
bucket of the local SeaweedFS server), then measures in one run:

* decode-only: ``DecodeStage`` in one process (one CPU: what the pipeline leaves to decoding
  on a 2-CPU box while the embedding actor holds the other);
* embed-only: the model's raw forward throughput on pre-decoded uint8 tensors with the
  actor's thread count and batch size (``EmbedStage.embed``);
* end-to-end: ``pipeline.embed_to_storage`` through Ray Data (tasks + actor pool + the
  embeddings datasink writing Parquet from the workers).

and reports pipeline efficiency = end-to-end / slowest stage alone, and embed efficiency =
end-to-end / raw forward when the model is the slowest stage. With ``--memory`` it also runs
the pipeline at two sizes and compares peak RSS (driver + Ray workers), which must stay flat
when the pipeline streams. Prints a table and writes JSON.

    python benchmarks/ingest.py --n 1000 --models resnet18 --out benchmarks/results/ingest.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from benchmarks._common import PeakSampler  # noqa: E402


def make_photos(folder: str, n: int, seed: int = 0) -> list[str]:
    """Photo-like JPEGs: the demo's scene renderer at 640x480 with sensor noise, quality 90."""
    from PIL import Image

    from curation.demo import CLASSES, render_scene

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(CLASSES)
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"{i:06d}.jpg")
        paths.append(path)
        if os.path.exists(path):
            continue
        scene = render_scene(names[i % len(names)], rng, size=160).resize((640, 480), Image.BICUBIC)
        arr = np.asarray(scene, np.float32) + rng.normal(0, 7, (480, 640, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        with open(path, "wb") as fh:
            fh.write(buf.getvalue())
    return paths


def decode_only(paths: list[str], image_size: int) -> float:
    from curation.io.filesystem import Resolver
    from curation.stages.decode import DecodeStage

    stage = DecodeStage(resolver=Resolver(), image_size=image_size, max_pixels=10**9)
    batch = 64
    t = time.perf_counter()
    for start in range(0, len(paths), batch):
        chunk = np.array(paths[start:start + batch], dtype=object)
        stage({"uri": chunk, "input_error": np.full(len(chunk), None, object)})
    return len(paths) / (time.perf_counter() - t)


def embed_only(model: str, image_size: int, batch: int, threads: int, seconds: float = 20.0) -> float:
    import torch

    from curation.stages.embed import EmbedStage

    torch.set_num_threads(threads)
    stage = EmbedStage(model=model, weights="none", image_size=image_size, device="cpu", num_threads=threads)
    pixels = np.random.default_rng(0).integers(0, 255, (batch, image_size, image_size, 3)).astype(np.uint8)
    stage.embed(pixels)  # warm-up
    done, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        stage.embed(pixels)
        done += batch
    return done / (time.perf_counter() - t)


def end_to_end(uris: list[str], model: str, image_size: int, batch: int, storage: dict | None = None) -> tuple[float, int]:
    """The job's decode -> embed -> embeddings datasink graph over ``uris`` (vectors written to a
    temporary folder by the workers). Returns images/s and the peak RSS of the process tree."""
    import shutil

    import pyarrow as pa

    from curation import pipeline
    from curation.config import load_config
    from curation.io.filesystem import Resolver

    config = load_config(data={"input": {"images": "/unused"}, "output": {"uri": "/unused"},
                               "embedder": {"model": model, "weights": "none", "image_size": image_size,
                                            "batch_size": batch}, "storage": storage or {}})
    inputs = pa.table({"input_id": pa.array(np.arange(len(uris), dtype=np.int64)), "uri": uris,
                       "input_error": pa.nulls(len(uris), pa.string()), "fingerprint": pa.nulls(len(uris), pa.string())})
    resolver = Resolver(config.storage)
    folder = tempfile.mkdtemp(prefix="curation-bench-emb-")
    with PeakSampler() as sampler:
        t = time.perf_counter()
        table = pipeline.embed_to_storage(inputs, None, config, resolver, folder=resolver.resolve(folder),
                                          model_id="bench")
        elapsed = time.perf_counter() - t
    shutil.rmtree(folder, ignore_errors=True)
    assert table.num_rows == len(uris) and (np.array(table["status"].to_pylist()) == "ok").all()
    return len(uris) / elapsed, sampler.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--models", nargs="+", default=["resnet18"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "curation-bench-photos"))
    parser.add_argument("--s3", action="store_true", help="also read the images from the local S3 server")
    parser.add_argument("--memory", type=int, nargs=2, metavar=("N_SMALL", "N_LARGE"),
                        help="peak RSS of the pipeline at two sizes (thumbnail model)")
    parser.add_argument("--out", default="benchmarks/results/ingest.json")
    args = parser.parse_args()

    import ray

    t = time.perf_counter()
    paths = make_photos(args.data, max(args.n, max(args.memory or [0])))
    sizes = [os.path.getsize(p) for p in paths[: args.n]]
    print(f"{len(paths)} JPEGs 640x480, mean {np.mean(sizes) / 1e3:.0f} KB ({time.perf_counter() - t:.0f}s to make)", flush=True)
    cpus = os.cpu_count() or 2
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level="WARNING")
    result: dict = {"machine": f"{cpus} CPUs, no GPU", "n": args.n, "image_size": args.image_size, "batch": args.batch,
                    "mean_jpeg_kb": round(float(np.mean(sizes)) / 1e3, 1), "rows": []}
    decode_rate = decode_only(paths[: min(args.n, 500)], args.image_size)
    print(f"decode-only (1 process): {decode_rate:.0f} img/s", flush=True)
    sources = [("local", paths[: args.n], None)]
    server = None
    if args.s3:
        from testkit.s3server import S3Server

        server = S3Server()
        endpoint = server.start()
        fs = endpoint.pyarrow_fs()
        fs.create_dir("bench")
        for p in paths[: args.n]:
            with open(p, "rb") as src, fs.open_output_stream(f"bench/photos/{os.path.basename(p)}") as dst:
                dst.write(src.read())
        sources.append(("s3", [f"s3://bench/photos/{os.path.basename(p)}" for p in paths[: args.n]], endpoint.storage()))
    for model in args.models:
        threads = 1 if cpus <= 2 else max(1, cpus // 2)
        raw = embed_only(model, args.image_size, args.batch, threads)
        print(f"{model} raw forward ({threads} thread(s), batch {args.batch}): {raw:.1f} img/s", flush=True)
        for name, uris, storage in sources:
            e2e, peak = end_to_end(uris, model, args.image_size, args.batch, storage)
            slowest = min(raw, decode_rate)
            row = {"model": model, "source": name, "decode_only": round(decode_rate, 1), "embed_only": round(raw, 1),
                   "end_to_end": round(e2e, 1), "pipeline_efficiency": round(e2e / slowest, 3),
                   "embed_efficiency": round(e2e / raw, 3) if raw <= decode_rate else None,
                   "bottleneck": "model" if raw <= decode_rate else "decode", "peak_rss_gb": round(peak / 1e9, 2)}
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
    if args.memory:
        small, large = args.memory
        peaks = {}
        for n in (small, large):
            _, peaks[n] = end_to_end(paths[:n], "thumbnail", args.image_size, args.batch)
        result["memory"] = {"n_small": small, "n_large": large, "peak_rss_small_gb": round(peaks[small] / 1e9, 2),
                            "peak_rss_large_gb": round(peaks[large] / 1e9, 2),
                            "ratio": round(peaks[large] / peaks[small], 3)}
        print(json.dumps(result["memory"]), flush=True)
    ray.shutdown()
    if server:
        server.stop()
    cols = ["model", "source", "decode_only", "embed_only", "end_to_end", "pipeline_efficiency", "embed_efficiency",
            "bottleneck", "peak_rss_gb"]
    print("\n" + "  ".join(f"{c:>19}" for c in cols))
    for r in result["rows"]:
        print("  ".join(f"{str(r[c]):>19}" for c in cols))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
