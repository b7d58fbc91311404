"""Embedding model registry.

``embedder.model`` names one of:

* ``thumbnail`` -- a weight-free pixel descriptor: the image average-pooled to 16x16, per-image
  standardised (brightness/contrast invariant), flattened (768-d). Needs no download, so it is
  the offline demo's default. It captures colour and layout, **not semantics**: classes that
  differ only in meaning separate weakly (see NOTES: 10-NN accuracy ~0.49 on CIFAR-10 versus
  ~0.87 for a trained network), but near copies it finds well.
* a torchvision backbone (``resnet18``, ``resnet50``, ``mobilenet_v3_small``, ``efficientnet_b0``,
  ``convnext_tiny``, ``vit_b_16``, ... any ``torchvision.models`` name) with its classifier
  head removed (penultimate features).
* ``torchscript`` -- a user TorchScript program file (``weights`` = its path or ``s3://`` URI),
  mapping a float (N, 3, S, S) ImageNet-normalised batch to (N, D) features.
* ``exported`` -- the same contract as a ``torch.export`` program (``torch.export.save``, a
  ``.pt2`` file; export it with a dynamic batch dimension).

``embedder.weights``: ``DEFAULT`` (torchvision's published weights, downloaded and cached by
torchvision; needs internet once), a path or ``s3://`` URI of a state_dict (loaded with
``weights_only=True``), or ``none`` (random init: only meaningful for tests and timing).
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import asdict, dataclass

import torch
from torch import nn

from curation.embedder_check import EmbedderError, check_embedder  # noqa: F401 (public here too)
from curation.io.filesystem import Resolver, read_bytes

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class EmbedderIdentity:
    """What produced an embedding; stored in run.json and beside every stored embedding."""

    model: str
    weights: str
    weights_sha256: str | None
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dim: int
    semantic: bool
    warning: str | None = None

    @property
    def model_id(self) -> str:
        digest = (self.weights_sha256 or self.weights)[:12]
        return f"{self.model}@{digest}/{self.image_size}px"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["model_id"] = self.model_id
        return data


class ThumbnailEmbedder(nn.Module):
    """A weight-free appearance descriptor: layout plus colour.

    The image is average-pooled to ``grid`` x ``grid``. The layout part is that thumbnail with
    each channel's mean removed (unit norm, so invariant to brightness and contrast shifts);
    the colour part is the channel means plus a constant (unit norm). They are concatenated
    with weights sqrt(``layout_weight``) and sqrt(1 - ``layout_weight``), so the cosine of two
    embeddings is ``layout_weight * cos(layout) + (1 - layout_weight) * cos(colour)``.
    """

    def __init__(self, grid: int = 16, layout_weight: float = 0.7):
        super().__init__()
        self.grid = grid
        self.layout_weight = layout_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.adaptive_avg_pool2d(x, self.grid)
        means = pooled.mean(dim=(2, 3))
        layout = (pooled - means[:, :, None, None]).flatten(1)
        layout = nn.functional.normalize(layout, dim=1, eps=1e-6)
        colour = torch.cat([means, torch.ones_like(means[:, :1])], dim=1)
        colour = nn.functional.normalize(colour, dim=1)
        w = self.layout_weight
        return torch.cat([layout * w**0.5, colour * (1.0 - w) ** 0.5], dim=1)


def _strip_head(model: nn.Module) -> nn.Module:
    """Replace the last Linear layer (the classifier) with Identity -> penultimate features."""
    last_name = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last_name = name
    if last_name is None:
        raise EmbedderError("model has no Linear classifier head to remove")
    parent = model
    *path, leaf = last_name.split(".")
    for part in path:
        parent = getattr(parent, part)
    setattr(parent, leaf, nn.Identity())
    return model


def _load_bytes(uri: str, resolver: Resolver) -> bytes:
    try:
        return read_bytes(resolver.resolve(uri))
    except (OSError, ValueError) as exc:
        raise EmbedderError(f"embedder.weights: cannot read {uri} ({exc})") from None


def load_embedder(model: str, weights: str, *, image_size: int,
                  resolver: Resolver | None = None) -> tuple[nn.Module, EmbedderIdentity]:
    """Build the model (eval mode, on CPU) and describe it.

    Raises:
        EmbedderError: unknown model name, unreadable or mismatched weights.
    """
    import torchvision

    resolver = resolver or Resolver()
    weights_sha = None
    warning = None
    semantic = True
    weights_key = (weights or "none").strip()
    if model == "thumbnail":
        net: nn.Module = ThumbnailEmbedder()
        weights_key, semantic = "none", False
        warning = ("thumbnail embedder: a weight-free pixel descriptor (colour and layout, no "
                   "semantics); label quality and clusters reflect appearance only")
    elif model in ("torchscript", "exported"):
        if weights_key.lower() in ("none", "default"):
            raise EmbedderError(f"embedder.weights: model '{model}' needs the program file's path or s3:// URI")
        data = _load_bytes(weights_key, resolver)
        weights_sha = hashlib.sha256(data).hexdigest()
        try:
            if model == "torchscript":
                net = torch.jit.load(io.BytesIO(data), map_location="cpu")
            else:
                net = torch.export.load(io.BytesIO(data)).module()
        except Exception as exc:
            kind = "TorchScript" if model == "torchscript" else "torch.export"
            raise EmbedderError(f"embedder.weights: {weights_key} is not a {kind} program "
                                f"({str(exc).splitlines()[0][:300]})") from None
    else:
        available = set(torchvision.models.list_models())
        if model not in available:
            raise EmbedderError(f"embedder.model: unknown model {model!r}; expected 'thumbnail', "
                                f"'torchscript' or a torchvision model such as resnet18, resnet50")
        if weights_key.upper() == "DEFAULT":
            # torchvision downloads once and caches; needs internet on first use.
            tv_weights = torchvision.models.get_model_weights(model).DEFAULT
            net = torchvision.models.get_model(model, weights=tv_weights)
            weights_key = f"torchvision:{tv_weights}"
        elif weights_key.lower() == "none":
            # Seeded: every actor of a run (and every run) must get the same random network, or
            # vectors embedded by two actors would not be comparable.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                net = torchvision.models.get_model(model, weights=None)
            semantic = False
            warning = (f"embedder {model} has random weights (weights: none): embeddings carry no "
                       f"semantics; use only for tests and timing")
            log.warning(warning)
        else:
            data = _load_bytes(weights_key, resolver)
            weights_sha = hashlib.sha256(data).hexdigest()
            net = torchvision.models.get_model(model, weights=None)
            try:
                state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
                if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                    state = state["state_dict"]
                net.load_state_dict(state)
            except Exception as exc:
                raise EmbedderError(f"embedder.weights: {weights_key} does not load into {model} "
                                    f"({str(exc).splitlines()[0][:300]})") from None
        net = _strip_head(net)
    if hasattr(net, "eval") and model != "exported":  # an exported program's module has no train mode
        net.eval()
    with torch.inference_mode():
        dim = int(net(torch.zeros(1, 3, image_size, image_size)).reshape(1, -1).shape[1])
    identity = EmbedderIdentity(
        model=model, weights=weights_key, weights_sha256=weights_sha, image_size=image_size,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, dim=dim, semantic=semantic, warning=warning,
    )
    return net, identity
