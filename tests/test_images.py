"""Tests of protopool_hf.images: colour conversion, EXIF orientation, decoding errors that name the file."""

import numpy as np
import PIL.Image
import pytest
from photo_fixtures import pixels, truncate

from protopool_hf.images import UnreadableImageError, decode_image, to_rgb


def test_to_rgb_converts_every_mode_to_correct_8bit_rgb():
    rgb = PIL.Image.new("RGB", (2, 1), (1, 2, 3))
    assert to_rgb(rgb) is rgb
    grey = PIL.Image.fromarray(np.array([[0, 77]], np.uint8), mode="L")
    assert pixels(to_rgb(grey)).tolist() == [[0, 0, 0], [77, 77, 77]]
    assert pixels(to_rgb(PIL.Image.new("1", (1, 1), 1))).tolist() == [[255, 255, 255]]

    palette = PIL.Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putdata([0, 1])
    assert pixels(to_rgb(palette)).tolist() == [[255, 0, 0], [0, 255, 0]]
    palette.info["transparency"] = 1  # index 1 (green) is transparent -> white
    assert pixels(to_rgb(palette)).tolist() == [[255, 0, 0], [255, 255, 255]]

    rgba = PIL.Image.fromarray(np.array([[[10, 20, 30, 255], [0, 0, 0, 0], [0, 0, 0, 128]]], np.uint8), mode="RGBA")
    assert pixels(to_rgb(rgba)).tolist() == [[10, 20, 30], [255, 255, 255], [127, 127, 127]]
    la = PIL.Image.fromarray(np.array([[[40, 255], [40, 0]]], np.uint8), mode="LA")
    assert pixels(to_rgb(la)).tolist() == [[40, 40, 40], [255, 255, 255]]

    cmyk = PIL.Image.fromarray(np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255]]], np.uint8), mode="CMYK")
    assert pixels(to_rgb(cmyk)).tolist() == [[255, 255, 255], [0, 255, 255], [0, 0, 0]]

    wide = np.array([[0, 257 * 128, 65535, 1000]], np.uint16)
    for image in (PIL.Image.fromarray(wide), PIL.Image.fromarray(wide).convert("I")):
        assert image.mode in ("I;16", "I")
        assert pixels(to_rgb(image))[:, 0].tolist() == [0, 128, 255, 4]  # plain convert("L") clips to 255
    with pytest.raises(TypeError, match="PIL"):
        to_rgb(np.zeros((2, 2, 3), np.uint8))


def test_decode_image_reads_16bit_png_and_applies_exif_orientation(tmp_path):
    png = tmp_path / "deep.png"
    PIL.Image.fromarray(np.full((3, 4), 65535, np.uint16)).save(png)
    assert PIL.Image.open(png).mode == "I;16"
    assert pixels(decode_image(str(png))).min() == 255
    rotated = tmp_path / "rotated.jpg"
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    PIL.Image.new("RGB", (40, 20)).save(rotated, exif=exif)
    assert decode_image({"path": str(rotated), "bytes": None}).size == (20, 40)
    assert decode_image(rotated.read_bytes()).size == (20, 40)


@pytest.mark.parametrize("kind", ["truncated", "text", "empty", "missing"])
def test_decode_image_errors_name_the_file(tmp_path, kind):
    path = tmp_path / f"{kind}.jpg"
    if kind == "truncated":
        PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(path)
        truncate(path)
    elif kind == "text":
        path.write_text("this is not an image\n")
    elif kind == "empty":
        path.write_bytes(b"")
    with pytest.raises(UnreadableImageError, match=str(path)):
        decode_image(str(path))
    with pytest.raises(UnreadableImageError, match="index 7"):
        decode_image({"path": None, "bytes": b"junk"}, name="index 7")
