"""The torch decode path (``decode.path: torch``; on CPU here): it agrees with the CPU path on
photos, takes only the files it can, and leaves every other file and every failure to the CPU
path with the same ``rejected`` reasons."""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.io.filesystem import Resolver
from curation.stages.decode import DecodeStage, jpeg_image_digest
from curation.stages.jpeg import torch_decodable
from testkit.decode_agreement import compare_paths, photo_jpeg


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _with_segment(jpeg: bytes, marker: int, payload: bytes) -> bytes:
    return jpeg[:2] + bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


def _orientation_exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


@pytest.mark.parametrize("width, height", [(640, 480), (1600, 1200)])
def test_the_torch_path_agrees_with_the_cpu_path_on_photos(width, height):
    files = [photo_jpeg(width, height, seed) for seed in range(6)]
    diff = compare_paths(files, image_size=224)
    assert diff["size_equal"].all() and diff["pixel_hash_equal"].all()
    # The stated tolerances (benchmarks/README.md, "Decoding on the device"): statistics within a
    # grey level or two, the copy descriptor at cosine >= 0.99, the model input within ~1 level.
    assert diff["brightness"].max() < 0.002 and diff["contrast"].max() < 0.002
    assert diff["shadows"].max() <= 2 / 255 + 1e-9 and diff["highlights"].max() <= 2 / 255 + 1e-9
    assert diff["sharpness_relative"].max() < 0.05
    assert diff["descriptor_cosine"].min() >= 0.99
    assert diff["phash_bits"].max() <= 8
    assert diff["model_input_mad"].max() < 2.0


def _thumbnails() -> list[np.ndarray]:
    """Grey working thumbnails of every kind the features meet: photos at two aspects, a
    letterboxed and a pillarboxed one (the copy descriptor trims those frames), a flat one and
    ones too small for the Laplacian."""
    from curation.stages.decode import decode_into

    out = []
    for seed, (width, height) in enumerate([(640, 480), (480, 640), (1600, 1200), (300, 200)]):
        model_input = np.empty((64, 64, 3), np.uint8)
        grey = decode_into(photo_jpeg(width, height, seed), image_size=64, max_pixels=10**9,
                           background=(255, 255, 255), pixels_out=model_input)[3]
        out.append(np.array(grey))
    boxed = out[0].copy()
    boxed[:24], boxed[-24:] = 0, 0
    pillar = out[1].copy()
    pillar[:, :30], pillar[:, -30:] = 250, 250
    rng = np.random.default_rng(0)
    return out + [boxed, pillar, np.full((40, 50), 90, np.uint8), rng.integers(0, 255, (2, 7), np.uint8),
                  rng.integers(0, 255, (9, 5), np.uint8)]


def test_the_torch_features_are_the_cpu_paths_on_the_same_thumbnails():
    """Given equal thumbnails the device's features are the CPU path's: exact statistics
    (integer histograms and Laplacians), the same dHash and the same copy descriptor (PIL's
    fixed-point resize, reduction and blur, emulated on the device)."""
    import torch

    from curation.stages.decode import ThumbnailFeatures
    from curation.stages.decode_torch import TorchThumbnailFeatures

    thumbnails = _thumbnails()
    cpu = ThumbnailFeatures(len(thumbnails))
    for i, lum in enumerate(thumbnails):
        cpu.add(i, Image.fromarray(lum, "L"))
    on_device = TorchThumbnailFeatures(len(thumbnails))
    for i, lum in enumerate(thumbnails):  # one stack per size, as the decoder stacks them
        on_device.add(np.array([i]), torch.from_numpy(lum)[None])
    same_size = TorchThumbnailFeatures(2)  # and a stack of two in one call
    same_size.add(np.array([1, 0]), torch.from_numpy(np.stack([thumbnails[4], thumbnails[0]])))
    expected, got = cpu.finish(), on_device.finish()
    for key in ("brightness", "contrast", "sharpness", "shadows", "highlights", "phash"):
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    assert np.einsum("ij,ij->i", got["copy_vector"], expected["copy_vector"])[:6].min() > 0.9999
    np.testing.assert_array_equal(got["copy_vector"][6], 0)  # flat: no descriptor on either path
    stacked = same_size.finish()
    np.testing.assert_array_equal(stacked["phash"], expected["phash"][[0, 4]])
    np.testing.assert_array_equal(stacked["sharpness"], expected["sharpness"][[0, 4]])


@pytest.mark.parametrize("shape", [(192, 256), (256, 171), (200, 256), (26, 26), (37, 61)])
def test_pils_resize_reduction_and_blur_are_emulated_on_the_device(shape):
    import torch
    from PIL import ImageFilter

    from curation.stages.decode_torch import _pil_reduce_then_resize, pil_gaussian_blur, pil_resize

    lum = np.random.default_rng(shape[0]).integers(0, 256, shape, np.uint8)
    image, tensor = Image.fromarray(lum, "L"), torch.from_numpy(lum)[None]
    for size in ((16, 16), (8, 9), (32, 32)):
        expected = np.asarray(image.resize(size[::-1], Image.BILINEAR)).astype(int)
        np.testing.assert_array_equal(pil_resize(tensor, *size)[0].numpy(), expected)
    reduced = np.asarray(image.resize((32, 32), Image.BILINEAR, reducing_gap=2.0)).astype(int)
    difference = np.abs(_pil_reduce_then_resize(tensor, 32, 32, 2.0)[0].numpy().astype(int) - reduced)
    assert difference.max() <= 1 and difference.mean() < 0.01  # Pillow's corner boxes round their own way
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(1.0)))
    np.testing.assert_array_equal(pil_gaussian_blur(tensor, 1.0)[0].numpy(), blurred)


def test_only_plain_complete_upright_jpegs_take_the_torch_path():
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), np.uint8))
    plain = _encode(photo, "JPEG", quality=90)
    assert torch_decodable(plain, 10**8)
    assert torch_decodable(_encode(photo, "JPEG", progressive=True), 10**8)
    assert torch_decodable(_encode(photo.convert("L"), "JPEG"), 10**8)
    assert not torch_decodable(plain, 60 * 80 - 1)  # over decode.max_pixels
    assert not torch_decodable(_encode(photo, "PNG"), 10**8)
    assert not torch_decodable(_encode(photo.convert("CMYK"), "JPEG"), 10**8)
    assert not torch_decodable(_encode(photo, "JPEG", exif=_orientation_exif(6)), 10**8)  # EXIF-rotated
    assert torch_decodable(_encode(photo, "JPEG", exif=_orientation_exif(1)), 10**8)  # upright EXIF
    assert not torch_decodable(plain[: len(plain) // 2], 10**8)  # truncated: no end-of-image marker


def test_a_jpegs_pixel_hash_ignores_metadata_but_not_orientation_or_pixels():
    photo = Image.fromarray(np.random.default_rng(1).integers(0, 255, (60, 80, 3), np.uint8))
    plain = _encode(photo, "JPEG", quality=90)
    digest = jpeg_image_digest(plain)
    assert digest == jpeg_image_digest(_with_segment(plain, 0xFE, b"a comment"))  # COM
    assert digest == jpeg_image_digest(_with_segment(plain, 0xE1, b"http://ns.adobe.com/xap/1.0/\x00<x/>"))  # XMP
    assert digest != jpeg_image_digest(_encode(photo, "JPEG", exif=_orientation_exif(6)))
    assert digest != jpeg_image_digest(_encode(photo, "JPEG", quality=89))
    assert jpeg_image_digest(_encode(photo, "PNG")) is None


def _batch_through(tmp_path, names, *, defer: bool):
    from curation.stages.embed import EmbedStage

    stage = DecodeStage(resolver=Resolver(), image_size=32, max_pixels=10**8, defer_jpegs=defer)
    batch = stage({"uri": np.array([str(tmp_path / n) for n in names], object)})
    embed = EmbedStage(model="thumbnail", weights="none", image_size=32, device="cpu",
                       decode={"max_pixels": 10**8, "background": [255, 255, 255]} if defer else None)
    return batch, embed(batch).to_pydict()


def test_deferred_rows_are_decoded_in_the_actor_as_the_cpu_path_decodes_them(tmp_path):
    photo = Image.open(io.BytesIO(photo_jpeg(320, 240, 3)))
    plain = _encode(photo, "JPEG", quality=90)

    def damaged(seed: int) -> bytes:  # scan data garbled, markers kept
        garbled = bytearray(plain)
        noise = np.random.default_rng(seed).integers(0, 256, 400, np.uint8).tobytes()
        garbled[len(plain) // 2: len(plain) // 2 + 400] = noise
        return bytes(garbled)

    files = {
        "plain.jpg": plain,
        "copy.jpg": _with_segment(plain, 0xFE, b"same picture, other metadata"),
        "photo.png": _encode(photo, "PNG"),
        "rotated.jpg": _encode(photo, "JPEG", exif=_orientation_exif(6)),
        "truncated.jpg": plain[: len(plain) // 2],
        "damaged.jpg": damaged(0),  # both decoders refuse it
        "garbled.jpg": damaged(1),  # both decode it
        "refused.jpg": damaged(2),  # torchvision's decoder refuses it, the CPU path (run in the actor) decodes it
        "headless.jpg": b"\xff\xd8\xff" + b"\x00" * 50 + b"\xff\xd9",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    names = list(files) + ["gone.jpg"]
    deferred, torch_rows = _batch_through(tmp_path, names, defer=True)
    sent = [bool(b) for b in deferred["jpeg"]]
    assert sent == [True, True, False, False, False, True, True, True, False, False]  # only plain, complete JPEGs travel
    # The read task hashes what it sends; pixels travel only for the rows it decoded, as bytes.
    assert deferred["pixel_hash"][0] == jpeg_image_digest(plain)
    assert [len(p) for p in deferred["pixels"]] == [0, 0, 32 * 32 * 3, 32 * 32 * 3, 0, 0, 0, 0, 0, 0]  # the actor wrote into a copy
    _, cpu_rows = _batch_through(tmp_path, names, defer=False)
    assert torch_rows["status"] == cpu_rows["status"] and torch_rows["reason"] == cpu_rows["reason"]
    assert cpu_rows["status"][:4] == ["ok"] * 4 and cpu_rows["status"][4] == "rejected"
    assert torch_rows["pixel_hash"] == cpu_rows["pixel_hash"]
    assert torch_rows["pixel_hash"][0] == torch_rows["pixel_hash"][1]  # metadata does not matter
    assert "jpeg" not in torch_rows
    for i, status in enumerate(cpu_rows["status"]):
        if status != "ok":
            assert torch_rows["embedding"][i] is None
            continue
        a, b = np.array(torch_rows["embedding"][i]), np.array(cpu_rows["embedding"][i])
        assert float(a @ b) > 0.99, names[i]
        assert abs(torch_rows["brightness"][i] - cpu_rows["brightness"][i]) < 0.002, names[i]
        assert torch_rows["width"][i] == cpu_rows["width"][i] and torch_rows["height"][i] == cpu_rows["height"][i]


def test_a_job_on_the_torch_path_finds_what_the_cpu_path_finds(ray_local, demo_set, tmp_path, monkeypatch):
    """The demo set (planted exact and near copies, junk, non-images) through the job twice:
    the same statuses and reasons, and the same copy groups and junk flags on >= 99.5% of items.
    The torch run's actors take two calls at once, as GPU actors do."""
    from curation import pipeline
    from curation.config import load_config
    from curation.demo import demo_config
    from curation.job import run_job

    root, _ = demo_set
    runs = {}
    sized = pipeline.stage_requests
    for path in ("cpu", "torch"):
        if path == "torch":
            monkeypatch.setattr(pipeline, "stage_requests", lambda *a, **k: {**sized(*a, **k), "calls": 2})
        data = demo_config("/unused", str(tmp_path / path), budget=40)
        data["input"] = {"images": os.path.join(root, "images"), "labels": os.path.join(root, "labels.csv")}
        data["decode"] = {"path": path}
        data["store"] = {"enabled": False}
        data["selections"] = [{"name": "clean", "mode": "clean"}]  # what is compared: the flags and groups
        data["report"] = {"map_method": "pca", "thumbnails": 0}
        data["drift"] = {"enabled": False}
        result = run_job(load_config(data=data))
        runs[path] = pq.read_table(os.path.join(result.run_uri, "samples")).sort_by("uri").to_pandas()
    cpu, torch_ = runs["cpu"], runs["torch"]
    assert list(cpu.uri) == list(torch_.uri) and list(cpu.status) == list(torch_.status)
    rejected = (cpu.status == "rejected").to_numpy()
    assert rejected.sum() > 0 and list(cpu.reason[rejected]) == list(torch_.reason[rejected])
    flags = [c for c in cpu.columns if c.startswith("is_")]
    same = np.ones(len(cpu), bool)
    for column in flags:
        same &= cpu[column].fillna(False).to_numpy() == torch_[column].fillna(False).to_numpy()
    # Copy groups compared as the set of members of each item's group, with its kind.
    for run in (cpu, torch_):
        members = run.dropna(subset=["dup_group"]).groupby("dup_group").uri.apply(frozenset)
        run["group_members"] = run.dup_group.map(members)
    same &= (cpu.group_members.fillna("") == torch_.group_members.fillna("")).to_numpy()
    same &= (cpu.dup_kind.fillna("") == torch_.dup_kind.fillna("")).to_numpy()
    assert same.mean() >= 0.995, cpu[~same][["uri"] + flags]
    assert (cpu.pixel_hash.fillna("") == torch_.pixel_hash.fillna("")).all()
    assert set(cpu.dup_kind.dropna()) >= {"exact", "near"} and cpu[flags].to_numpy().any()
