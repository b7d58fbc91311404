"""Decoding: every input yields one row; bad inputs are rejected with a specific reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from curation.io.filesystem import Resolver
from curation.stages.decode import DecodeStage, RejectedInput, decode_image


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _photo(w=120, h=80, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = np.zeros((h, w, 3), np.uint8)
    arr[: h // 2, : w // 3] = (250, 20, 20)  # an asymmetric block, so rotation is visible
    arr += rng.integers(0, 20, arr.shape, dtype=np.uint8)
    return Image.fromarray(arr, "RGB")


def _decode(data: bytes, **kw):
    return decode_image(data, image_size=kw.pop("image_size", 32), max_pixels=kw.pop("max_pixels", 10**8), **kw)


@pytest.mark.parametrize("data, reason", [
    (b"", "corrupt: empty file"),
    (b"<!DOCTYPE html><html>not found</html>", "not an image: looks like HTML"),
    (b'{"error": "denied"}', "not an image: looks like JSON"),
    (bytes(range(256)) * 4, "not an image: unrecognised format"),
])
def test_non_images_are_rejected_with_reason(data, reason):
    with pytest.raises(RejectedInput) as err:
        _decode(data)
    assert str(err.value).startswith(reason)


def test_truncated_jpeg_is_rejected():
    data = _encode(_photo(400, 300), "JPEG", quality=90)
    with pytest.raises(RejectedInput, match="corrupt: truncated"):
        _decode(data[: len(data) // 2])


def test_pixel_cap_refuses_before_decoding():
    data = _encode(Image.new("RGB", (3000, 3000), "gray"), "PNG")
    with pytest.raises(RejectedInput, match="too many pixels: 3000x3000"):
        _decode(data, max_pixels=1_000_000)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "1"])
def test_odd_but_valid_modes_decode_to_rgb(mode):
    base = _photo()
    if mode == "I;16":
        image = Image.fromarray((np.asarray(base.convert("L"), np.uint16) * 257))
        assert image.mode.startswith("I;16")
    else:
        image = base.convert(mode)
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    decoded = _decode(_encode(image, fmt))
    assert decoded.pixels.shape == (32, 32, 3) and decoded.pixels.dtype == np.uint8
    assert (decoded.width, decoded.height) == (120, 80)
    assert 0.0 <= decoded.brightness <= 1.0


def test_transparency_is_composited_on_background():
    image = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    decoded = _decode(_encode(image, "PNG"), background=(255, 255, 255))
    assert decoded.pixels.min() == 255 and decoded.brightness > 0.99


def test_exif_rotation_is_applied():
    upright = _photo(120, 80)
    stored = upright.transpose(Image.Transpose.ROTATE_270)  # stored sideways (90 degrees clockwise) ...
    exif = Image.Exif()
    exif[0x0112] = 8  # ... with orientation 8: rotate 90 degrees counter-clockwise to view
    rotated = _decode(_encode(stored, "PNG", exif=exif.tobytes()))
    plain = _decode(_encode(upright, "PNG"))
    assert (rotated.width, rotated.height) == (120, 80)
    np.testing.assert_array_equal(rotated.pixels, plain.pixels)


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (30, 30), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    decoded = _decode(buf.getvalue())
    assert decoded.pixels[..., 0].mean() > 200 and decoded.pixels[..., 2].mean() < 50


def test_large_jpeg_uses_draft_mode_but_reports_full_size():
    data = _encode(_photo(2400, 1800), "JPEG", quality=85)
    decoded = _decode(data, image_size=64)
    assert (decoded.width, decoded.height) == (2400, 1800)


def test_pixel_statistics_separate_dark_bright_blurry():
    from PIL import ImageFilter

    sharp = _decode(_encode(_photo(200, 200), "PNG"))
    dark = _decode(_encode(Image.eval(_photo(200, 200), lambda v: v // 12), "PNG"))
    blurry = _decode(_encode(_photo(200, 200).filter(ImageFilter.GaussianBlur(6)), "PNG"))
    assert dark.brightness < 0.05 < sharp.brightness
    assert blurry.sharpness < sharp.sharpness / 10
    # A sharp small image is not blurry: statistics are never computed on an upscaled image.
    small = _decode(_encode(_photo(32, 32), "PNG"))
    assert small.sharpness > blurry.sharpness * 10


def test_stage_returns_one_row_per_input(tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(_encode(_photo(), "PNG"))
    (tmp_path / "empty.jpg").write_bytes(b"")
    stage = DecodeStage(resolver=Resolver(), image_size=16, max_pixels=10**8)
    batch = {
        "uri": np.array([str(good), str(tmp_path / "empty.jpg"), str(tmp_path / "gone.jpg"), str(good)], object),
        "input_error": np.array([None, None, None, "duplicate labels row"], object),
        "label": np.array(["a", "b", None, "a"], object),
    }
    out = stage(batch)
    assert list(out["status"]) == ["ok", "rejected", "rejected", "rejected"]
    assert out["reason"][1].startswith("corrupt: empty") and out["reason"][2].startswith("missing")
    assert out["reason"][3] == "duplicate labels row"
    assert out["pixels"].shape == (4, 16, 16, 3) and list(out["label"]) == ["a", "b", None, "a"]
    assert out["pixels"][0].any() and not out["pixels"][1:].any()  # rejected rows hold zeros
    assert out["content_hash"][0] and out["pixel_hash"][0]


def test_jpegs_decode_once_at_the_smallest_scale_that_serves_every_consumer():
    from curation.stages.decode import STATS_MAX_SIDE, draft_request

    # The shorter side must cover the model input, the longer side the statistics' thumbnail.
    assert draft_request(640, 480, 224) == (STATS_MAX_SIDE, 224)
    assert draft_request(480, 640, 224) == (224, STATS_MAX_SIDE)
    assert draft_request(100, 80, 224) == (100, 224)  # never asks for more than the image has
    data = _encode(_photo(1600, 1200), "JPEG", quality=90)
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", draft_request(1600, 1200, 224))
    assert image.size == (400, 300)  # DCT-scaled by 4, still >= 224 x 256
    decoded = _decode(data, image_size=224)
    assert (decoded.width, decoded.height) == (1600, 1200) and decoded.pixels.shape == (224, 224, 3)


def test_statistics_at_decode_scale_match_full_decode():
    """Decoding a JPEG at a reduced DCT scale barely moves the statistics and the hash."""
    from curation.stages.decode import pixel_statistics

    photo = _photo(1280, 960, seed=3).filter(__import__("PIL.ImageFilter", fromlist=["x"]).GaussianBlur(1))
    data = _encode(photo, "JPEG", quality=92)
    fast = _decode(data, image_size=224)
    full = pixel_statistics(Image.open(io.BytesIO(data)).convert("RGB"))
    assert abs(fast.brightness - full[0]) < 0.01 and abs(fast.contrast - full[1]) < 0.01
    assert abs(fast.sharpness - full[2]) < 0.25 * full[2]
    assert bin(fast.phash ^ full[3]).count("1") <= 4


def test_a_huge_image_within_the_pixel_cap_decodes_within_the_declared_task_memory(tmp_path):
    """A 90-megapixel PNG (under decode.max_pixels) needs less than DecodeStage.memory_bytes,
    measured in a fresh process that first imports what a decode worker imports (the pipeline
    module: torch, Ray, pyarrow): the resident high-water mark over the resident size after those
    imports. The libraries' own pages (libtorch alone is over 400 MB) are mapped once per node
    and shared by every worker, so they are not the task's to declare."""
    import subprocess
    import sys

    path = tmp_path / "huge.png"
    subprocess.run([sys.executable, "-c", f"""
from PIL import Image
image = Image.linear_gradient("L").resize((9500, 9500)).convert("RGB")
image.save({str(path)!r}, compress_level=1)
"""], check=True)
    probe = subprocess.run([sys.executable, "-c", f"""
import curation.pipeline
from curation.stages.decode import DecodeStage, decode_image
def status(key):
    return [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key)][0]
base = status("VmRSS")
data = open({str(path)!r}, "rb").read()
decoded = decode_image(data, image_size=224, max_pixels=100_000_000)
print(decoded.width, decoded.height, base, status("VmHWM"), DecodeStage.memory_bytes)
"""], check=True, capture_output=True, text=True)
    width, height, base, peak, declared = map(int, probe.stdout.split())
    assert (width, height) == (9500, 9500)  # reported at full size though decoded reduced
    assert peak - base < declared, f"peak {peak >> 20} MiB - {base >> 20} MiB after imports >= declared {declared >> 20} MiB"


@pytest.mark.parametrize("width, height", [(640, 480), (481, 700), (224, 300), (100, 60)])
def test_the_model_input_is_pil_bilinear_centre_square_within_rounding(width, height):
    """The model input (torch's uint8 antialiased kernel when downscaling, PIL's when upscaling)
    is the centred square resampled like PIL's bilinear filter: the same pixels within a few
    levels at the crop's edge, channels in order, and the PIL fallback exact."""
    from curation.stages.decode import model_input

    rng = np.random.default_rng(width)
    small = Image.fromarray(rng.integers(0, 255, (height // 10 + 2, width // 10 + 2, 3), dtype=np.uint8))
    photo = np.asarray(small.resize((width, height), Image.BICUBIC)).copy()
    photo[: height // 3, : width // 3] = (250, 10, 90)  # one corner tinted: catches swapped channels or axes
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    reference = np.asarray(Image.fromarray(photo).resize((224, 224), Image.BILINEAR,
                                                         box=(left, top, left + side, top + side)), np.int16)
    ours = model_input(photo, 224)
    assert ours.shape == (224, 224, 3) and ours.dtype == np.uint8 and ours.flags.c_contiguous
    diff = np.abs(ours.astype(np.int16) - reference)
    # Inside, fixed-point rounding only; at the crop's edge PIL also reads pixels beyond the box.
    assert diff.mean() < 0.05 and diff[2:-2, 2:-2].max() <= 1 and diff.max() <= 24
    if side <= 224:
        assert diff.max() == 0
    # Written into a given row (the batch's own memory), and the same pixels when the operator
    # that writes in place is missing (another torch): F.interpolate's result copied in.
    row = np.full((2, 224, 224, 3), 7, np.uint8)
    written = model_input(photo, 224, out=row[1])
    assert np.shares_memory(written, row[1]) and (row[0] == 7).all()
    np.testing.assert_array_equal(row[1], ours)


def test_the_resampling_fallback_gives_the_same_pixels(monkeypatch):
    import curation.stages.resize as resize

    photo = np.asarray(_photo(640, 480, seed=5)).copy()
    # The pinned torch has the in-place operator; without it this would compare the fallback
    # with itself.
    assert resize._RESAMPLE_INTO is not None
    fast = resize.model_input(photo, 224)
    monkeypatch.setattr(resize, "_RESAMPLE_INTO", None)
    np.testing.assert_array_equal(resize.model_input(photo, 224), fast)


@pytest.mark.parametrize("width, height", [(640, 480), (300, 1000), (257, 256), (256, 100)])
def test_the_grey_working_thumbnail_is_pil_grey_bilinear_within_rounding(width, height):
    """The statistics' thumbnail (resampled in colour by torch's kernel, then made grey) is PIL's
    grey bilinear thumbnail to within rounding; at 256 px or less it is PIL's grey image itself."""
    from curation.stages.decode import STATS_MAX_SIDE, grey_thumbnail

    rng = np.random.default_rng(width)
    small = Image.fromarray(rng.integers(0, 255, (height // 8 + 2, width // 8 + 2, 3), dtype=np.uint8))
    photo = small.resize((width, height), Image.BICUBIC)
    grey = photo.convert("L")
    scale = min(1.0, STATS_MAX_SIDE / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    reference = np.asarray(grey if scale == 1.0 else grey.resize(size, Image.BILINEAR), np.int16)
    ours = grey_thumbnail(np.asarray(photo))
    assert ours.mode == "L" and ours.size == size
    diff = np.abs(np.asarray(ours, np.int16) - reference)
    assert diff.mean() < 0.5 and diff.max() <= 3
    if scale == 1.0:
        assert diff.max() == 0


def _exif_tiff(orientation: int, order: str) -> bytes:
    """A TIFF header with IFD0 = (Make, Orientation), in ``order`` ("II" or "MM")."""
    endian = "little" if order == "II" else "big"
    entries = [(0x010F, 2, 4, b"cam\x00"), (0x0112, 3, 1, orientation.to_bytes(2, endian) + b"\x00\x00")]
    out = order.encode() + (42).to_bytes(2, endian) + (8).to_bytes(4, endian) + len(entries).to_bytes(2, endian)
    for tag, kind, count, value in entries:
        out += tag.to_bytes(2, endian) + kind.to_bytes(2, endian) + count.to_bytes(4, endian) + value
    return out + (0).to_bytes(4, endian)


def _with_app1(jpeg: bytes, payload: bytes) -> bytes:
    return jpeg[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


@pytest.mark.parametrize("order", ["II", "MM"])
@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_jpeg_exif_orientation_is_read_from_the_markers_as_pil_reads_it(orientation, order):
    from curation.stages.decode import exif_orientation

    upright = _photo(120, 80)
    rotate = {1: None, 3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
    stored = upright if rotate[orientation] is None else upright.transpose(rotate[orientation])
    data = _with_app1(_encode(stored, "JPEG", quality=95), b"Exif\x00\x00" + _exif_tiff(orientation, order))
    assert Image.open(io.BytesIO(data)).getexif().get(0x0112) == orientation  # the EXIF is well formed
    assert exif_orientation(data) == orientation
    decoded = _decode(data, image_size=32)
    assert (decoded.width, decoded.height) == (120, 80)  # rotated upright whichever path decoded it
    plain = _decode(_encode(upright, "JPEG", quality=95), image_size=32)
    assert np.abs(decoded.pixels.astype(int) - plain.pixels).mean() < 4


def test_jpeg_markers_without_exif_or_unreadable():
    from curation.stages.decode import exif_orientation

    plain = _encode(_photo(), "JPEG")
    assert exif_orientation(plain) == 1
    # An XMP segment (also APP1) before the EXIF one is passed over, as PIL does.
    xmp = _with_app1(plain, b"Exif\x00\x00" + _exif_tiff(6, "II"))
    xmp = _with_app1(xmp, b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta/>")
    assert exif_orientation(xmp) == 6 == Image.open(io.BytesIO(xmp)).getexif().get(0x0112)
    assert exif_orientation(_with_app1(plain, b"Exif\x00\x00XX\x00\x2a")) is None  # not a TIFF header
    assert exif_orientation(plain[:2] + b"\x00\x00garbage") is None  # not a marker where one belongs
    assert exif_orientation(plain[:2] + b"\xff\xe1\x00\x01") is None  # a length shorter than itself


@pytest.mark.parametrize("mode, options", [("RGB", {}), ("RGB", {"progressive": True}), ("RGB", {"subsampling": 0}),
                                           ("L", {})])
def test_plain_jpegs_decode_as_pil_decodes_them(monkeypatch, mode, options):
    """The header-and-simplejpeg path gives exactly what PIL's own path gives on the same JPEG
    (both decode at half scale here): baseline, progressive, 4:4:4 and greyscale; a CMYK JPEG,
    which the fast path leaves to PIL, decodes."""
    import curation.stages.decode as decode

    data = _encode(_photo(640, 480, seed=2).convert(mode), "JPEG", quality=90, **options)
    fast = _decode(data, image_size=224)
    monkeypatch.setattr(decode, "simplejpeg", None)
    slow = _decode(data, image_size=224)
    np.testing.assert_array_equal(fast.pixels, slow.pixels)
    np.testing.assert_array_equal(fast.copy_vector, slow.copy_vector)
    assert (fast.width, fast.height, fast.pixel_hash, fast.phash) == (slow.width, slow.height, slow.pixel_hash, slow.phash)
    assert (fast.brightness, fast.contrast, fast.sharpness) == (slow.brightness, slow.contrast, slow.sharpness)
    monkeypatch.undo()
    cmyk = _decode(_encode(_photo(300, 200).convert("CMYK"), "JPEG"), image_size=32)
    assert (cmyk.width, cmyk.height) == (300, 200) and cmyk.pixels.shape == (32, 32, 3)


def test_a_jpeg_over_the_pixel_cap_is_refused_from_its_header():
    data = _encode(Image.new("RGB", (3000, 3000), "gray"), "JPEG")
    with pytest.raises(RejectedInput, match="too many pixels: 3000x3000"):
        _decode(data, max_pixels=1_000_000)


def test_stage_rows_carry_their_own_images_features(tmp_path):
    """The stage computes thumbnail features in a second pass over the batch: every ok row still
    gets exactly what decoding that image alone gives, rejected rows in between shift nothing."""
    from PIL import ImageFilter

    files = {
        "dark.png": _encode(Image.eval(_photo(300, 200, seed=1), lambda v: v // 12), "PNG"),
        "photo.jpg": _encode(_photo(640, 480, seed=2), "JPEG", quality=90),
        "corrupt.jpg": b"\xff\xd8\xff" + b"\x00" * 50,
        "blurry.jpg": _encode(_photo(400, 300, seed=3).filter(ImageFilter.GaussianBlur(4)), "JPEG"),
        "small.png": _encode(_photo(32, 32, seed=4), "PNG"),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    names = ["dark.png", "photo.jpg", "gone.jpg", "corrupt.jpg", "blurry.jpg", "small.png"]
    stage = DecodeStage(resolver=Resolver(), image_size=64, max_pixels=10**8)
    out = stage({"uri": np.array([str(tmp_path / n) for n in names], object)})
    assert list(out["status"]) == ["ok", "ok", "rejected", "rejected", "ok", "ok"]
    for i, name in enumerate(names):
        if out["status"][i] != "ok":
            assert np.isnan(out["brightness"][i]) and not out["copy_vector"][i].any()
            continue
        alone = _decode(files[name], image_size=64)
        np.testing.assert_array_equal(out["pixels"][i], alone.pixels)
        assert out["pixel_hash"][i] == alone.pixel_hash and out["phash"][i] == alone.phash
        for key in ("brightness", "contrast", "sharpness", "shadows", "highlights"):
            assert out[key][i] == np.float32(getattr(alone, key)), (name, key)
        np.testing.assert_allclose(out["copy_vector"][i], alone.copy_vector, atol=1e-6)
    assert out["brightness"][0] < 0.05 < out["brightness"][1]  # the dark one is row 0's
    assert out["sharpness"][4] < out["sharpness"][1] / 5  # the blurry one is row 4's
