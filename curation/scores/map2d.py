"""2-D map coordinates (``x``, ``y``) for the report: PCA of the embeddings.

At most ``scores.map_points`` ok items (an evenly spaced sample, fetched from the vector store)
get coordinates; the rest are null. PCA is cheap and deterministic; it preserves global layout,
not local neighbourhoods.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from sklearn.decomposition import PCA

from curation.scores.base import ScoreContext, masked


class Map2dScore:
    name = "map2d"
    columns = ("x", "y")

    def compute(self, ctx: ScoreContext) -> pa.Table:
        n_ok = ctx.vectors.n
        coords = np.full((ctx.n, 2), np.nan, np.float32)
        if n_ok >= 3:
            take = np.unique(np.linspace(0, n_ok - 1, min(n_ok, ctx.config.map_points)).astype(np.int64))
            xy = PCA(n_components=2, random_state=0).fit_transform(ctx.vectors.take(take))
            coords[ctx.ok_rows[take]] = xy
        has = np.isfinite(coords[:, 0])
        return pa.table({"x": masked(coords[:, 0], has, pa.float32()), "y": masked(coords[:, 1], has, pa.float32())})

    def summary(self, table: pa.Table) -> dict:
        return {"points": int(table["x"].is_valid().to_numpy(zero_copy_only=False).sum())}
