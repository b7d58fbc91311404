"""Box crops cut in the decode pass (curation/stages/crops.py): the right pixels in every EXIF
orientation, a box-aware decode scale, and the decode stage's crop columns."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from curation.io.filesystem import Resolver
from curation.stages.crops import CropJob, stored_size, upright_boxes
from curation.stages.decode import DecodeStage, decode_into

BOX = (40.0, 20.0, 30.0, 24.0)  # x, y, w, h in the stored frame
RED = (220, 30, 30)


def stored_image(orientation: int, size=(160, 120), fmt="JPEG") -> bytes:
    """A grey picture with one red box at BOX in the file's own pixels, EXIF ``orientation``."""
    image = Image.new("RGB", size, (90, 90, 90))
    x, y, w, h = (int(v) for v in BOX)
    image.paste(RED, (x, y, x + w, y + h))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def job(boxes, size=32, margin=0.0, units="pixels"):
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return CropJob(boxes, units=units, image_size=size, margin=margin, tolerance_px=2.0, min_size_px=4.0,
                   out=np.zeros((len(boxes), size, size, 3), np.uint8))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_box_in_the_stored_frame_is_cut_from_the_upright_decode(orientation):
    crops = job([BOX])
    width, height, _, _ = decode_into(stored_image(orientation), image_size=32, max_pixels=10**8,
                                      background=(255, 255, 255), pixels_out=np.zeros((32, 32, 3), np.uint8),
                                      crops=crops)
    assert crops.cut_mask.tolist() == [True] and crops.orientation == orientation
    assert stored_size(width, height, orientation) == (160, 120)
    crop = crops.out[0].astype(int)
    centre = crop[6:26, 6:26].reshape(-1, 3).mean(axis=0)
    assert centre[0] > 180 and centre[1] < 80  # red: the box, whichever way the file is turned


def test_upright_boxes_turn_with_the_picture():
    box = np.array([[10.0, 20.0, 30.0, 5.0]])
    assert upright_boxes(box, 100, 50, 1).tolist() == box.tolist()
    assert upright_boxes(box, 100, 50, 6).tolist() == [[25.0, 10.0, 5.0, 30.0]]  # clockwise: x' = H - y - h
    assert upright_boxes(box, 100, 50, 8).tolist() == [[20.0, 60.0, 5.0, 30.0]]  # counter-clockwise: y' = W - x - w
    assert upright_boxes(box, 100, 50, 3).tolist() == [[60.0, 25.0, 30.0, 5.0]]


def test_small_boxes_raise_the_decode_scale_and_big_ones_do_not():
    assert job([[0, 0, 8, 8]], size=32).decode_scale(1920, 1080) == 1.0  # a small box: full size
    assert job([[0, 0, 512, 512]], size=32).decode_scale(1920, 1080) == pytest.approx(32 / 512)
    assert job([[0, 0, 0, 5]]).decode_scale(1920, 1080) == 0.0  # nothing cuttable: the image's own scale
    # fractions scale by the stored size
    assert job([[0.1, 0.1, 0.5, 0.5]], units="fraction").decode_scale(200, 100) == pytest.approx(32 / 100)


def test_a_small_box_in_a_large_jpeg_keeps_its_detail():
    """A 24-px checkerboard box in a 2048-px photo: decoded at full size for the box, the crop
    still shows the pattern (at the whole image's 1/8 DCT scale it would be a grey smudge)."""
    image = np.full((1536, 2048, 3), 128, np.uint8)
    tile = (np.indices((24, 24)).sum(axis=0) // 3 % 2 * 255).astype(np.uint8)
    image[700:724, 1000:1024] = tile[:, :, None]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=95)
    crops = job([[1000, 700, 24, 24]], size=32)
    decode_into(buffer.getvalue(), image_size=32, max_pixels=10**8, background=(255, 255, 255),
                pixels_out=np.zeros((32, 32, 3), np.uint8), crops=crops)
    assert crops.out[0].astype(float).std() > 60


def test_the_decode_stage_cuts_usable_boxes_and_names_their_rows(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(stored_image(1))
    boxes = np.array([BOX, [150, 100, 40, 40], [10, 10, 0, 5]], np.float64)  # ok, far outside, degenerate
    stage = DecodeStage(resolver=Resolver(), image_size=32, max_pixels=10**8,
                        objects={"units": "pixels", "margin": 0.1, "tolerance_px": 2.0, "min_size_px": 4.0})
    out = stage({"uri": np.array([str(path), str(path)], object), "input_id": np.array([0, 1]),
                 "boxes": np.array([boxes.tobytes(), b""], object),
                 "box_rows": np.array([np.array([7, 8, 9], np.int64).tobytes(), b""], object),
                 "box_cut": np.array([np.ones(3, np.uint8).tobytes(), b""], object),
                 "box_keys": np.array([np.array([70, 80, 90], np.int64).tobytes(), b""], object)})
    assert np.frombuffer(out["crop_rows"][0], np.int64).tolist() == [7]
    assert np.frombuffer(out["crop_keys"][0], np.int64).tolist() == [70]
    assert len(out["crops"][0]) == 32 * 32 * 3 and out["crops"][1] == b""
    assert "boxes" not in out and out["status"].tolist() == ["ok", "ok"]
