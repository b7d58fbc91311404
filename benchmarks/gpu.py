"""GPU node benchmark, ready to run on a machine with a GPU (about 5 minutes); on CPU it runs
the same steps at reduced sizes and says so.

Measures, each side by side in one run:

* model: raw resnet50 forward throughput (bf16 autocast + channels_last on GPU; the
  ``EmbedStage`` code path) on pre-decoded uint8 batches, against
* pipeline: the job's Ray Data graph end to end on synthetic 640x480 JPEGs (read, decode,
  embed, write ``embeddings/`` from the workers) with the same model: images/s and the ratio to
  the raw model (how far decoding and data movement keep the GPU from its own speed), once
  with ``decode.path: cpu`` (the CPU tasks decode) and once with ``torch`` (they only read;
  the embedding actor decodes with nvJPEG on its GPU); ``--num-cpus 8`` holds Ray to 8 CPUs;
* decode: ``DecodeStage`` images/s in one process (= per CPU), and PIL's bare draft decode on
  the same files (the codec's own speed); the stage in one process per CPU (the node's decode
  ceiling); nvJPEG (``torchvision.io.decode_jpeg`` on the GPU, batched) with the same centre
  square resize, as the alternative for GPU nodes;
* the GPU code path: embeddings under bf16 autocast on the GPU against fp32 on the CPU, same
  weights, same pixels (cosine);
* FAISS: exact kNN of 1M x 128 (GPU: ``faiss.index_cpu_to_gpu`` when FAISS is a GPU build)
  against the CPU ``IndexFlatIP`` on a query subset, extrapolated; without a FAISS GPU build,
  the same brute force (matrix product + top-k) in torch on the GPU as the GPU's figure;
* cuML: k-means (the cluster score's trainer) and logistic regression (a label probe) against
  FAISS / scikit-learn on the same 200k x 128 data, when cuML is installed.

    python benchmarks/gpu.py --out benchmarks/results/gpu.json
    python benchmarks/gpu.py --num-cpus 8 --skip-knn   # issue 25's figures: both decode paths

The hardware JPEG engine row needs nvImageCodec, which the GPU machine cannot download: fetch
the wheels here (``pip download nvidia-nvimgcodec-cu13 nvidia-nvjpeg-cu13 --no-deps -d
wheels``, about 30 MB: git ignores ``wheels/``; carry it) and install them there first
(``pip install --no-index wheels/*.whl``).
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
from benchmarks.gpu_decode import (  # noqa: E402
    decoded_batch, busy_cpus, decode_all_cpus, decode_rates, hardware_jpeg_rates, nvjpeg_rate, read_rate, torch_decode_rate)


def _photo(task: tuple[str, int]) -> str:
    from PIL import Image

    path, i = task
    if not os.path.exists(path):
        rng = np.random.default_rng(i)
        base = Image.fromarray((np.random.default_rng(i % 8).random((60, 80, 3)) * 255).astype(np.uint8))
        arr = np.asarray(base.resize((640, 480), Image.BICUBIC), np.int16) + rng.integers(-12, 12, (480, 640, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        with open(path, "wb") as fh:
            fh.write(buf.getvalue())
    return path


def _photos(folder: str, n: int) -> list[str]:
    """``n`` synthetic 640x480 JPEGs (about 100 KB each), made in one process per CPU."""
    import multiprocessing

    os.makedirs(folder, exist_ok=True)
    tasks = [(os.path.join(folder, f"{i:06d}.jpg"), i) for i in range(n)]
    with multiprocessing.get_context("spawn").Pool(os.cpu_count()) as pool:
        return pool.map(_photo, tasks, chunksize=64)


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


def pipeline_throughput(paths: list[str], model: str, batch: int, decode_path: str = "cpu") -> tuple[float, float]:
    """The job's decode-and-embed graph on ``paths`` (a path may repeat: one row each):
    images/s and seconds, actor start-up and model load included. ``decode_path``: where the
    JPEGs are decoded (``decode.path``: ``cpu`` tasks, or ``torch`` in the embedding actors)."""
    import pyarrow as pa

    from curation import pipeline
    from curation.config import load_config
    from curation.io.filesystem import Resolver

    config = load_config(data={"input": {"images": "/unused"}, "output": {"uri": "/unused"},
                               "embedder": {"model": model, "weights": "none", "batch_size": batch},
                               "decode": {"path": decode_path}})
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
    return n / elapsed, elapsed


def gpu_matches_cpu(model: str, paths: list[str]) -> dict:
    """Embeddings of the GPU path (bf16 autocast, channels-last, pinned copies) against the
    CPU's fp32 ones: the same seeded weights, the same decoded pixels."""
    from curation.stages.embed import EmbedStage

    pixels = decoded_batch(paths)["pixels"]
    gpu = EmbedStage(model=model, weights="none", image_size=224, device="cuda", precision="auto").embed(pixels)
    cpu = EmbedStage(model=model, weights="none", image_size=224, device="cpu", precision="fp32").embed(pixels)
    cosine = np.sum(gpu * cpu, axis=1)
    # Random weights put every image near one common direction: compare what is left around
    # it too (each path's vectors minus the CPU's mean), where bf16's error would show.
    centre = cpu.mean(axis=0)
    g, c = gpu - centre, cpu - centre
    centred = np.sum(g * c, axis=1) / (np.linalg.norm(g, axis=1) * np.linalg.norm(c, axis=1))
    near_gpu = np.argsort(-(g @ g.T), axis=1)[:, 1]
    near_cpu = np.argsort(-(c @ c.T), axis=1)[:, 1]
    return {"images": len(paths), "cosine_min": round(float(cosine.min()), 5),
            "centred_cosine_min": round(float(centred.min()), 4),
            "centred_cosine_mean": round(float(centred.mean()), 4),
            "nearest_neighbour_agreement": round(float(np.mean(near_gpu == near_cpu)), 3)}


def cifar_sample(n: int, npz: str | None) -> tuple[np.ndarray, np.ndarray]:
    """``n`` CIFAR-10 test photos as (N, 32, 32, 3) uint8 and their class indices, from an
    ``.npz`` (``pixels``, ``labels``) or from ``../shared/data``."""
    if npz:
        with np.load(npz) as data:
            return data["pixels"][:n], data["labels"][:n]
    import tarfile

    from PIL import Image

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pixels, labels, names = [], [], {}
    with tarfile.open(os.path.join(root, "..", "shared", "data", "cifar10", "test.tar.gz")) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".jpg"):
                pixels.append(np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")))
                labels.append(names.setdefault(member.name.split("/")[-2], len(names)))
    pick = np.random.default_rng(0).choice(len(pixels), size=min(n, len(pixels)), replace=False)
    return np.stack(pixels)[pick], np.asarray(labels)[pick]


def trained_encoder_agreement(encoder: str, pixels: np.ndarray, labels: np.ndarray) -> dict:
    """The trained CIFAR-10 encoder (TorchScript) on the GPU path (bf16 autocast) against the
    CPU's fp32 on the same photos: cosine per photo, overlap of each photo's 10 nearest
    neighbours, and the accuracy of a 10-NN vote by each path's vectors."""
    from curation.stages.embed import EmbedStage

    gpu = EmbedStage(model="torchscript", weights=encoder, image_size=32, device="cuda", precision="auto").embed(pixels)
    cpu = EmbedStage(model="torchscript", weights=encoder, image_size=32, device="cpu", precision="fp32").embed(pixels)
    cosine = np.sum(gpu * cpu, axis=1)

    def neighbours(x):
        sims = x @ x.T
        np.fill_diagonal(sims, -np.inf)
        return np.argsort(-sims, axis=1)[:, :10]

    near_gpu, near_cpu = neighbours(gpu), neighbours(cpu)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(near_gpu, near_cpu)])

    def vote_accuracy(near):
        votes = np.array([np.bincount(labels[row], minlength=10).argmax() for row in near])
        return float(np.mean(votes == labels))

    return {"images": len(pixels), "cosine_min": round(float(cosine.min()), 5),
            "cosine_mean": round(float(cosine.mean()), 5), "top10_overlap": round(float(overlap), 4),
            "knn_vote_accuracy_gpu": round(vote_accuracy(near_gpu), 4),
            "knn_vote_accuracy_cpu": round(vote_accuracy(near_cpu), 4)}


def embed_call_rate(model: str, paths: list[str], seconds: float = 10.0, device: str = "cuda",
                    defer: bool = False) -> float:
    """One embedding actor's own ceiling: ``EmbedStage.__call__`` on a decoded batch (numpy in,
    Arrow table out: the selection of ok rows, the pinned copy, the forward pass and the output
    columns), images/s; ``defer``: on a batch of JPEG bytes (``decode.path: torch``), decoded
    on the actor's device first. Ray Data's batching and object transfers are not in it."""
    from curation.stages.embed import EmbedStage

    batch = decoded_batch(paths, defer)
    stage = EmbedStage(model=model, weights="none", image_size=224, device=device, precision="auto",
                       decode={"max_pixels": 100_000_000, "background": [255, 255, 255]} if defer else None)
    stage(batch)
    done, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        stage(batch)
        done += len(paths)
    return done / (time.perf_counter() - t)


def torch_exact_knn_gpu(x: np.ndarray, k: int, chunk: int = 4096) -> float:
    """Exact inner-product kNN of every row against all rows, as a matrix product plus top-k
    per query chunk on the GPU (fp32): what a FAISS GPU flat index computes. Seconds."""
    import torch

    base = torch.from_numpy(x).cuda()
    torch.topk(base[:chunk] @ base.T, k, dim=1)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for start in range(0, len(x), chunk):
        torch.topk(base[start:start + chunk] @ base.T, k, dim=1)
    torch.cuda.synchronize()
    return time.perf_counter() - t


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
    elif gpu:
        out["gpu_all_queries_s"] = round(torch_exact_knn_gpu(x, 11), 1)
        out["speedup"] = round(cpu_all / out["gpu_all_queries_s"], 1)
        out["note"] = "FAISS here is a CPU build (faiss-cpu): the GPU figure is torch's matrix product + top-k"
    else:
        out["gpu_all_queries_s"] = None
        out["note"] = "no GPU"
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
    parser.add_argument("--images", type=int, default=0, help="JPEGs for the pipeline (default 16000 on GPU, 300 on CPU)")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=0, help="default 256 on GPU, 32 on CPU")
    parser.add_argument("--faiss-n", type=int, default=0, help="default 1,000,000 on GPU, 100,000 on CPU")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "curation-gpu-bench"))
    parser.add_argument("--out", default="benchmarks/results/gpu.json")
    parser.add_argument("--skip-knn", action="store_true", help="leave out the kNN, k-means and probe rows")
    parser.add_argument("--encoder", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "models",
                                                          "cifar10_cnn.pt"), help="trained encoder for the GPU path check")
    parser.add_argument("--cifar-npz", default=None, help="CIFAR-10 photos (pixels, labels) when ../shared/data is absent")
    parser.add_argument("--only-encoder-check", action="store_true", help="run the trained-encoder GPU check alone")
    parser.add_argument("--num-cpus", type=int, default=0,
                        help="CPUs Ray may use for the pipelines (issue 25's budget: 8; default all)")
    args = parser.parse_args()

    import torch
    import torchvision

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    images = args.images or (16000 if gpu else 300)
    batch = args.batch or (256 if gpu else 32)
    cpus = os.cpu_count()
    machine = (f"{torch.cuda.get_device_name(0)}, {cpus} CPUs" if gpu
               else f"no GPU ({cpus} CPUs): reduced sizes, CPU paths")
    environment = {"torch": torch.__version__, "torchvision": torchvision.__version__,
                   "python": sys.version.split()[0], "cpus": cpus,
                   "shm_gib": round(shutil.disk_usage("/dev/shm").total / 2**30, 1) if os.path.isdir("/dev/shm") else None}
    print(f"machine: {machine}; {environment}", flush=True)
    rows: list[dict] = []
    result: dict = {"machine": machine, "environment": environment, "rows": rows}

    def record(measure: str, value: str, ratio=None, **extra) -> None:
        rows.append({"measure": measure, "value": value, "ratio": ratio})
        result.update(extra)
        print(rows[-1], flush=True)
        save_json(args.out, result)  # after every step: a cut-short run still leaves its numbers

    if gpu:
        try:
            sample, classes = cifar_sample(2000, args.cifar_npz)
        except OSError as exc:
            print(f"trained-encoder check skipped: no CIFAR-10 photos ({exc})", flush=True)
        else:
            check = trained_encoder_agreement(args.encoder, sample, classes)
            record("trained encoder, GPU bf16 vs CPU fp32: cosine min / mean; 10-NN overlap; 10-NN vote accuracy GPU / CPU",
                   f"{check['cosine_min']} / {check['cosine_mean']}; {check['top10_overlap']}; "
                   f"{check['knn_vote_accuracy_gpu']} / {check['knn_vote_accuracy_cpu']}", trained_gpu_vs_cpu=check)
    if args.only_encoder_check:
        return

    t = time.perf_counter()
    paths = _photos(args.work, images)
    print(f"{len(paths)} JPEGs ready in {time.perf_counter() - t:.1f} s", flush=True)

    ours, bare = decode_rates(paths[:200])
    record("decode stage, one process (per CPU)", f"{ours:.0f} img/s", round(ours / bare, 3),
           decode_img_s=ours, bare_decode_img_s=bare)
    record("PIL bare draft decode, one process", f"{bare:.0f} img/s")
    node = decode_all_cpus(paths)
    record(f"decode stage, {cpus} processes (the node)", f"{node:.0f} img/s", round(node / ours / cpus, 3),
           decode_node_img_s=node)

    raw = model_throughput(args.model, device, batch, 20 if gpu else 8)
    record(f"{args.model} raw forward ({device}, batch {batch})", f"{raw:.0f} img/s", model_img_s=raw)
    if gpu:
        torch.cuda.empty_cache()
        check = gpu_matches_cpu(args.model, paths[:64])
        record("GPU path (bf16) vs CPU fp32 embeddings: cosine min; centred cosine min / mean; neighbour agreement",
               f"{check['cosine_min']}; {check['centred_cosine_min']} / {check['centred_cosine_mean']}; "
               f"{check['nearest_neighbour_agreement']}", gpu_vs_cpu=check)
        rate = nvjpeg_rate(paths[:4096])
        record("nvJPEG decode + model input on the GPU (batched, full size)", f"{rate:.0f} img/s",
               round(rate / node, 3), nvjpeg_img_s=rate)
        engine = hardware_jpeg_rates(paths[:4096])
        record("hardware JPEG engine / CUDA decoder (nvImageCodec, decode only)",
               f"{engine.get('hardware_img_s', engine.get('hardware_error', engine.get('note')))} / "
               f"{engine.get('cuda_img_s', engine.get('cuda_error', '-'))}", hardware_jpeg=engine)
        actor = embed_call_rate(args.model, paths[:batch])
        record(f"one embedding actor's own ceiling (EmbedStage.__call__, batch {batch})", f"{actor:.0f} img/s",
               round(actor / raw, 3), embed_call_img_s=actor)
        torch.cuda.empty_cache()
    # decode.path torch: what the device does per batch, alone, and then in the actor.
    reads = read_rate(paths[:200])
    record("read tasks on decode.path torch (read, hash, header), one process", f"{reads:.0f} img/s",
           read_img_s=reads)
    decoded = torch_decode_rate(paths, device, batch, 10 if gpu else 4)
    busy_decode = (1 / decoded) / (1 / decoded + 1 / raw)
    record(f"TorchDecoder alone on {device} (decode, model input, features; batch {batch})", f"{decoded:.0f} img/s",
           round(decoded / raw, 3), torch_decode_img_s=decoded)
    record("device busy share back to back: decode / model", f"{busy_decode:.2f} / {1 - busy_decode:.2f}",
           busy_decode_share=round(busy_decode, 3),
           back_to_back_cap_img_s=round(1 / (1 / decoded + 1 / raw)))
    actor = embed_call_rate(args.model, paths[:batch], seconds=10 if gpu else 4, device=device, defer=True)
    record(f"one embedding actor's own ceiling with decode.path torch (batch {batch}; ratio to raw)",
           f"{actor:.0f} img/s", round(actor / raw, 3), embed_call_torch_img_s=actor)
    if gpu:
        torch.cuda.empty_cache()

    import ray

    result["environment"]["ray"] = ray.__version__
    result["environment"]["ray_num_cpus"] = args.num_cpus or os.cpu_count()
    ray.init(address="local", include_dashboard=False, logging_level="WARNING", num_gpus=torch.cuda.device_count(),
             num_cpus=args.num_cpus or None, object_store_memory=8 * 2**30 if gpu else None)
    for decode_path in ("cpu", "torch"):
        # decode.path cpu: CPU tasks decode; torch: they only read, the actor decodes on its device.
        where = f"decode.path {decode_path}"
        pipeline_throughput(paths[:512], args.model, batch, decode_path)  # worker pool, model load and cuDNN warm
        e2e, seconds = pipeline_throughput(paths, args.model, batch, decode_path)
        record(f"pipeline end to end ({where}, {len(paths)} 640x480 JPEGs, start-up included)", f"{e2e:.0f} img/s",
               round(e2e / raw, 3), **{f"pipeline_{decode_path}_img_s": e2e})
        (big, big_seconds), cpus_busy = busy_cpus(lambda: pipeline_throughput(paths * 4, args.model, batch, decode_path))
        steady = 3 * len(paths) / max(1e-9, big_seconds - seconds)
        record(f"pipeline end to end ({where}, {4 * len(paths)} rows, each file four times)", f"{big:.0f} img/s",
               round(big / raw, 3), **{f"pipeline_{decode_path}_big_img_s": big})
        record(f"pipeline steady state ({where}; the extra rows over the extra seconds; ratio to raw)",
               f"{steady:.0f} img/s", round(steady / raw, 3), **{f"pipeline_{decode_path}_steady_img_s": steady})
        record(f"CPUs busy during the {4 * len(paths)}-row run ({where}; machine-wide, of {cpus})",
               f"{cpus_busy:.1f}", **{f"pipeline_{decode_path}_cpus_busy": round(cpus_busy, 2)})
    ray.shutdown()

    if args.skip_knn:
        print()
        print_table(rows, ["measure", "value", "ratio"])
        return
    knn = faiss_exact(args.faiss_n or (1_000_000 if gpu else 100_000), 128, 4096, gpu)
    record(f"exact kNN {knn['n']:,} x 128, k=11, FAISS CPU (extrapolated)", f"{knn['cpu_all_queries_s']} s", faiss=knn)
    record("exact kNN, GPU", f"{knn['gpu_all_queries_s']} s" if knn["gpu_all_queries_s"] else knn.get("note"),
           knn.get("speedup"))
    clusters = cuml_vs_cpu(200_000 if gpu else 50_000, 128, 256)
    record(f"k-means 256 on {clusters['n']:,} x 128 (FAISS CPU / cuML)", f"{clusters['kmeans_faiss_cpu_s']} s / "
           f"{clusters.get('kmeans_cuml_s', clusters.get('cuml'))}", cuml=clusters)
    record("logistic probe, 50k x 128, 20 classes (sklearn / cuML)", f"{clusters['probe_sklearn_s']} s / "
           f"{clusters.get('probe_cuml_s', clusters.get('cuml'))}")
    print()
    print_table(rows, ["measure", "value", "ratio"])


if __name__ == "__main__":
    main()
