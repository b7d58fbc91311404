"""Greedy k-center cover (farthest-first traversal) of L2-normalised vectors: what the
representative, ``to_label`` and coverage selections use to spread picks over the embedding."""

from __future__ import annotations

import numpy as np


def farthest_first(x: np.ndarray, count: int, *, start: int | None = None,
                   nearest: np.ndarray | None = None) -> tuple[list[int], list[float]]:
    """Greedy k-center over the rows of L2-normalised ``x``: each step takes the row farthest
    (cosine distance) from everything taken so far. Seeded at the row ``start`` (the first pick
    gets its farthest row's distance), or by centres outside ``x``: ``nearest`` is each row's
    distance to the closest of them. Returns the rows and, for each, its distance to the nearest
    earlier pick (or centre) at the time it was taken."""
    if nearest is not None:
        nearest = np.array(nearest, np.float64)
        chosen, gaps = [], []
        count += 1  # no pick is spent on a seed
    else:
        nearest = 1.0 - x @ x[start]
        chosen, gaps = [start], [float(nearest.max())]
        nearest[start] = -1.0
    for _ in range(count - 1):
        j = int(np.argmax(nearest))
        chosen.append(j)
        gaps.append(float(nearest[j]))
        np.minimum(nearest, 1.0 - x @ x[j], out=nearest)
        nearest[chosen] = -1.0
    return chosen, gaps
