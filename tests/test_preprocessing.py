"""protopool_hf.preprocessing: one eval preprocessing for AutoImageProcessor, the library's transforms and pictures."""

import subprocess
import sys
import sysconfig
import textwrap

import datasets
import numpy as np
import PIL.Image
import protopool_tiny
import pytest
import torch
from transformers import AutoImageProcessor, BitImageProcessor

from protopool_hf import ProtoPoolForImageClassification, push_to_hub
from protopool_hf.data import from_hf_dataset
from protopool_hf.maps import preprocess
from protopool_hf.preprocessing import EvalTransform, eval_data_config, image_processor_dict
from protopool_hf.transforms import make_transforms


# (H_0, W_0): odd and even margins, portrait and landscape, one-pixel-thin, square.
IMAGE_SIZES = [(63, 64), (64, 63), (101, 37), (37, 101), (200, 120), (120, 200), (1, 50), (50, 1), (64, 64), (77, 77)]
PREPROCESSING = {
    "center": {"input_size": [3, 32, 32], "crop_pct": 0.875, "crop_mode": "center"},
    "center-wide": {"input_size": [3, 24, 40], "crop_pct": 0.9, "crop_mode": "center", "interpolation": "bicubic"},
    "squash": {"input_size": [3, 32, 32], "crop_pct": 1.0, "crop_mode": "squash"},
    "squash-crop": {"input_size": [3, 30, 36], "crop_pct": 0.95, "crop_mode": "squash", "interpolation": "nearest"},
}


def saved_model(folder, **preprocessing) -> ProtoPoolForImageClassification:
    model = protopool_tiny.tiny_model(0, feature_stage=1, **preprocessing).eval()
    model.save_pretrained(folder)
    return model


def photo(height: int, width: int, mode: str = "RGB", seed: int = 0) -> PIL.Image.Image:
    """Smooth colour gradients plus noise, so a one-pixel shift or a different resize changes the pixels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([255 * y / max(height - 1, 1), 255 * x / max(width - 1, 1), 128 + 0 * x], axis=-1)
    pixels = np.clip(base + rng.integers(-40, 40, (height, width, 3)), 0, 255).astype(np.uint8)
    image = PIL.Image.fromarray(pixels)
    if mode == "L":
        return image.convert("L")
    if mode == "RGBA":
        alpha = PIL.Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
        image.putalpha(alpha)
    return image


def library_pixels(model, images) -> torch.Tensor:
    """What training, projection and evaluation apply: the dataset transform of `make_transforms(train=False)`."""
    ds = datasets.Dataset.from_dict({"image": images, "label": [0] * len(images)}).cast_column(
        "image", datasets.Image()
    )
    return from_hf_dataset(ds).with_transform(make_transforms(model.config, train=False))[:]["pixel_values"]


@pytest.mark.parametrize("name", sorted(PREPROCESSING))
def test_auto_image_processor_is_bit_exact_with_the_library_eval_transform(tmp_path, name):
    model = saved_model(tmp_path, **PREPROCESSING[name])
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(processor) is BitImageProcessor  # transformers' default: the torchvision backend
    images = [photo(h, w, mode, seed=i) for i, (h, w) in enumerate(IMAGE_SIZES) for mode in ("RGB", "L", "RGBA")]
    ours = library_pixels(model, images)
    _, height, width = PREPROCESSING[name]["input_size"]
    assert ours.shape == (len(images), 3, height, width)
    for image, expected in zip(images, ours, strict=True):
        stock = processor(image, return_tensors="pt")["pixel_values"][0]
        assert torch.equal(stock, expected), (name, image.size, image.mode)
    # A batch of mixed sizes, as `pipeline` and `dataset.map` pass it, gives the same pixels.
    assert torch.equal(processor(images, return_tensors="pt")["pixel_values"], ours)
    # The pictures' model view is the same resize and crop: normalising it gives the model's pixels.
    transform = EvalTransform(model.config)
    for image, expected in zip(images[::3], ours[::3], strict=True):
        assert torch.equal(transform.normalise(transform.view(image)), expected)
        assert torch.equal(preprocess(image, model.config)[0], expected)


def test_the_stock_processor_needs_neither_remote_code_nor_the_package(tmp_path):
    model = saved_model(tmp_path / "model", **PREPROCESSING["center"])
    images = [photo(h, w, seed=i) for i, (h, w) in enumerate(IMAGE_SIZES)]
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
    script = textwrap.dedent(
        f"""
        import importlib.util, sys
        sys.path.append({sysconfig.get_paths()["purelib"]!r})  # the venv's packages, without its .pth files
        assert importlib.util.find_spec("protopool_hf") is None, "protopool_hf must not be importable here"
        import torch
        from PIL import Image
        from transformers import AutoImageProcessor
        processor = AutoImageProcessor.from_pretrained("model")
        images = [Image.open(f"{{i}}.png") for i in range({len(images)})]
        torch.save(processor(images, return_tensors="pt")["pixel_values"], "pixels.pt")
        print(type(processor).__name__)
        """
    )
    # -I: no PYTHONPATH, user site or current folder; -S: no site-packages .pth files (the editable install's finder)
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "BitImageProcessor"
    assert torch.equal(torch.load(tmp_path / "pixels.pt"), library_pixels(model, images))


@pytest.mark.parametrize("name", sorted(PREPROCESSING))
@pytest.mark.parametrize("size", [(200, 120), (120, 200), (101, 37), (63, 64)])
def test_a_marked_spot_lands_where_the_geometry_says(name, size):
    transform = EvalTransform(PREPROCESSING[name] | {"mean": (0.5,) * 3, "std": (0.5,) * 3})
    height, width = size
    geometry = transform.geometry(size)
    _, crop_height, crop_width = transform.data_config["input_size"]
    # A bright spot on black, about two model-input pixels wide, where the geometry puts it inside the crop.
    (sy, sx), target = geometry.scale, (0.4 * crop_height, 0.6 * crop_width)
    y, x = (round(v) for v in geometry.to_original(*target))
    hy, hx = max(1, round(sy)), max(1, round(sx))
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[y - hy : y + hy + 1, x - hx : x + hx + 1] = 255
    view = np.asarray(transform.view(PIL.Image.fromarray(pixels)), dtype=np.float64).mean(axis=-1)
    assert view.sum() > 0
    rows, cols = np.mgrid[0 : view.shape[0], 0 : view.shape[1]]
    seen = ((rows + 0.5) * view).sum() / view.sum(), ((cols + 0.5) * view).sum() / view.sum()
    expected = geometry.to_input(y + 0.5, x + 0.5)  # the spot's centre, in continuous coordinates
    np.testing.assert_allclose(seen, expected, atol=0.6)
    # The whole model input maps back inside the original image; squash keeps every row and column.
    top, left, bottom, right = geometry.box_to_original((0, 0, crop_height, crop_width))
    assert 0 <= top < bottom <= height + 1e-9 and 0 <= left < right <= width + 1e-9
    if PREPROCESSING[name]["crop_pct"] == 1.0:
        assert (top, left, bottom, right) == (0, 0, height, width)


def test_geometry_of_a_centre_crop_with_an_odd_margin():
    transform = EvalTransform({"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0})
    geometry = transform.geometry((64, 63))  # 63 wide -> 32, 64 high -> int(32 * 64 / 63) = 32: no margin
    assert geometry.resized_size == (32, 32) and geometry.crop_box == (0, 0, 32, 32)
    geometry = transform.geometry((67, 32))  # 67 high -> 67: the 35-pixel margin is split 17 / 18
    assert geometry.resized_size == (67, 32) and geometry.crop_box == (17, 0, 32, 32)
    assert geometry.to_original(0, 0) == (17.0, 0.0) and geometry.to_input(17, 5) == (0.0, 5.0)


def test_saved_processor_config_names_a_stock_class(tmp_path):
    saved_model(tmp_path, **PREPROCESSING["center-wide"])
    processor = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    assert type(processor).__name__ == "BitImageProcessorPil"  # the PIL backend is the user's explicit choice
    config = image_processor_dict(PREPROCESSING["center-wide"] | {"mean": (0.5,) * 3, "std": (0.5,) * 3})
    assert config["size"] == {"shortest_edge": 44} and config["crop_size"] == {"height": 24, "width": 40}
    assert config["resample"] == PIL.Image.Resampling.BICUBIC


def test_bad_preprocessing_is_refused_with_the_field_named():
    base = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    with pytest.raises(ValueError, match=r"lacks \['std'\]"):
        eval_data_config({"input_size": (3, 32, 32), "mean": (0.5,) * 3})
    with pytest.raises(ValueError, match=r"interpolation 'box' is not supported .* choose one of"):
        eval_data_config(base | {"interpolation": "box"})
    with pytest.raises(ValueError, match=r"crop_pct must be in \(0, 1\]"):
        eval_data_config(base | {"crop_pct": 0})
    with pytest.raises(ValueError, match="crop_mode must be one of"):
        eval_data_config(base | {"crop_mode": "border"})
    with pytest.raises(ValueError, match=r"input_size must be \(3, H, W\)"):
        eval_data_config(base | {"input_size": (3, 32)})
    with pytest.raises(ValueError, match="`interpolation` must be one of"):
        protopool_tiny.tiny_config(interpolation="hamming")
    with pytest.raises(ValueError, match="A model view must be"):
        EvalTransform(base).normalise(PIL.Image.new("RGB", (31, 32)))


def test_projection_through_auto_image_processor_on_non_square_photos_then_push(hub_server, tmp_path):
    """The HF user's flow: preprocess with the repo's AutoImageProcessor, project, then push with the pictures."""
    model = saved_model(tmp_path, input_size=[3, 64, 64], crop_pct=0.875, crop_mode="center")
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    # The shorter side is already 73 = floor(64 / 0.875) px, so the crop decides: a margin of 4k + 3 pixels is where
    # flooring its half (transformers) and rounding it half to even (timm, the library's old transform) part ways.
    sizes = [(73, 119), (119, 73), (73, 115), (111, 73), (73, 127), (123, 73)]
    rng = np.random.default_rng(0)
    photos = [PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=3)})
    ds = datasets.Dataset.from_dict({"image": photos, "label": [0, 1, 2, 0, 1, 2]}, features=features)

    def transform(batch):
        pixels = processor([image.convert("RGB") for image in batch["image"]], return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels, "labels": torch.tensor(batch["label"])}

    from protopool_hf.projection import project_prototypes

    project_prototypes(model, ds.with_transform(transform), batch_size=3)
    push_to_hub(model, "org/non-square", dataset=ds)
    files = set(hub_server.repos["org/non-square"].commits[-1].added)
    assert {"preprocessor_config.json", "prototypes/gallery.png"} <= files
    assert sum(name.startswith("prototypes/prototype_") for name in files) >= 6
