"""Query images for ``curation similar``: decoded and embedded exactly as a run did.

The run's recorded config gives the decoder's settings and the embedder; the embedder loaded
here must have the run's ``model_id`` (the same model, weights and input size), or the
vectors would not be comparable. Vectors are rounded to the run's stored precision and
re-normalised, as the run's readers see its stored vectors.
"""

from __future__ import annotations

import numpy as np

from curation.config import recorded_config
from curation.io.filesystem import Resolver
from curation.run_info import RunInfo
from curation.schema import is_ok


class QueryImageError(ValueError):
    """A query image cannot be used; the message names it and why."""


def embed_images(images: list[str], info: RunInfo, *, space: str, resolver: Resolver) -> np.ndarray:
    """``(len(images), d)`` unit vectors of ``images`` in ``space`` (``embedding`` or ``copy``)."""
    from curation.stages.decode import DecodeStage

    config = recorded_config(info.config)  # the run's own settings, typed (defaults where it had none)
    embedder, decode = config.embedder, config.decode
    stage = DecodeStage(resolver=resolver, image_size=embedder.image_size, max_pixels=decode.max_pixels,
                        background=tuple(decode.background))
    uris = [resolver.resolve(image).uri for image in images]
    batch = stage({"uri": np.array(uris, dtype=object)})
    ok = is_ok(batch["status"])
    if not ok.all():
        bad = int(np.flatnonzero(~ok)[0])
        raise QueryImageError(f"--image {images[bad]}: {batch['reason'][bad]}")
    if space == "copy":
        return _as_stored(np.asarray(batch["copy_vector"], np.float32), "float16")
    from curation.stages.embed import EmbedStage

    model = EmbedStage(model=embedder.model, weights=embedder.weights, image_size=embedder.image_size, device="cpu",
                       resolver=resolver)
    if model.identity.model_id != info.model_id:
        raise QueryImageError(f"the run was embedded with {info.model_id!r} but this install loads "
                              f"{model.identity.model_id!r} from its config: the query cannot be embedded the same way")
    return _as_stored(model.embed(batch["pixels"]), embedder.store_dtype)


def _as_stored(x: np.ndarray, dtype: str) -> np.ndarray:
    x = x.astype(dtype).astype(np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)
