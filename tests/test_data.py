"""Tests of protopool_hf.data: loaders on small generated trees in the official layouts, colour conversion,
decoding errors, the seeded pixel transforms and the committed Fashion-MNIST slice."""

import gzip
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from protopool_hf import ProtoPoolConfig
from protopool_hf.data import (
    FASHION_MNIST_LABELS,
    UnreadableImageError,
    collate_fn,
    dataset_name,
    decode_image,
    from_hf_dataset,
    load_cub200,
    load_fashion_mnist,
    load_image_folder,
    load_stanford_cars,
    make_transforms,
    to_rgb,
)


FASHION = Path(__file__).parent / "data" / "fashion-mnist"
SMALL = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "interpolation": "bilinear"}


@pytest.fixture(scope="module")
def config():
    return ProtoPoolConfig(
        backbone="test_resnet", num_labels=3, num_prototypes=6, num_slots_per_class=2, prototype_dim=8
    )


def _jpeg(path: Path, size=(40, 30), color=(200, 30, 30), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.new(mode, size, color).save(path, format="JPEG", quality=95)
    return path


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _pixels(image: PIL.Image.Image) -> np.ndarray:
    return np.asarray(image).reshape(-1, 3)


# --------------------------------------------------------------------------- to_rgb / decode_image


def test_to_rgb_converts_every_mode_to_correct_8bit_rgb():
    rgb = PIL.Image.new("RGB", (2, 1), (1, 2, 3))
    assert to_rgb(rgb) is rgb
    grey = PIL.Image.fromarray(np.array([[0, 77]], np.uint8), mode="L")
    assert _pixels(to_rgb(grey)).tolist() == [[0, 0, 0], [77, 77, 77]]
    assert _pixels(to_rgb(PIL.Image.new("1", (1, 1), 1))).tolist() == [[255, 255, 255]]

    palette = PIL.Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putdata([0, 1])
    assert _pixels(to_rgb(palette)).tolist() == [[255, 0, 0], [0, 255, 0]]
    palette.info["transparency"] = 1  # index 1 (green) is transparent -> white
    assert _pixels(to_rgb(palette)).tolist() == [[255, 0, 0], [255, 255, 255]]

    rgba = PIL.Image.fromarray(np.array([[[10, 20, 30, 255], [0, 0, 0, 0], [0, 0, 0, 128]]], np.uint8), mode="RGBA")
    assert _pixels(to_rgb(rgba)).tolist() == [[10, 20, 30], [255, 255, 255], [127, 127, 127]]
    la = PIL.Image.fromarray(np.array([[[40, 255], [40, 0]]], np.uint8), mode="LA")
    assert _pixels(to_rgb(la)).tolist() == [[40, 40, 40], [255, 255, 255]]

    cmyk = PIL.Image.fromarray(np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255]]], np.uint8), mode="CMYK")
    assert _pixels(to_rgb(cmyk)).tolist() == [[255, 255, 255], [0, 255, 255], [0, 0, 0]]

    wide = np.array([[0, 257 * 128, 65535, 1000]], np.uint16)
    for image in (PIL.Image.fromarray(wide), PIL.Image.fromarray(wide).convert("I")):
        assert image.mode in ("I;16", "I")
        assert _pixels(to_rgb(image))[:, 0].tolist() == [0, 128, 255, 4]  # plain convert("L") clips to 255
    with pytest.raises(TypeError, match="PIL"):
        to_rgb(np.zeros((2, 2, 3), np.uint8))


def test_decode_image_reads_16bit_png_and_applies_exif_orientation(tmp_path):
    png = tmp_path / "deep.png"
    PIL.Image.fromarray(np.full((3, 4), 65535, np.uint16)).save(png)
    assert PIL.Image.open(png).mode == "I;16"
    assert _pixels(decode_image(str(png))).min() == 255
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
        _truncate(path)
    elif kind == "text":
        path.write_text("this is not an image\n")
    elif kind == "empty":
        path.write_bytes(b"")
    with pytest.raises(UnreadableImageError, match=str(path)):
        decode_image(str(path))
    with pytest.raises(UnreadableImageError, match="index 7"):
        decode_image({"path": None, "bytes": b"junk"}, name="index 7")


# --------------------------------------------------------------------------- image folder


def test_load_image_folder_classes_order_and_greyscale(tmp_path):
    _jpeg(tmp_path / "zebra" / "b.jpg")
    _jpeg(tmp_path / "zebra" / "a.jpg")
    _jpeg(tmp_path / "ant" / "nested" / "g.jpg", mode="L", color=90)
    (tmp_path / "ant" / "notes.txt").write_text("ignored")
    ds = load_image_folder(tmp_path)
    assert ds.features["label"].names == ["ant", "zebra"]
    assert ds["label"][:] == [0, 1, 1]
    assert [Path(p["path"]).name for p in ds.with_format(None)["image"]] == ["g.jpg", "a.jpg", "b.jpg"]
    assert ds["index"][:] == [0, 1, 2]
    grey = ds[0]["image"]
    assert grey.mode == "RGB"
    assert np.abs(np.asarray(grey).astype(int) - 90).max() <= 2
    assert dataset_name(ds).startswith(f"image_folder:{tmp_path.name}@")


def test_load_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_image_folder(tmp_path / "does-not-exist")
    (tmp_path / "stray.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="no class folders"):
        load_image_folder(tmp_path)
    _jpeg(tmp_path / "cat" / "1.jpg")
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"dog holds no images"):
        load_image_folder(tmp_path)


# --------------------------------------------------------------------------- CUB-200-2011

CUB_FILES = ["images.txt", "classes.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt"]


def _make_cub(root: Path) -> Path:
    """Three classes, two images each (the first of each class in train), in the official archive layout."""
    base = root / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    lines = {name: [] for name in CUB_FILES}
    lines["classes.txt"] = [f"{k + 1} {c}" for k, c in enumerate(classes)]
    image_id = 0
    for k, cls in enumerate(classes):
        for j in range(2):
            image_id += 1
            rel = f"{cls}/{cls.split('.')[1]}_{j:04d}.jpg"
            mode, color = ("L", 100) if (k, j) == (1, 0) else ("RGB", (20 * k, 100, 200))
            _jpeg(base / "images" / rel, size=(60, 50), color=color, mode=mode)
            lines["images.txt"].append(f"{image_id} {rel}")
            lines["image_class_labels.txt"].append(f"{image_id} {k + 1}")
            lines["train_test_split.txt"].append(f"{image_id} {1 if j == 0 else 0}")
            lines["bounding_boxes.txt"].append(f"{image_id} {5.0 + k} 10.0 {20.0 + j} 30.0")
    for name, rows in lines.items():
        (base / name).write_text("\n".join(rows) + "\n")
    return base


def test_load_cub200_official_layout(tmp_path):
    base = _make_cub(tmp_path)
    train = load_cub200(tmp_path, "train")  # the parent of CUB_200_2011 works too
    test = load_cub200(base, split="test", crop_to_bbox=False)
    assert train.features["label"].names == ["Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross"]
    assert (len(train), len(test)) == (3, 3)
    assert train["label"][:] == [0, 1, 2] and test["label"][:] == [0, 1, 2]
    assert train.with_format(None)[0]["bbox"] == [5.0, 10.0, 20.0, 30.0]
    assert train[0]["image"].size == (20, 30)  # cropped on decode
    assert train[1]["image"].mode == "RGB"  # the greyscale JPEG
    assert "bbox" not in test.column_names and test[0]["image"].size == (60, 50)
    assert dataset_name(train).startswith("cub200/train@")
    assert dataset_name(train) == dataset_name(load_cub200(tmp_path, "train"))
    assert dataset_name(train) != dataset_name(train.select([0, 1]))
    with pytest.raises(ValueError, match="split"):
        load_cub200(base, "val")


@pytest.mark.parametrize("missing", CUB_FILES)
def test_load_cub200_missing_annotation_file_is_named(tmp_path, missing):
    base = _make_cub(tmp_path)
    (base / missing).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{missing}.*Expected layout: the official CUB_200_2011"):
        load_cub200(base)


def test_load_cub200_missing_image_and_truncated_jpeg(tmp_path, config):
    base = _make_cub(tmp_path)
    broken = _truncate(next((base / "images" / "002.Laysan_Albatross").glob("*_0001.jpg")))
    test = load_cub200(base, "test")
    with pytest.raises(UnreadableImageError, match=str(broken)):
        test[1]["image"]
    transform = make_transforms(config, train=False)
    with pytest.raises(UnreadableImageError, match=str(broken)):
        test.with_transform(transform)[:3]
    skipping = make_transforms(config, train=False, skip_bad_images=True)
    with pytest.warns(UserWarning, match=str(broken)) as caught:
        rows = test.with_transform(skipping).__getitems__([0, 1, 2])
    assert len(caught) == 1
    assert [int(r["index"]) for r in rows] == [0, 2]
    assert collate_fn(rows)["pixel_values"].shape == (2, 3, 160, 160)
    with pytest.raises(UnreadableImageError, match="Every image"):
        test.with_transform(skipping)[1]
    next((base / "images" / "001.Black_footed_Albatross").glob("*_0000.jpg")).unlink()
    with pytest.raises(FileNotFoundError, match="1 of the 3 CUB-200-2011 train images are missing"):
        load_cub200(base, "train")


# --------------------------------------------------------------------------- Stanford Cars


def _annotations(rows):
    dtype = [(n, "O") for n in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")]
    return np.array([tuple(r) for r in rows], dtype=dtype)


def _make_cars_devkit(root: Path, test_annos_in_devkit: bool = False, kaggle: bool = False) -> Path:
    from scipy.io import savemat

    (root / "devkit").mkdir(parents=True)
    names = np.array(["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Ram C/V Cargo Van Minivan 2012"], "O")
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": names.reshape(1, -1)})
    for split, classes in (("train", [3, 1, 2, 1]), ("test", [2, 3])):
        folder = root / f"cars_{split}" / (f"cars_{split}" if kaggle else "")
        rows = []
        for k, cls in enumerate(classes):
            fname = f"{k + 1:05d}.jpg"
            _jpeg(folder / fname, size=(50, 40))
            rows.append((2, 3, 32, 23, cls, fname))
        if split == "train":
            savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": _annotations(rows)})
        else:
            where = root / "devkit" if test_annos_in_devkit else root
            savemat(where / "cars_test_annos_withlabels.mat", {"annotations": _annotations(rows)})
    return root


@pytest.mark.parametrize("variant", ["plain", "test_annos_in_devkit", "kaggle", "torchvision"])
def test_load_stanford_cars_devkit_layout(tmp_path, variant):
    root = tmp_path / "stanford_cars" if variant == "torchvision" else tmp_path
    _make_cars_devkit(root, test_annos_in_devkit=variant == "test_annos_in_devkit", kaggle=variant == "kaggle")
    train = load_stanford_cars(tmp_path, "train")
    test = load_stanford_cars(tmp_path, "test", crop_to_bbox=True)
    assert train.features["label"].names[2] == "Ram C/V Cargo Van Minivan 2012"
    assert train["label"][:] == [2, 0, 1, 0] and test["label"][:] == [1, 2]
    assert train[0]["image"].size == (50, 40)
    assert test.with_format(None)[0]["bbox"] == [2.0, 3.0, 30.0, 20.0]
    assert test[0]["image"].size == (30, 20)
    assert dataset_name(test).startswith("stanford_cars/test@")


def test_load_stanford_cars_devkit_errors(tmp_path):
    from scipy.io import savemat

    _make_cars_devkit(tmp_path)
    (tmp_path / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(FileNotFoundError, match=r"cars_test_annos_withlabels\.mat"):
        load_stanford_cars(tmp_path, "test")
    unlabelled = np.array(
        [(1, 1, 9, 9, "00001.jpg")], dtype=[(n, "O") for n in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "fname")]
    )
    savemat(tmp_path / "cars_test_annos_withlabels.mat", {"annotations": unlabelled})
    with pytest.raises(ValueError, match="needs 'fname' and 'class'"):
        load_stanford_cars(tmp_path, "test")
    (tmp_path / "devkit" / "cars_meta.mat").unlink()
    with pytest.raises(FileNotFoundError, match=r"devkit/cars_meta.mat"):
        load_stanford_cars(tmp_path, "train")


def test_load_stanford_cars_class_folder_layout(tmp_path):
    for split, count in (("train", 2), ("test", 1)):
        for cls in ("Acura RL Sedan 2012", "AM General Hummer SUV 2000"):
            for k in range(count):
                _jpeg(tmp_path / split / cls / f"{k}.jpg")
    train, test = load_stanford_cars(tmp_path, "train"), load_stanford_cars(tmp_path, "test")
    assert train.features["label"].names == ["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]
    assert (len(train), len(test)) == (4, 2)
    assert dataset_name(train).startswith("stanford_cars/train@")
    with pytest.raises(ValueError, match="no boxes"):
        load_stanford_cars(tmp_path, "train", crop_to_bbox=True)
    with pytest.raises(FileNotFoundError, match=r"devkit layout .* or class folders"):
        load_stanford_cars(tmp_path / "elsewhere")


# --------------------------------------------------------------------------- any datasets dataset


def test_from_hf_dataset_normalises_columns(tmp_path):
    images = [PIL.Image.new("RGBA", (8, 6), (0, 0, 0, 0)), PIL.Image.new("L", (5, 5), 30)]
    raw = datasets.Dataset.from_dict({"img": images, "fine": ["dog", "cat"], "other": [1, 2]})
    raw = raw.cast_column("img", datasets.Image())
    ds = from_hf_dataset(raw, image_column="img", label_column="fine", name="pets")
    assert ds.column_names == ["image", "label", "index"]
    assert ds.features["label"].names == ["cat", "dog"] and ds["label"][:] == [1, 0]
    assert _pixels(ds[0]["image"]).tolist()[0] == [255, 255, 255]
    assert dataset_name(ds).startswith("pets@")
    ints = from_hf_dataset(datasets.Dataset.from_dict({"image": [str(_jpeg(tmp_path / "a.jpg"))], "label": [4]}))
    assert ints.features["label"].num_classes == 5 and ints[0]["image"].size == (40, 30)
    with pytest.raises(ValueError, match=r"'image' not in the dataset; its columns are \['img'"):
        from_hf_dataset(raw)
    with pytest.raises(TypeError, match="Pick a split"):
        from_hf_dataset(datasets.DatasetDict({"train": raw}))
    with pytest.raises(ValueError, match="negative label -1"):
        from_hf_dataset(datasets.Dataset.from_dict({"image": ["x.jpg"], "label": [-1]}))


# --------------------------------------------------------------------------- pixel transforms


@pytest.fixture(scope="module")
def photos():
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 255, (48, 64, 3), np.uint8)) for _ in range(4)]
    raw = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2, 1]})
    return from_hf_dataset(raw.cast_column("image", datasets.Image()))


@pytest.mark.parametrize("augmentation", ["timm", "official"])
@pytest.mark.parametrize("train", [True, False])
def test_make_transforms_shapes_from_the_config(config, photos, augmentation, train):
    ds = photos.with_transform(make_transforms(config, train=train, augmentation=augmentation))
    batch = ds[:4]
    assert batch["pixel_values"].shape == (4, 3, 160, 160) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].tolist() == [0, 1, 2, 1] and batch["index"].tolist() == [0, 1, 2, 3]
    collated = collate_fn([ds[0], ds[3]])
    assert collated["pixel_values"].shape == (2, 3, 160, 160) and collated["labels"].tolist() == [0, 1]
    assert torch.equal(collated["pixel_values"][1], batch["pixel_values"][3])
    assert "index" not in collated and collate_fn([ds[3]], keep_index=True)["index"].tolist() == [3]


@pytest.mark.parametrize("augmentation", ["timm", "official"])
def test_eval_transform_normalises_with_the_config_mean_and_std(augmentation):
    flat = datasets.Dataset.from_dict({"image": [PIL.Image.new("RGB", (50, 20), (255, 128, 0))], "label": [0]})
    out = from_hf_dataset(flat.cast_column("image", datasets.Image())).with_transform(
        make_transforms(SMALL, train=False, augmentation=augmentation)
    )[:1]["pixel_values"][0]
    expected = (torch.tensor([255, 128, 0]) / 255 - 0.5) / 0.25
    assert out.shape == (3, 32, 32)
    torch.testing.assert_close(out.mean(dim=(1, 2)), expected, atol=1e-5, rtol=0)


def test_squash_eval_resizes_without_crop():
    from torchvision import transforms

    image = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 50, 3), np.uint8))
    raw = datasets.Dataset.from_dict({"image": [image], "label": [0]}).cast_column("image", datasets.Image())
    squash = {**SMALL, "crop_mode": "squash", "crop_pct": 1.0}  # what the cub200/cars196 presets use
    out = from_hf_dataset(raw).with_transform(make_transforms(squash, train=False))[0]
    reference = transforms.Compose(
        [transforms.Resize((32, 32)), transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.25] * 3)]
    )
    torch.testing.assert_close(out["pixel_values"], reference(decode_image(raw.with_format(None)[0]["image"])))


def test_timm_training_options_of_a_data_config_reach_the_augmentation(photos):
    fixed = {**SMALL, "scale": (1.0, 1.0), "ratio": (1.0, 1.0), "hflip": 0.0, "color_jitter": None}
    crop = make_transforms(fixed, train=True).pipeline.transforms[0]
    assert (crop.scale, crop.ratio) == ((1.0, 1.0), (1.0, 1.0))
    out = photos.with_transform(make_transforms(fixed, train=True))[:2]["pixel_values"]
    assert out.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("augmentation", ["timm", "official"])
def test_training_augmentation_is_seeded_by_seed_epoch_and_index(photos, augmentation):
    transform = make_transforms(SMALL, train=True, augmentation=augmentation, seed=3)
    assert transform.sample_seed(5) == 14539181121660479380  # pinned: a resumed run must derive the same seeds
    ds = photos.with_transform(transform)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    first = ds[:4]["pixel_values"]
    assert torch.equal(torch.rand(3), before)  # the caller's RNG stream is untouched
    assert torch.equal(ds[:4]["pixel_values"], first)
    assert torch.equal(ds.select([2])[0]["pixel_values"], first[2])  # independent of the batch composition
    assert not torch.equal(first[0], first[1])
    transform.set_epoch(1)
    assert transform.epoch == 1
    second = ds[:4]["pixel_values"]
    assert all(not torch.equal(a, b) for a, b in zip(first, second, strict=True))
    transform.set_epoch(0)
    assert torch.equal(ds[:4]["pixel_values"], first)
    other_seed = photos.with_transform(make_transforms(SMALL, train=True, augmentation=augmentation, seed=4))[:4]
    assert not torch.equal(other_seed["pixel_values"], first)


def test_epoch_reaches_persistent_dataloader_workers(photos):
    transform = make_transforms(SMALL, train=True, seed=0)
    ds = photos.with_transform(transform)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=4, num_workers=1, persistent_workers=True, collate_fn=collate_fn
    )
    epochs = []
    for epoch in range(2):
        transform.set_epoch(epoch)
        epochs.append(next(iter(loader))["pixel_values"])
    for epoch in range(2):
        transform.set_epoch(epoch)
        assert torch.equal(epochs[epoch], ds[:4]["pixel_values"])


def test_transform_errors(config, photos):
    plain = datasets.Dataset.from_dict({"image": [PIL.Image.new("RGB", (9, 9))], "label": [0]})
    plain = plain.cast_column("image", datasets.Image())
    with pytest.raises(ValueError, match="'index' column"):
        plain.with_transform(make_transforms(SMALL, train=True))[0]
    assert plain.with_transform(make_transforms(SMALL, train=True, seed=None))[0]["pixel_values"].shape == (3, 32, 32)
    with pytest.raises(ValueError, match=r"Label 5 of the sample at index 0 is outside 0..3"):
        from_hf_dataset(
            plain.cast_column("label", datasets.Value("int64")).map(lambda _: {"label": 5})
        ).with_transform(make_transforms(config, train=False))[0]
    with pytest.raises(ValueError, match="augmentation"):
        make_transforms(config, train=True, augmentation="augmentor")
    with pytest.raises(ValueError, match=r"input_size must be \(3, H, W\)"):
        make_transforms({**SMALL, "input_size": (1, 32, 32)}, train=False)
    with pytest.raises(ValueError, match="empty batch"):
        collate_fn([])


# --------------------------------------------------------------------------- Fashion-MNIST


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = np.frombuffer(data[4 : 4 + 4 * ndim], ">u4").astype(int)
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def test_load_fashion_mnist_slice():
    train, test = load_fashion_mnist(FASHION), load_fashion_mnist(FASHION, split="test")
    assert (len(train), len(test)) == (2000, 500)
    assert train.features["label"].names == FASHION_MNIST_LABELS == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]  # fmt: skip
    labels = _idx(FASHION / "train-labels-idx1-ubyte.gz")
    assert train["label"][:20] == labels[:20].tolist()
    assert test["label"][:] == _idx(FASHION / "t10k-labels-idx1-ubyte.gz").tolist()
    image = train[7]["image"]
    assert image.size == (28, 28) and image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image)[..., 0], _idx(FASHION / "train-images-idx3-ubyte.gz")[7])
    limited = load_fashion_mnist(FASHION, limit=10)
    assert len(limited) == 10 and limited["label"][:] == labels[:10].tolist()
    assert dataset_name(limited).startswith("fashion_mnist/train@")
    assert dataset_name(limited) != dataset_name(train)


def test_load_fashion_mnist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte.*apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / name).write_bytes((FASHION / name).read_bytes())
    truncated = tmp_path / "t10k-images-idx3-ubyte.gz"
    with gzip.open(FASHION / truncated.name, "rb") as f:
        raw = f.read()
    with gzip.open(truncated, "wb") as f:
        f.write(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=rf"{truncated} is truncated"):
        load_fashion_mnist(tmp_path, split="test")
    assert len(load_fashion_mnist(tmp_path, split="test", limit=5)) == 5  # the first images are intact
    with pytest.raises(ValueError, match="limit"):
        load_fashion_mnist(tmp_path, limit=0)


def test_fashion_mnist_through_the_transform():
    config = ProtoPoolConfig(
        backbone="test_resnet", num_labels=10, num_prototypes=20, num_slots_per_class=2, input_size=[3, 32, 32]
    )
    ds = load_fashion_mnist(FASHION, limit=8).with_transform(make_transforms(config, train=True))
    batch = collate_fn(ds.__getitems__(list(range(8))))
    assert batch["pixel_values"].shape == (8, 3, 32, 32)
    assert batch["labels"].tolist() == _idx(FASHION / "train-labels-idx1-ubyte.gz")[:8].tolist()
    assert torch.isfinite(batch["pixel_values"]).all()
    # greyscale in, three equal channels out
    assert torch.equal(batch["pixel_values"][:, 0], batch["pixel_values"][:, 1])
