"""Images of every kind, from files to logits: modes, tiny and huge sizes, unreadable files (issue 12).

Each goes through the loaders of `protopool_hf.data`, both transforms (`protopool_hf.transforms.make_transforms`) and the model; docs/reliability.md
names these tests for the image rows of its bad-input table.
"""

from __future__ import annotations

import re
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from protopool_tiny import fashion_config, fashion_model

from protopool_hf.data import from_hf_dataset, load_image_folder
from protopool_hf.images import UnreadableImageError, decode_image
from protopool_hf.transforms import collate_fn, make_transforms


# The eval preprocessing of the Fashion-MNIST tiny model (`protopool_tiny.FASHION`) as a timm data config.
SMALL = {
    "input_size": (3, 32, 32),
    "mean": (0.5,) * 3,
    "std": (0.5,) * 3,
    "interpolation": "bilinear",
    "crop_pct": 0.875,
}


def _save(path: Path, image: PIL.Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def _eval_colour(pixel_values: torch.Tensor) -> torch.Tensor:
    """Back from the SMALL / fashion_config normalisation (mean 0.5, std 0.5) to 0..255 per channel."""
    return (pixel_values.mean(dim=(-2, -1)) * 0.5 + 0.5) * 255


def test_every_image_mode_goes_through_the_loader_the_transform_and_the_model(tmp_path):
    palette = PIL.Image.new("P", (24, 20), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    files = {  # file: (image, save options, the RGB colour it must become)
        "bilevel.png": (PIL.Image.new("1", (24, 20), 1), {}, (255, 255, 255)),
        "cmyk.jpg": (PIL.Image.new("CMYK", (24, 20), (0, 255, 0, 0)), {"quality": 95}, (255, 0, 255)),
        "deep16.png": (PIL.Image.fromarray(np.full((20, 24), 32896, np.uint16)), {}, (128, 128, 128)),
        "greyscale.jpg": (PIL.Image.new("L", (24, 20), 90), {"quality": 95}, (90, 90, 90)),
        "grey_alpha.png": (PIL.Image.new("LA", (24, 20), (40, 255)), {}, (40, 40, 40)),
        "palette.png": (palette, {}, (255, 0, 0)),
        "palette_transparent.png": (palette, {"transparency": 0}, (255, 255, 255)),
        "rgba_transparent.png": (PIL.Image.new("RGBA", (24, 20), (0, 0, 0, 0)), {}, (255, 255, 255)),
    }
    for name, (image, options, _) in files.items():
        _save(tmp_path / "modes" / name, image, **options)
    ds = load_image_folder(tmp_path)
    assert [Path(v["path"]).name for v in ds.with_format(None)["image"]] == sorted(files)
    config = fashion_config()
    plain = ds.with_transform(make_transforms(config, train=False))[: len(files)]
    augmented = collate_fn(ds.with_transform(make_transforms(config, train=True)).__getitems__(range(len(files))))
    for batch in (plain, augmented):
        assert batch["pixel_values"].shape == (len(files), 3, 32, 32)
        assert torch.isfinite(batch["pixel_values"]).all()
    expected = torch.tensor([colour for _, _, colour in (files[name] for name in sorted(files))], dtype=torch.float32)
    torch.testing.assert_close(_eval_colour(plain["pixel_values"]), expected, atol=3, rtol=0)  # JPEG: +-3
    model = fashion_model().eval()
    with torch.no_grad():
        assert torch.isfinite(model(plain["pixel_values"]).logits).all()


@pytest.mark.parametrize("augmentation", ["timm", "official"])
def test_images_smaller_than_the_crop_are_scaled_up(augmentation):
    sizes = [(1, 1), (3, 2), (31, 7)]
    raw = datasets.Dataset.from_dict(
        {"image": [PIL.Image.new("RGB", size, (255, 0, 0)) for size in sizes], "label": [0, 1, 2]}
    )
    ds = from_hf_dataset(raw.cast_column("image", datasets.Image()))
    for train in (True, False):
        batch = ds.with_transform(make_transforms(SMALL, train=train, augmentation=augmentation))[:3]
        assert batch["pixel_values"].shape == (3, 3, 32, 32) and torch.isfinite(batch["pixel_values"]).all()
        if not train:
            torch.testing.assert_close(_eval_colour(batch["pixel_values"]), torch.tensor([[255.0, 0, 0]] * 3))


def test_a_large_photo_is_read_and_a_decompression_bomb_is_refused(tmp_path, monkeypatch):
    big = _save(tmp_path / "big.jpg", PIL.Image.new("RGB", (8000, 6000), (10, 200, 30)), quality=50)
    transform = make_transforms(SMALL, train=False)
    batch = transform({"image": [str(big)], "label": [0], "index": [0]})
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
    torch.testing.assert_close(_eval_colour(batch["pixel_values"]), torch.tensor([[10.0, 200, 30]]), atol=3, rtol=0)

    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 8000 * 6000 // 4)  # the photo is now > 2x PIL's limit
    pattern = rf"Cannot read image {re.escape(str(big))}: .*decompression bomb.*raise PIL\.Image\.MAX_IMAGE_PIXELS"
    with pytest.raises(UnreadableImageError, match=pattern + r".*skip_bad_images=True"):
        transform({"image": [str(big)], "label": [0], "index": [0]})
    small = _save(tmp_path / "small.png", PIL.Image.new("RGB", (30, 20)))
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 400)  # between 1x and 2x the limit: a warning, then read
    with pytest.warns(PIL.Image.DecompressionBombWarning):
        assert decode_image(str(small)).size == (30, 20)


def test_unreadable_files_name_the_file_and_the_way_out(tmp_path):
    _save(tmp_path / "cls" / "good.png", PIL.Image.new("RGB", (8, 8)))
    empty = tmp_path / "cls" / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "cls" / "notes.jpg"
    text.write_text("this is not an image\n")
    ds = load_image_folder(tmp_path)  # lazy: listing the files reads none of them
    for index, path in ((0, empty), (2, text)):
        with pytest.raises(UnreadableImageError, match=rf"{re.escape(str(path))}.*skip_bad_images=True"):
            ds.with_transform(make_transforms(SMALL, train=True))[index]
    skipping = ds.with_transform(make_transforms(SMALL, train=True, skip_bad_images=True))
    with pytest.warns(UserWarning, match="Skipping an unreadable image"):
        rows = skipping.__getitems__([0, 1, 2])
    assert [int(row["index"]) for row in rows] == [1]
