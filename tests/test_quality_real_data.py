"""A reduced form of benchmarks/quality.py on the real reference data in ../shared/data:
thresholds sit below what the full benchmark measures, so a score that regresses fails.
Skips with a reason when the reference data is absent."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pyarrow as pa
import pytest

from benchmarks import quality as Q

pytestmark = pytest.mark.skipif(not os.path.isdir(os.path.join(Q.DATA, "mnist")),
                                reason=f"reference data not found under {Q.DATA}")


def test_mnist_label_noise_and_duplicates_with_pixel_features():
    from PIL import Image
    from sklearn.decomposition import PCA
    from sklearn.metrics import roc_auc_score

    from curation.config import ScoresConfig
    from curation.index.knn import exact_knn
    from curation.scores import run_scores
    from curation.stages.decode import pixel_statistics

    rng = np.random.default_rng(1)
    images, labels = Q.load_mnist()
    pick = rng.choice(len(images), 3000, replace=False)
    x, y = images[pick].astype(np.float32), labels[pick].copy()
    flip = rng.choice(3000, 180, replace=False)  # 6%: half look-alike, half random
    for j, i in enumerate(flip):
        y[i] = Q.LOOKALIKE[y[i]] if j % 2 == 0 and y[i] in Q.LOOKALIKE else (y[i] + rng.integers(1, 10)) % 10
    x = np.concatenate([x, x[:30], x[30:60] * 0.8])  # 30 exact copies, 30 dimmed copies
    y = np.concatenate([y, y[:30], y[30:60]])
    n = len(x)
    feats = PCA(64, random_state=0).fit_transform(x.reshape(n, -1))
    feats = (feats / np.linalg.norm(feats, axis=1, keepdims=True)).astype(np.float32)
    u8 = [np.clip(img, 0, 255).astype(np.uint8) for img in x]
    stats = [pixel_statistics(Image.fromarray(img).convert("RGB")) for img in u8]
    hashes = [hashlib.blake2b(img.tobytes(), digest_size=16).hexdigest() for img in u8]
    samples = pa.table({
        "input_id": np.arange(n, dtype=np.int64), "uri": [f"m/{i}" for i in range(n)], "label": [str(v) for v in y],
        "status": ["ok"] * n, "reason": pa.nulls(n, pa.string()),
        "width": np.full(n, 28, np.int32), "height": np.full(n, 28, np.int32),
        "brightness": np.array([s[0] for s in stats], np.float32), "contrast": np.array([s[1] for s in stats], np.float32),
        "sharpness": np.array([s[2] for s in stats], np.float32), "content_hash": hashes, "pixel_hash": hashes,
        "phash": np.array([s[3] for s in stats], np.int64),
    })
    scored, _ = run_scores(samples, feats, exact_knn(feats, 10), ScoresConfig())
    df = scored.to_pandas()
    is_flip = np.zeros(n, bool)
    is_flip[flip] = True
    is_flip[3000:3030] = is_flip[:30]
    is_flip[3030:] = is_flip[30:60]
    assert roc_auc_score(is_flip, -df.label_quality.to_numpy()) >= 0.97
    assert all(df.dup_group[3000 + j] == df.dup_group[j] for j in range(30))  # exact copies
    found = sum(df.dup_group[3030 + j] == df.dup_group[30 + j] for j in range(30))
    assert found >= 27  # dimmed copies
    flagged = df.dup_of.notna().sum()
    assert flagged <= 120  # no flood of false groups among look-alike digits


def test_cifar_junk_flags():
    from PIL import Image, ImageEnhance, ImageFilter

    from curation.config import ScoresConfig
    from curation.stages.decode import decode_image

    photos, _ = Q.load_cifar("test", 400, seed=3)
    cfg = ScoresConfig()
    truth, flags = [], []
    for i, arr in enumerate(photos):
        img, kind = Image.fromarray(arr), "clean"
        if i < 40:
            img, kind = ImageEnhance.Brightness(img).enhance(0.12), "dark"
        elif i < 80:
            img, kind = Image.blend(img, Image.new("RGB", img.size, "white"), 0.85), "bright"
        elif i < 120:
            img, kind = img.filter(ImageFilter.GaussianBlur(2)), "blurry"
        import io
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=92)
        d = decode_image(buf.getvalue(), image_size=32, max_pixels=10**8)
        flags.append({"dark": d.highlights < cfg.dark_highlights, "bright": d.shadows > cfg.bright_shadows and d.highlights - d.shadows < cfg.bright_max_range,
                      "blurry": d.sharpness < cfg.blurry_sharpness and d.contrast >= cfg.low_information_std})
        truth.append(kind)
    for kind in ("dark", "bright", "blurry"):
        planted = np.array([t == kind for t in truth])
        flagged = np.array([f[kind] for f in flags])
        recall = (planted & flagged).sum() / planted.sum()
        precision = (planted & flagged).sum() / max(1, flagged.sum())
        assert recall >= 0.9 and precision >= 0.9, (kind, recall, precision)
