"""What the driver checks of ``embedder.model`` and ``embedder.weights`` before any work, without
torch: the model is built on the workers (:mod:`curation.embedders`, which imports torch), and
torch on the driver would cost every run, and every ``similar`` or ``export`` call, about 5 s
and 300 MB."""

from __future__ import annotations

from curation.io.filesystem import Resolver, StorageError, check_readable

# Models this project defines; any other name must be one of torchvision's.
BUILT_IN_MODELS = ("thumbnail", "torchscript", "exported")


class EmbedderError(ValueError):
    """The model or its weights cannot be loaded; the message names which and why."""


def check_embedder(model: str, weights: str, *, resolver: Resolver | None = None) -> None:
    """Cheap up-front validation (no model is built): a known model name and, for weights given
    as a path or URI, an object that exists. Raises :class:`EmbedderError`."""
    if model not in BUILT_IN_MODELS and model not in _torchvision_models():
        raise EmbedderError(f"embedder.model: unknown model {model!r}; expected 'thumbnail', 'torchscript', "
                            f"'exported' or a torchvision model such as resnet18, resnet50")
    key = (weights or "none").strip()
    if model != "thumbnail" and key.lower() not in ("none", "default"):
        try:
            check_readable((resolver or Resolver()).resolve(key), want="file")
        except (StorageError, OSError) as exc:
            raise EmbedderError(f"embedder.weights: {exc}") from None


def _torchvision_models() -> set[str]:
    # Only the name of one of torchvision's models needs its list (and so torch).
    import torchvision

    return set(torchvision.models.list_models())
