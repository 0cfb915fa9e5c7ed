"""Tests of protopool_hf.data: loaders on small generated trees in the official layouts, the names they record, the
committed Fashion-MNIST slice."""

import gzip
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
from photo_fixtures import jpeg, pixels, truncate

from protopool_hf import ProtoPoolConfig
from protopool_hf.data import (
    FASHION_MNIST_LABELS,
    from_hf_dataset,
    load_cub200,
    load_fashion_mnist,
    load_image_folder,
    load_stanford_cars,
)
from protopool_hf.images import UnreadableImageError
from protopool_hf.provenance import dataset_name
from protopool_hf.transforms import collate_fn, make_transforms


FASHION = Path(__file__).parent / "data" / "fashion-mnist"


@pytest.fixture(scope="module")
def config():
    return ProtoPoolConfig(
        backbone="test_resnet", num_labels=3, num_prototypes=6, num_slots_per_class=2, prototype_dim=8
    )


# --------------------------------------------------------------------------- image folder


def test_load_image_folder_classes_order_and_greyscale(tmp_path):
    jpeg(tmp_path / "zebra" / "b.jpg")
    jpeg(tmp_path / "zebra" / "a.jpg")
    jpeg(tmp_path / "ant" / "nested" / "g.jpg", mode="L", color=90)
    (tmp_path / "ant" / "notes.txt").write_text("ignored")
    ds = load_image_folder(tmp_path)
    assert ds.features["label"].names == ["ant", "zebra"]
    assert ds["label"][:] == [0, 1, 1]
    assert [Path(p["path"]).name for p in ds.with_format(None)["image"]] == ["g.jpg", "a.jpg", "b.jpg"]
    assert ds["index"][:] == [0, 1, 2]
    grey = ds[0]["image"]
    assert grey.mode == "RGB"
    assert np.abs(np.asarray(grey).astype(int) - 90).max() <= 2
    assert dataset_name(ds) == f"image_folder:{tmp_path.name}"


def test_load_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_image_folder(tmp_path / "does-not-exist")
    (tmp_path / "stray.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="no class folders"):
        load_image_folder(tmp_path)
    jpeg(tmp_path / "cat" / "1.jpg")
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
            jpeg(base / "images" / rel, size=(60, 50), color=color, mode=mode)
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
    assert (dataset_name(train), dataset_name(test)) == ("cub200/train", "cub200/test")
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
    broken = truncate(next((base / "images" / "002.Laysan_Albatross").glob("*_0001.jpg")))
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
            jpeg(folder / fname, size=(50, 40))
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
    assert dataset_name(test) == "stanford_cars/test"


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
                jpeg(tmp_path / split / cls / f"{k}.jpg")
    train, test = load_stanford_cars(tmp_path, "train"), load_stanford_cars(tmp_path, "test")
    assert train.features["label"].names == ["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]
    assert (len(train), len(test)) == (4, 2)
    assert dataset_name(train) == "stanford_cars/train"
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
    assert pixels(ds[0]["image"]).tolist()[0] == [255, 255, 255]
    assert dataset_name(ds) == "pets"
    ints = from_hf_dataset(datasets.Dataset.from_dict({"image": [str(jpeg(tmp_path / "a.jpg"))], "label": [4]}))
    assert ints.features["label"].num_classes == 5 and ints[0]["image"].size == (40, 30)
    with pytest.raises(ValueError, match=r"'image' not in the dataset; its columns are \['img'"):
        from_hf_dataset(raw)
    with pytest.raises(TypeError, match="Pick a split"):
        from_hf_dataset(datasets.DatasetDict({"train": raw}))
    with pytest.raises(ValueError, match="negative label -1"):
        from_hf_dataset(datasets.Dataset.from_dict({"image": ["x.jpg"], "label": [-1]}))


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
    assert (dataset_name(limited), dataset_name(test)) == ("fashion_mnist/train", "fashion_mnist/test")


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
