"""Copy detection is its own signal: a copy descriptor from the pixels and its own kNN graph,
whatever the embedder does with the images."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from curation.config import ScoresConfig
from curation.index.knn import exact_knn
from curation.scores import run_scores
from curation.stages.decode import copy_descriptor, decode_image, trim_border


def _scene(seed: int, size: int = 64) -> Image.Image:
    """A smooth random picture (blobs of colour at several scales), unlike any other seed's."""
    rng = np.random.default_rng(seed)
    arr = np.zeros((size, size, 3), np.float32)
    for cells in (2, 4, 8):
        noise = rng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)
        arr += np.asarray(Image.fromarray(noise).resize((size, size), Image.BICUBIC), np.float32) / 3
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


EDITS = {
    "reencoded": lambda im: (im, 45),
    "resized": lambda im: (im.resize((40, 40), Image.BICUBIC), 90),
    "brightness": lambda im: (ImageEnhance.Brightness(im).enhance(1.2), 90),
    "cropped": lambda im: (im.crop((3, 2, 61, 61)), 90),
    "bordered": lambda im: (ImageOps.expand(im, border=6, fill=(0, 0, 0)), 90),
    "mirrored": lambda im: (ImageOps.mirror(im), 90),
    "greyscale": lambda im: (ImageOps.grayscale(im).convert("RGB"), 90),
    "aspect": lambda im: (im.resize((84, 64), Image.BICUBIC), 90),
}


def _decoded_set():
    """60 originals in 3 classes, plus one copy of each of 8 originals under every edit."""
    originals = [_scene(seed) for seed in range(60)]
    files, source = [_jpeg(im) for im in originals], [-1] * 60
    for j, (name, edit) in enumerate(EDITS.items()):
        src = 5 * j + 1
        image, quality = edit(originals[src])
        files.append(_jpeg(image, quality))
        source.append(src)
    decoded = [decode_image(data, image_size=32, max_pixels=10**8) for data in files]
    return decoded, np.array(source)


def _samples(decoded, labels) -> pa.Table:
    n = len(decoded)
    return pa.table({
        "input_id": np.arange(n, dtype=np.int64), "uri": [f"/d/{i:03d}.jpg" for i in range(n)],
        "label": pa.array(labels, pa.string()), "status": ["ok"] * n, "reason": pa.nulls(n, pa.string()),
        "width": np.array([d.width for d in decoded], np.int32), "height": np.array([d.height for d in decoded], np.int32),
        **{name: np.array([getattr(d, name) for d in decoded], np.float32)
           for name in ("brightness", "contrast", "sharpness", "shadows", "highlights")},
        "content_hash": [f"c{i}" for i in range(n)], "pixel_hash": [d.pixel_hash for d in decoded],
        "phash": np.array([d.phash for d in decoded], np.int64),
    })


def _semantic_embedding(classes: np.ndarray, seed: int = 0) -> np.ndarray:
    """What a trained encoder does to a class: every member as close to every other as a copy."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes.max() + 1, 32))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[classes] + 0.04 * rng.normal(size=(len(classes), 32))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_copies_are_found_under_an_encoder_that_collapses_each_class():
    decoded, source = _decoded_set()
    n = len(decoded)
    classes = np.arange(60) % 3
    classes = np.concatenate([classes, classes[source[60:]]])
    semantic = _semantic_embedding(classes)
    copies = np.stack([d.copy_vector for d in decoded])
    samples = _samples(decoded, [str(c) for c in classes])
    cfg = ScoresConfig()
    scored, report = run_scores(samples, semantic, exact_knn(semantic, 10), cfg, copies=copies,
                                copy_knn=exact_knn(copies, 10))
    df = scored.to_pandas()
    for i in range(60, n):
        assert df.dup_group[i] == df.dup_group[source[i]], list(EDITS)[i - 60]
        # the one not kept (the copy, or the original when the copy has more pixels) is "near"
        assert "near" in (df.dup_kind[i], df.dup_kind[source[i]])
    # ... and no two distinct originals are merged, though the encoder cannot tell them apart
    groups = df.dup_group[:60].dropna()
    assert groups.value_counts().max() == 1
    assert report["summary"]["duplicates"]["flags"]["duplicates_not_kept"] == len(EDITS)

    # The embedding alone (what the job did before, and does without pixels) misses them: the
    # ratio test sees every same-class photo as close as the copy.
    alone = run_scores(samples, semantic, exact_knn(semantic, 10), cfg)[0].to_pandas()
    found = sum(alone.dup_group[i] == alone.dup_group[source[i]] for i in range(60, n))
    assert found < len(EDITS) // 2, found


def test_semantic_duplicates_are_opt_in_and_never_hide_a_copy():
    decoded, source = _decoded_set()
    classes = np.concatenate([np.arange(60) % 3, (np.arange(60) % 3)[source[60:]]])
    semantic = _semantic_embedding(classes)
    copies = np.stack([d.copy_vector for d in decoded])
    samples = _samples(decoded, [None] * len(decoded))
    scored, _ = run_scores(samples, semantic, exact_knn(semantic, 10), ScoresConfig(semantic_duplicate_cosine=0.97),
                           copies=copies, copy_knn=exact_knn(copies, 10))
    df = scored.to_pandas()
    assert set(df.dup_kind.dropna()) == {"near", "semantic"}
    assert (df.dup_kind == "semantic").sum() > 0
    for i in range(60, len(decoded)):
        assert df.dup_group[i] == df.dup_group[source[i]]


def test_copy_descriptor_invariances():
    scene = _scene(3)
    base = decode_image(_jpeg(scene), image_size=32, max_pixels=10**8).copy_vector
    other = decode_image(_jpeg(_scene(4)), image_size=32, max_pixels=10**8).copy_vector
    assert abs(float(np.linalg.norm(base)) - 1.0) < 1e-4
    grey = Image.fromarray(np.asarray(scene.convert("L")))
    assert np.allclose(copy_descriptor(grey), copy_descriptor(ImageOps.mirror(grey)), atol=1e-5)  # mirror
    for name, edit in EDITS.items():
        image, quality = edit(scene)
        edited = decode_image(_jpeg(image, quality), image_size=32, max_pixels=10**8).copy_vector
        assert float(edited @ base) > 0.9, name
    assert float(other @ base) < 0.8
    blurred = decode_image(_jpeg(scene.filter(ImageFilter.GaussianBlur(1))), image_size=32, max_pixels=10**8)
    assert float(blurred.copy_vector @ base) > 0.9


def test_border_trim_finds_the_picture_inside_a_frame():
    picture = np.asarray(_scene(5).convert("L"))
    framed = np.zeros((100, 160), np.uint8)  # letterboxed and pillarboxed in black
    framed[18:82, 48:112] = picture
    assert trim_border(framed).shape == picture.shape
    flat = np.full((50, 50), 128, np.uint8)  # nothing to trim to: kept whole
    assert trim_border(flat).shape == flat.shape
