"""The torch decode path against the CPU path on the same files: what each feature moves.

Used by ``tests/test_decode_torch.py`` and ``benchmarks/decode_agreement.py``.
"""

from __future__ import annotations

import io

import numpy as np

STATISTICS = ("brightness", "contrast", "sharpness", "shadows", "highlights")


def photo_jpeg(width: int, height: int, seed: int, *, quality: int = 90) -> bytes:
    """A photo-like JPEG: one of the demo's scenes upscaled to ``width`` x ``height`` with
    sensor noise (edges, gradients and texture at every scale)."""
    from PIL import Image

    from curation.demo import CLASSES, render_scene

    rng = np.random.default_rng(seed)
    names = list(CLASSES)
    scene = render_scene(names[seed % len(names)], rng, size=160).resize((width, height), Image.BICUBIC)
    arr = np.asarray(scene, np.float32) + rng.normal(0, 7, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def compare_paths(files: list[bytes], *, image_size: int = 224, device: str = "cpu") -> dict[str, np.ndarray]:
    """Per file: each statistic's absolute difference, the dHash's differing bits, the copy
    descriptors' cosine, the model inputs' mean absolute difference (grey levels), and whether
    the pixel hashes are equal, between :func:`curation.stages.decode.decode_image` (CPU) and
    :class:`curation.stages.decode_torch.TorchDecoder` on ``device``."""
    from curation.stages.decode import decode_image, jpeg_image_digest
    from curation.stages.decode_torch import TorchDecoder

    cpu = [decode_image(f, image_size=image_size, max_pixels=10**9) for f in files]
    pixels, features, decoded = TorchDecoder(image_size=image_size, device=device)(files)
    pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()
    # On that path the read task hashes the file (it holds the bytes) and the actor decodes it.
    features["pixel_hash"] = [jpeg_image_digest(f) for f in files]
    if not decoded.all():
        raise ValueError(f"the torch path refused {int((~decoded).sum())} of {len(files)} files")
    out = {name: np.abs(np.array([getattr(c, name) for c in cpu]) - features[name]) for name in STATISTICS}
    sharp = np.array([c.sharpness for c in cpu])
    out["sharpness_relative"] = out["sharpness"] / np.maximum(np.abs(sharp), 1e-9)
    phash = np.array([c.phash for c in cpu], np.int64) ^ features["phash"]
    out["phash_bits"] = np.array([bin(int(v) & (2**64 - 1)).count("1") for v in phash])
    descriptors = np.stack([c.copy_vector for c in cpu])
    out["descriptor_cosine"] = np.einsum("ij,ij->i", descriptors, features["copy_vector"])
    out["model_input_mad"] = np.array([np.abs(c.pixels.astype(np.int16) - p.astype(np.int16)).mean()
                                       for c, p in zip(cpu, pixels)])
    out["pixel_hash_equal"] = np.array([c.pixel_hash == h for c, h in zip(cpu, features["pixel_hash"])])
    out["size_equal"] = np.array([(c.width, c.height) == (w, h)
                                  for c, w, h in zip(cpu, features["width"], features["height"])])
    return out
