"""GPU node benchmark, ready to run on a machine with a GPU (about 5 minutes); on CPU it runs
the same steps at reduced sizes and says so.

Measures, each side by side in one run:

* model: raw resnet50 forward throughput (bf16 autocast + channels_last on GPU; the
  ``EmbedStage`` code path) on pre-decoded uint8 batches, against
* pipeline: the job's Ray Data graph end to end on synthetic 640x480 JPEGs (read, decode,
  embed, write ``embeddings/`` from the workers) with the same model: images/s and the ratio to
  the raw model (how far decoding and data movement keep the GPU from its own speed);
* decode: ``DecodeStage`` images/s in one process (= per CPU), and PIL's bare draft decode on
  the same files (the codec's own speed);
* FAISS: exact kNN of 1M x 128 (GPU: ``faiss.index_cpu_to_gpu`` when FAISS is a GPU build)
  against the CPU ``IndexFlatIP`` on a query subset, extrapolated;
* cuML: k-means (the cluster score's trainer) and logistic regression (a label probe) against
  FAISS / scikit-learn on the same 200k x 128 data, when cuML is installed.

    python benchmarks/gpu.py --out benchmarks/results/gpu.json
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from benchmarks._common import print_table, save_json  # noqa: E402


def _photos(folder: str, n: int) -> list[str]:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    base = [Image.fromarray((rng.random((60, 80, 3)) * 255).astype(np.uint8)).resize((640, 480), Image.BICUBIC)
            for _ in range(8)]
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"{i:06d}.jpg")
        if not os.path.exists(path):
            arr = np.asarray(base[i % 8], np.int16) + rng.integers(-12, 12, (480, 640, 3))
            buf = io.BytesIO()
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
            with open(path, "wb") as fh:
                fh.write(buf.getvalue())
        paths.append(path)
    return paths


def model_throughput(model: str, device: str, batch: int, seconds: float) -> float:
    from curation.stages.embed import EmbedStage

    stage = EmbedStage(model=model, weights="none", image_size=224, device=device, precision="auto",
                       num_threads=os.cpu_count())
    pixels = np.random.default_rng(0).integers(0, 255, (batch, 224, 224, 3), dtype=np.uint8)
    stage.embed(pixels)  # warm-up (cuDNN autotune, allocator)
    done, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        stage.embed(pixels)
        done += batch
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
    return done / (time.perf_counter() - t)


def pipeline_throughput(paths: list[str], model: str, batch: int) -> float:
    import pyarrow as pa

    from curation import pipeline
    from curation.config import load_config
    from curation.io.filesystem import Resolver

    config = load_config(data={"input": {"images": "/unused"}, "output": {"uri": "/unused"},
                               "embedder": {"model": model, "weights": "none", "batch_size": batch}})
    n = len(paths)
    inputs = pa.table({"input_id": pa.array(np.arange(n, dtype=np.int64)), "uri": paths,
                       "input_error": pa.nulls(n, pa.string()), "fingerprint": pa.nulls(n, pa.string())})
    folder = tempfile.mkdtemp(prefix="curation-gpu-bench-")
    resolver = Resolver()
    t = time.perf_counter()
    compact = pipeline.embed_to_storage(inputs, None, config, resolver, folder=resolver.resolve(folder), model_id="bench")
    elapsed = time.perf_counter() - t
    shutil.rmtree(folder, ignore_errors=True)
    assert compact.num_rows == n
    return n / elapsed


def decode_rates(paths: list[str]) -> tuple[float, float]:
    from PIL import Image

    from curation.io.filesystem import Resolver
    from curation.stages.decode import DecodeStage

    stage = DecodeStage(resolver=Resolver(), image_size=224, max_pixels=100_000_000)
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


def faiss_exact(n: int, d: int, queries: int, gpu: bool) -> dict:
    import faiss

    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cpu = faiss.IndexFlatIP(d)
    cpu.add(x)
    t = time.perf_counter()
    cpu.search(x[:queries], 11)
    cpu_all = (time.perf_counter() - t) * n / queries
    out = {"n": n, "d": d, "cpu_all_queries_s": round(cpu_all, 1)}
    if gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, 0, cpu)
        index.search(x[:1024], 11)
        t = time.perf_counter()
        for start in range(0, n, 65536):
            index.search(x[start:start + 65536], 11)
        out["gpu_all_queries_s"] = round(time.perf_counter() - t, 1)
        out["speedup"] = round(cpu_all / out["gpu_all_queries_s"], 1)
    else:
        out["gpu_all_queries_s"] = None
        out["note"] = "FAISS here is a CPU build (faiss-cpu): no GPU index"
    return out


def cuml_vs_cpu(n: int, d: int, k: int) -> dict:
    import faiss
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(20, d)).astype(np.float32)
    labels = rng.integers(20, size=n)
    x = centers[labels] + rng.normal(size=(n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    out: dict = {"n": n, "d": d, "k": k}
    t = time.perf_counter()
    faiss.Kmeans(d, k, niter=20, seed=1, spherical=True, max_points_per_centroid=256).train(x)
    out["kmeans_faiss_cpu_s"] = round(time.perf_counter() - t, 2)
    sample = rng.choice(n, size=min(n, 50_000), replace=False)
    t = time.perf_counter()
    LogisticRegression(max_iter=200).fit(x[sample], labels[sample])
    out["probe_sklearn_s"] = round(time.perf_counter() - t, 2)
    try:
        from cuml.cluster import KMeans
        from cuml.linear_model import LogisticRegression as CuLogistic
    except Exception as exc:  # not installed (pip install .[gpu]) or no GPU
        out["cuml"] = f"not available ({type(exc).__name__})"
        return out
    t = time.perf_counter()
    KMeans(n_clusters=k, max_iter=20, random_state=1).fit(x)
    out["kmeans_cuml_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    CuLogistic(max_iter=200).fit(x[sample], labels[sample].astype(np.float32))
    out["probe_cuml_s"] = round(time.perf_counter() - t, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=0, help="JPEGs for the pipeline (default 4000 on GPU, 300 on CPU)")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=0, help="default 256 on GPU, 32 on CPU")
    parser.add_argument("--faiss-n", type=int, default=0, help="default 1,000,000 on GPU, 100,000 on CPU")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "curation-gpu-bench"))
    parser.add_argument("--out", default="benchmarks/results/gpu.json")
    args = parser.parse_args()

    import ray
    import torch

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    images = args.images or (4000 if gpu else 300)
    batch = args.batch or (256 if gpu else 32)
    machine = (f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPUs" if gpu
               else f"no GPU ({os.cpu_count()} CPUs): reduced sizes, CPU paths")
    print(f"machine: {machine}", flush=True)
    paths = _photos(args.work, images)
    rows = []
    raw = model_throughput(args.model, device, batch, 20 if gpu else 8)
    rows.append({"measure": f"{args.model} raw forward ({device}, batch {batch})", "value": f"{raw:.0f} img/s"})
    print(rows[-1], flush=True)
    ray.init(include_dashboard=False, logging_level="WARNING")
    e2e = pipeline_throughput(paths, args.model, batch)
    ray.shutdown()
    rows.append({"measure": "pipeline end to end (Ray Data, 640x480 JPEGs)", "value": f"{e2e:.0f} img/s",
                 "ratio": round(e2e / raw, 3)})
    print(rows[-1], flush=True)
    ours, bare = decode_rates(paths[:200])
    rows.append({"measure": "decode stage, one process (per CPU)", "value": f"{ours:.0f} img/s",
                 "ratio": round(ours / bare, 3)})
    rows.append({"measure": "PIL bare draft decode, one process", "value": f"{bare:.0f} img/s"})
    print(rows[-2:], flush=True)
    knn = faiss_exact(args.faiss_n or (1_000_000 if gpu else 100_000), 128, 4096, gpu)
    rows.append({"measure": f"FAISS exact kNN {knn['n']:,} x 128, CPU (extrapolated)", "value": f"{knn['cpu_all_queries_s']} s"})
    rows.append({"measure": "FAISS exact kNN, GPU", "value": f"{knn['gpu_all_queries_s']} s" if knn["gpu_all_queries_s"]
                 else knn.get("note"), "ratio": knn.get("speedup")})
    clusters = cuml_vs_cpu(200_000 if gpu else 50_000, 128, 256)
    rows.append({"measure": "k-means 256 (FAISS CPU / cuML)", "value": f"{clusters['kmeans_faiss_cpu_s']} s / "
                 f"{clusters.get('kmeans_cuml_s', clusters.get('cuml'))}"})
    rows.append({"measure": "logistic probe 50k (sklearn / cuML)", "value": f"{clusters['probe_sklearn_s']} s / "
                 f"{clusters.get('probe_cuml_s', clusters.get('cuml'))}"})
    print()
    print_table(rows, ["measure", "value", "ratio"])
    save_json(args.out, {"machine": machine, "rows": rows, "faiss": knn, "cuml": clusters,
                         "model_img_s": raw, "pipeline_img_s": e2e, "decode_img_s": ours, "bare_decode_img_s": bare})


if __name__ == "__main__":
    main()
