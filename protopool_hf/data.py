"""Datasets for ProtoPool: CUB-200-2011, Stanford Cars, image folders, Fashion-MNIST, any `datasets` dataset.

Every loader returns a `datasets.Dataset` with the same columns:

- `image`: `datasets.Image(decode=False)`, the file path (or the encoded bytes) of each image. Nothing is decoded
  at load time, so loading CUB's 11,788 images takes a fraction of a second.
- `label`: a `datasets.ClassLabel` with the class names.
- `index`: the row's position in the loaded dataset (int64). It survives `select`, `shuffle` and
  `train_test_split`, so it identifies a sample for seeded augmentation and for projection provenance.
- `bbox` (CUB by default, Cars on request): `[x, y, width, height]` in pixels; images are cropped to it on decode.

The loaders name the dataset and its split (`info.dataset_name`, `split`), which is how the projection records it
(`protopool_hf.provenance.dataset_name`: `"cub200/train"`) and how the pictures recognise it.

The loaders install a light format transform, so `ds[i]["image"]` is already a decoded RGB `PIL.Image`, cropped to
its box. Decoding happens in `protopool_hf.images` rather than in `datasets`, so an unreadable file raises
`UnreadableImageError` naming the file. For training, replace that view with
`ds.with_transform(make_transforms(config, train=True))` (`protopool_hf.transforms`, also importable from here),
which decodes, crops and converts in the same way and then applies the pixel transform. A transform of your own
receives the undecoded values: pass them through `protopool_hf.images.decode_image`.
"""

import gzip
import os
import re
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .images import decode_row
from .transforms import make_transforms


__all__ = [
    "FASHION_MNIST_LABELS",
    "from_hf_dataset",
    "load_cub200",
    "load_fashion_mnist",
    "load_image_folder",
    "load_stanford_cars",
    "make_transforms",
]

FASHION_MNIST_LABELS = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
_SPLITS = ("train", "test")


class _DecodedView:
    """Format transform our loaders install: the `image` column reads as RGB PIL images, cropped to `bbox`."""

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        if "image" not in batch:
            return batch
        n = len(batch["image"])
        bboxes, indices = batch.get("bbox", [None] * n), batch.get("index", [None] * n)
        images = [decode_row(v, b, i) for v, b, i in zip(batch["image"], bboxes, indices, strict=True)]
        return {**batch, "image": images}


# --------------------------------------------------------------------------- building datasets


def _build_dataset(
    labels: Sequence[int],
    names: Sequence[str],
    dataset: str,
    split: str | None,
    paths: Sequence[str] | None = None,
    blobs: Sequence[bytes] | None = None,
    bboxes: Sequence[Sequence[float]] | None = None,
    limit: int | None = None,
) -> datasets.Dataset:
    if limit is not None:  # the first `limit` images
        labels, paths, blobs, bboxes = (None if v is None else v[:limit] for v in (labels, paths, blobs, bboxes))
    n = len(labels)
    image = pa.StructArray.from_arrays(
        [
            pa.array(blobs if blobs is not None else [None] * n, pa.binary()),
            pa.array(paths or [None] * n, pa.string()),
        ],
        names=["bytes", "path"],
    )
    columns = {"image": image, "label": pa.array(labels, pa.int64()), "index": pa.array(np.arange(n), pa.int64())}
    features = {"image": datasets.Image(decode=False), "label": datasets.ClassLabel(names=list(names))}
    features["index"] = datasets.Value("int64")
    if bboxes is not None:
        columns["bbox"] = pa.array(bboxes, pa.list_(pa.float32(), 4))
        features["bbox"] = datasets.Sequence(datasets.Value("float32"), length=4)  # datasets.List in >= 4
    info = datasets.DatasetInfo(features=datasets.Features(features), dataset_name=dataset)
    ds = datasets.Dataset(pa.table(columns), info=info, split=split)
    return ds.with_transform(_DecodedView())


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(
            f"limit must be a positive number of images or None, got {limit!r}: pass N >= 1 to use the first N "
            "images, or None for all."
        )


def _check_split(split: str, allowed: Sequence[str] = _SPLITS) -> None:
    if split not in allowed:
        raise ValueError(f"split must be one of {list(allowed)}, got {split!r}.")


def _require(path: Path, layout: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"Annotation file {path} not found. Expected layout: {layout}")
    return path


def _check_exist(paths: Sequence[str], what: str) -> None:
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(paths)} {what} images are missing, e.g. {missing[:3]}.")


# --------------------------------------------------------------------------- image folders


def _scan_image_folder(root: Path) -> tuple[list[str], list[int], list[str]]:
    if not root.is_dir():
        raise FileNotFoundError(f"Image folder {root} does not exist. Expected {root}/<class name>/<image files>.")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} holds no class folders. Expected {root}/<class name>/<image files>.")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(
            p
            for p in (root / name).rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith(".")
        )
        if not files:
            raise ValueError(
                f"Class folder {root / name} holds no images (extensions {sorted(IMAGE_EXTENSIONS)}). "
                "Add its images or remove the folder."
            )
        paths += [str(p) for p in files]
        labels += [label] * len(files)
    return paths, labels, classes


def load_image_folder(root: str | os.PathLike, name: str | None = None, limit: int | None = None) -> datasets.Dataset:
    """Load `root/<class name>/<images>` (class folders sorted by name, as torchvision's `ImageFolder`).

    Args:
        root: the folder of class folders. Images in nested subfolders of a class folder count for that class.
        name: the dataset's name for provenance; defaults to `"image_folder:<folder name>"`.
        limit: keep only the first `limit` images (the class names stay all the folder's).

    Returns:
        A dataset with `image`, `label` and `index` columns, in class-then-path order.

    Raises:
        FileNotFoundError: `root` does not exist.
        ValueError: `root` holds no class folders, or a class folder holds no images (the message names it).
    """
    _check_limit(limit)
    root = Path(root).expanduser()
    paths, labels, classes = _scan_image_folder(root)
    dataset = name or f"image_folder:{root.resolve().name}"
    return _build_dataset(labels, classes, dataset, None, paths=paths, limit=limit)


# --------------------------------------------------------------------------- CUB-200-2011

_CUB_LAYOUT = (
    "the official CUB_200_2011 archive: images.txt, image_class_labels.txt, train_test_split.txt, "
    "bounding_boxes.txt, classes.txt and images/<class>/<file>.jpg in one folder (pass it or its parent)."
)


def _read_table(path: Path, columns: int) -> dict[str, list[str]]:
    rows = [line.split(maxsplit=columns - 1) for line in path.read_text().splitlines() if line.strip()]
    bad = [row for row in rows if len(row) != columns]
    if bad:
        raise ValueError(f"{path}: expected {columns} fields per line, got {bad[0]!r}.")
    return {row[0]: row[1:] for row in rows}


def load_cub200(
    root: str | os.PathLike, split: str = "train", crop_to_bbox: bool = True, limit: int | None = None
) -> datasets.Dataset:
    """Load CUB-200-2011 from the official archive layout.

    Args:
        root: the `CUB_200_2011` folder or its parent.
        split: `"train"` (5,994 images) or `"test"` (5,794), from `train_test_split.txt`.
        crop_to_bbox: add the `bbox` column from `bounding_boxes.txt`, so images are cropped to the bird on decode
            (lazily), as in the paper.
        limit: keep only the first `limit` images.

    Returns:
        A dataset in `images.txt` order; class names without their number (`"Black_footed_Albatross"`).

    Raises:
        FileNotFoundError: an annotation file or image is missing (the message names it).
    """
    _check_split(split)
    _check_limit(limit)
    root = Path(root).expanduser()
    base = root / "CUB_200_2011" if (root / "CUB_200_2011").is_dir() else root
    images = _read_table(_require(base / "images.txt", _CUB_LAYOUT), 2)
    classes = _read_table(_require(base / "classes.txt", _CUB_LAYOUT), 2)
    class_of = _read_table(_require(base / "image_class_labels.txt", _CUB_LAYOUT), 2)
    is_train = _read_table(_require(base / "train_test_split.txt", _CUB_LAYOUT), 2)
    boxes = _read_table(_require(base / "bounding_boxes.txt", _CUB_LAYOUT), 5) if crop_to_bbox else {}
    tables = {"image_class_labels.txt": class_of, "train_test_split.txt": is_train, "bounding_boxes.txt": boxes}
    for file, table in tables.items():
        missing = next((i for i in images if i not in table), None)
        if missing is not None and (table or file != "bounding_boxes.txt" or crop_to_bbox):
            raise ValueError(f"{base / file} has no line for image id {missing}.")
    class_ids = sorted(classes, key=int)
    label_of = {cid: k for k, cid in enumerate(class_ids)}
    unknown = next((c for (c,) in class_of.values() if c not in label_of), None)
    if unknown is not None:
        raise ValueError(f"{base / 'image_class_labels.txt'} names class id {unknown}, which classes.txt lacks.")
    names = [re.sub(r"^\d+\.", "", classes[cid][0]) for cid in class_ids]
    keep = [i for i in images if (is_train[i][0] == "1") == (split == "train")]
    paths = [str(base / "images" / images[i][0]) for i in keep]
    _check_exist(paths, f"CUB-200-2011 {split}")
    labels = [label_of[class_of[i][0]] for i in keep]
    bboxes = [[float(v) for v in boxes[i]] for i in keep] if crop_to_bbox else None
    return _build_dataset(labels, names, "cub200", split, paths=paths, bboxes=bboxes, limit=limit)


# --------------------------------------------------------------------------- Stanford Cars

_CARS_LAYOUT = (
    "either the devkit layout (cars_train/, cars_test/, devkit/cars_meta.mat, devkit/cars_train_annos.mat and "
    "cars_test_annos_withlabels.mat in the root or in devkit/) or class folders (train/<class>/*.jpg, "
    "test/<class>/*.jpg)."
)


def _loadmat(path: Path) -> dict[str, Any]:
    try:
        from scipy.io import loadmat
    except ImportError as exc:
        raise ImportError(f"Reading {path} (Stanford Cars devkit) needs scipy: `pip install scipy`.") from exc
    try:
        return loadmat(path, squeeze_me=True)
    except Exception as exc:
        raise ValueError(f"Cannot read the MATLAB file {path}: {exc}") from exc


def load_stanford_cars(
    root: str | os.PathLike, split: str = "train", crop_to_bbox: bool = False, limit: int | None = None
) -> datasets.Dataset:
    """Load Stanford Cars (196 classes) from the devkit layout or from class folders, detected automatically.

    Args:
        root: the dataset folder (or its parent holding `stanford_cars/`, torchvision's layout).
        split: `"train"` (8,144 images) or `"test"` (8,041).
        crop_to_bbox: add the devkit's boxes as a `bbox` column, so images are cropped on decode. Off by default:
            whether the paper cropped Cars is unknown. Not available in the class-folder layout.
        limit: keep only the first `limit` images.

    Returns:
        A dataset in annotation order (devkit, class names from `cars_meta.mat`) or class-folder order.

    Raises:
        FileNotFoundError: no known layout, or a missing annotation file or image (the message names it).
    """
    _check_split(split)
    _check_limit(limit)
    root = Path(root).expanduser()
    for base in (root, root / "stanford_cars"):
        if any((base / d).is_dir() for d in ("devkit", "cars_train", "cars_test")):
            return _load_cars_devkit(base, split, crop_to_bbox, limit)
        if (base / split).is_dir():
            if crop_to_bbox:
                raise ValueError(f"{base / split} is in the class-folder layout, which has no boxes to crop to.")
            paths, labels, classes = _scan_image_folder(base / split)
            return _build_dataset(labels, classes, "stanford_cars", split, paths=paths, limit=limit)
    raise FileNotFoundError(f"No Stanford Cars data found in {root}. Expected {_CARS_LAYOUT}")


def _load_cars_devkit(base: Path, split: str, crop_to_bbox: bool, limit: int | None) -> datasets.Dataset:
    names = [
        str(n)
        for n in np.atleast_1d(_loadmat(_require(base / "devkit" / "cars_meta.mat", _CARS_LAYOUT))["class_names"])
    ]
    if split == "train":
        annos_path = _require(base / "devkit" / "cars_train_annos.mat", _CARS_LAYOUT)
    else:
        candidates = [base / "cars_test_annos_withlabels.mat", base / "devkit" / "cars_test_annos_withlabels.mat"]
        annos_path = next((p for p in candidates if p.is_file()), None) or _require(candidates[0], _CARS_LAYOUT)
    annos = np.atleast_1d(_loadmat(annos_path)["annotations"])
    fields = set(annos.dtype.names or ())
    if not {"fname", "class"} <= fields:
        raise ValueError(
            f"{annos_path} has fields {sorted(fields)}; it needs 'fname' and 'class' (for the test split use "
            "cars_test_annos_withlabels.mat, not cars_test_annos.mat)."
        )
    image_dir = base / f"cars_{split}"
    image_dir = image_dir / f"cars_{split}" if (image_dir / f"cars_{split}").is_dir() else image_dir  # Kaggle copy
    paths = [str(image_dir / str(a["fname"])) for a in annos]
    _check_exist(paths, f"Stanford Cars {split}")
    labels = [int(a["class"]) - 1 for a in annos]
    bad = [c for c in labels if not 0 <= c < len(names)]
    if bad:
        raise ValueError(f"{annos_path}: class {bad[0] + 1} is outside 1..{len(names)} (cars_meta.mat's classes).")
    bboxes = None
    if crop_to_bbox:
        corners = [[float(a[f"bbox_{k}"]) for k in ("x1", "y1", "x2", "y2")] for a in annos]
        bboxes = [[x1, y1, x2 - x1, y2 - y1] for x1, y1, x2, y2 in corners]
    return _build_dataset(labels, names, "stanford_cars", split, paths=paths, bboxes=bboxes, limit=limit)


# --------------------------------------------------------------------------- Fashion-MNIST


def _read_idx(path: Path, limit: int | None) -> np.ndarray:
    """Read a (gzipped) idx file of uint8 values; only the first `limit` entries when given."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            header = f.read(4)
            if len(header) != 4 or header[:3] != b"\x00\x00\x08":
                raise ValueError(f"not an idx file of uint8 values (magic {header.hex()})")
            dims = list(struct.unpack(f">{header[3]}I", f.read(4 * header[3])))
            dims[0] = dims[0] if limit is None else min(limit, dims[0])
            count = int(np.prod(dims))
            data = f.read(count)
    except (OSError, EOFError, ValueError, struct.error) as exc:
        raise ValueError(f"Cannot read the idx file {path}: {exc}") from exc
    if len(data) != count:
        raise ValueError(f"The idx file {path} is truncated: its header announces {dims}, it holds {len(data)} bytes.")
    return np.frombuffer(data, np.uint8).reshape(dims)


def load_fashion_mnist(
    root: str | os.PathLike | None = None, split: str = "train", limit: int | None = None
) -> datasets.Dataset:
    """Load Fashion-MNIST (28×28 greyscale, 10 classes) from its idx files.

    Images are stored as PGM bytes (an uncompressed format PIL reads), built straight from the idx array: the
    60,000 training images load in about a second.

    Args:
        root: the folder holding `train-images-idx3-ubyte.gz`, `train-labels-idx1-ubyte.gz`, `t10k-...`
            (uncompressed files work too). Defaults to Debian's `dataset-fashion-mnist` location.
        split: `"train"` (60,000) or `"test"` (the t10k files, 10,000).
        limit: keep only the first `limit` images.

    Returns:
        A dataset with `image`, `label` (`FASHION_MNIST_LABELS`) and `index` columns.

    Raises:
        FileNotFoundError: the files are not there (the message says how to get them).
    """
    _check_split(split)
    _check_limit(limit)
    folder = Path(root if root is not None else FASHION_MNIST_ROOT).expanduser()
    prefix = "train" if split == "train" else "t10k"
    arrays = []
    for kind in ("images-idx3", "labels-idx1"):
        name = f"{prefix}-{kind}-ubyte"
        path = next((p for p in (folder / f"{name}.gz", folder / name) if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(
                f"Fashion-MNIST file {folder / name}.gz not found. Install Debian's package "
                f"(`apt-get install dataset-fashion-mnist`, files in {FASHION_MNIST_ROOT}) or pass root= a folder "
                "holding the idx files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-...)."
            )
        arrays.append(_read_idx(path, limit))
    images, labels = arrays
    if images.ndim != 3 or len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST files in {folder} disagree: images {images.shape}, labels {labels.shape}.")
    header = f"P5\n{images.shape[2]} {images.shape[1]}\n255\n".encode()
    blobs = [header + image.tobytes() for image in images]
    return _build_dataset(labels.astype(np.int64), FASHION_MNIST_LABELS, "fashion_mnist", split, blobs=blobs)


# --------------------------------------------------------------------------- any datasets dataset


def from_hf_dataset(
    ds: datasets.Dataset, image_column: str = "image", label_column: str = "label", name: str | None = None
) -> datasets.Dataset:
    """Normalise any `datasets.Dataset` with an image and a label column to this module's columns.

    Args:
        ds: the dataset; its image column holds `datasets.Image` values or file paths, its label column a
            `ClassLabel`, integers (names become `"0"`, `"1"`, ...) or strings (classes sorted by name).
        image_column: the name of the image column.
        label_column: the name of the label column.
        name: the dataset's name for provenance; defaults to `ds.info.dataset_name` or `"dataset"`.

    Returns:
        A dataset with only `image`, `label` and `index` columns and the decoding view installed.

    Raises:
        ValueError: a column is missing, has an unusable type, or holds negative labels.
    """
    if not isinstance(ds, datasets.Dataset):
        hint = " Pick a split first, e.g. ds['train']." if isinstance(ds, datasets.DatasetDict) else ""
        raise TypeError(f"from_hf_dataset expects a datasets.Dataset, got {type(ds).__name__}.{hint}")
    for column in (image_column, label_column):
        if column not in ds.column_names:
            raise ValueError(f"Column {column!r} not in the dataset; its columns are {ds.column_names}.")
    ds = ds.with_format(None).select_columns([image_column, label_column])
    ds = ds.rename_columns({c: n for c, n in ((image_column, "image"), (label_column, "label")) if c != n})
    image_feature = ds.features["image"]
    if not (isinstance(image_feature, datasets.Image) or getattr(image_feature, "dtype", None) == "string"):
        raise ValueError(
            f"Column {image_column!r} must hold datasets.Image values or file paths, got {image_feature}."
        )
    ds = ds.cast_column("image", datasets.Image(decode=False))
    label_feature = ds.features["label"]
    if getattr(label_feature, "dtype", None) == "string":
        ds = ds.class_encode_column("label")
    elif not isinstance(label_feature, datasets.ClassLabel):
        if not pa.types.is_integer(ds.data.column("label").type):
            raise ValueError(f"Column {label_column!r} must hold class labels, ints or strings, got {label_feature}.")
        top = pc.max(ds.data.column("label")).as_py()
        ds = ds.cast_column("label", datasets.ClassLabel(num_classes=(top or 0) + 1))
    low = pc.min(ds.data.column("label")).as_py()
    if low is not None and low < 0:
        raise ValueError(f"Column {label_column!r} holds the negative label {low} (-1 usually marks unlabelled rows).")
    ds = ds.add_column("index", np.arange(len(ds), dtype=np.int64))
    ds.info.dataset_name = name or ds.info.dataset_name or "dataset"
    return ds.with_transform(_DecodedView())
