"""Index parameters chosen from N and d (every one overridable in ``knn.*``).

* ``N < knn.exact_below`` (default 50 000): exact search (``IndexFlatIP``) -- all-pairs is
  cheap there and exact results make small runs reproducible.
* above: ``IndexIVFFlat`` with ``nlist = clamp(4 * sqrt(N), 64, 65536)`` coarse centroids trained
  on a uniform sample of ``max(40 * nlist, 50 000)`` vectors (capped at N), searched with
  ``nprobe = 16`` lists -- measured here at recall@10 ~0.99 on clustered 512-d data at 200k
  (see benchmarks/knn.py). When the flat vectors would exceed ``knn.max_flat_bytes`` the codec
  switches to 8-bit scalar quantisation (``SQ8``, 4x smaller). ``knn.codec: pq-fastscan`` stores
  4-bit PQ codes (d/2 sub-quantisers) scanned with SIMD and re-ranks the best
  ``refine_factor * k`` candidates on the exact vectors (``IndexRefineFlat``): at 200k x 512
  clustered vectors (one shard), recall 0.986 at 8.0x exact against IVF-Flat's 1.0 at 5.7x.
* shards: ``knn.shards`` (0 = one per 2 CPUs of the cluster, at least 1), each a Ray actor
  holding a contiguous partition of the vectors.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from curation.config import KnnConfig
from curation.sizing import shard_count


@dataclass
class IndexParams:
    kind: str  # "flat" | "ivf"
    codec: str  # "flat" | "sq8" | "pq-fastscan"
    nlist: int
    nprobe: int
    train_size: int
    shards: int

    def to_dict(self) -> dict:
        return asdict(self)

    def factory(self, d: int) -> str:
        """The faiss.index_factory string for an empty index."""
        if self.kind == "flat":
            return "Flat"
        if self.codec == "pq-fastscan":
            return f"IVF{self.nlist},PQ{max(1, d // 2)}x4fs,RFlat"
        return f"IVF{self.nlist},{'SQ8' if self.codec == 'sq8' else 'Flat'}"


def choose_params(n: int, d: int, cfg: KnnConfig, *, cpus: int = 2) -> IndexParams:
    shards = shard_count(cfg.shards, n, cpus)
    if cfg.index == "flat" or (cfg.index == "auto" and n < cfg.exact_below):
        return IndexParams("flat", "flat", 0, 0, 0, shards)
    nlist = cfg.nlist or int(min(65536, max(64, round(4 * math.sqrt(max(n, 1))))))
    nlist = max(1, min(nlist, n // 39))  # FAISS wants >= 39 training points per list
    nprobe = min(cfg.nprobe or 16, nlist)
    train_size = min(n, cfg.train_size or max(40 * nlist, 50_000))
    codec = cfg.codec if cfg.codec != "auto" else ("sq8" if n * d * 4 > cfg.max_flat_bytes else "flat")
    return IndexParams("ivf", codec, nlist, nprobe, train_size, shards)
