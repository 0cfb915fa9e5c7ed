"""The pictures of prototypes: their files' layout, `PrototypeImages`, and redrawing them from the projection.

Shape alphabet: N batch, P prototypes, H, W feature-map size, H_in, W_in model input.

A projected prototype is redrawn from the provenance the projection saved in the model
(`model.head.projection_image_index / projection_row / projection_col`, `model.config.projection_dataset`,
`projection_input_size`) and the dataset it was projected on: its source image's model view (see
`protopool_hf.maps`), the prototype's similarity map on it as a heat map, the high-activation box and its crop.

A model folder keeps the pictures under `prototypes/` (`PROTOTYPES_DIR`): per prototype the files of
`prototype_filenames`, and the gallery at `GALLERY_FILE`; `protopool_hf.gallery.save_prototype_images` writes them,
the model card links them and `explain` reads them back.
"""

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from .drawing import draw_box, heatmap_overlay
from .layers import log_similarity
from .maps import _check_prototype_id, distance_maps, high_activation_box, similarity_maps, upsample_map
from .preprocessing import EvalTransform
from .provenance import check_dataset_name, dataset_name, read_provenance
from .sources import (
    dataset_image,
    dataset_label,
    dataset_rows,
)
from .usage import prototype_classes


__all__ = [
    "GALLERY_FILE",
    "PROTOTYPES_DIR",
    "PrototypeImages",
    "collect_prototype_pictures",
    "nearest_patches",
    "parse_prototype_filename",
    "prototype_filenames",
    "render_prototype",
    "render_prototypes",
]

#: The folder of a model folder (and Hub repository) that holds the prototype pictures.
PROTOTYPES_DIR = "prototypes"
#: The gallery's path inside a model folder.
GALLERY_FILE = f"{PROTOTYPES_DIR}/gallery.png"
#: Inside PROTOTYPES_DIR: each prototype's nearest training patches (`explorer.save_nearest_patches`).
NEAREST_DIR = "nearest"
#: Example images of a model folder that the explorer app offers (`make demo` writes one per class).
EXAMPLES_DIR = "examples"
_FILE_NAME = re.compile(r"prototype_(\d+)(?:_(overlay|source))?\.png")


# --------------------------------------------------------------------------- the files' layout


def prototype_filenames(prototype_id: int) -> dict[str, str]:
    """File names of a prototype's pictures inside `prototypes/`.

    `prototype_007.png` is the crop (the prototype's own picture), `prototype_007_overlay.png` the source image with
    the heat map and the box, `prototype_007_source.png` the source image in true colours with the box.

    Example:
        ```python
        >>> from protopool_hf.pictures import parse_prototype_filename, prototype_filenames
        >>> prototype_filenames(7)
        {'crop': 'prototype_007.png', 'overlay': 'prototype_007_overlay.png', 'source': 'prototype_007_source.png'}
        >>> parse_prototype_filename("prototypes/prototype_007_overlay.png"), parse_prototype_filename("gallery.png")
        ((7, 'overlay'), None)

        ```
    """
    stem = f"prototype_{int(prototype_id):03d}"
    return {"crop": f"{stem}.png", "overlay": f"{stem}_overlay.png", "source": f"{stem}_source.png"}


def parse_prototype_filename(path: str | os.PathLike) -> tuple[int, str] | None:
    """`(prototype id, kind)` of a picture file named by `prototype_filenames` (kind `crop`, `overlay` or `source`).

    Args:
        path: a file name or path; only its last part is read.

    Returns:
        The id and kind, or `None` for any other name (also `prototype_7.png`: not as `prototype_filenames` writes it).

    Example:
        ```python
        >>> from protopool_hf.pictures import parse_prototype_filename
        >>> parse_prototype_filename("prototypes/prototype_007_overlay.png"), parse_prototype_filename("gallery.png")
        ((7, 'overlay'), None)

        ```
    """
    name = Path(path).name
    match = _FILE_NAME.fullmatch(name)
    if match is None:
        return None
    prototype_id, kind = int(match[1]), match[2] or "crop"
    return (prototype_id, kind) if prototype_filenames(prototype_id)[kind] == name else None


def collect_prototype_pictures(
    prototype_ids: Sequence[int],
    prototype_images: Mapping[int, Any] | str | os.PathLike | None = None,
    model: Any | None = None,
) -> dict[int, list[PIL.Image.Image]]:
    """The pictures to show for each prototype: `[overlay (or source), crop]`, or the one picture given.

    Args:
        prototype_ids: the prototypes.
        prototype_images: a folder of PNGs written by `save_prototype_images` (the model folder or its
            `prototypes/`), or `{prototype id: PrototypeImages | PIL image | path}`; `None` reads the `prototypes/`
            of the local folder `model` was loaded from, when it has one.
        model: the model, for that default.

    Returns:
        `{prototype id: RGB pictures}`; a prototype without pictures is left out.

    Raises:
        FileNotFoundError: the folder, or a picture path of the mapping, does not exist.
    """
    if prototype_images is None:
        name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
        if not name or not (Path(name) / PROTOTYPES_DIR).is_dir():
            return {}
        prototype_images = Path(name) / PROTOTYPES_DIR
    if isinstance(prototype_images, str | os.PathLike):
        return _pictures_from_folder(Path(prototype_images), prototype_ids)
    out = {}
    for p in prototype_ids:
        value = prototype_images.get(p, prototype_images.get(str(p)))
        if value is None:
            continue
        if isinstance(value, PrototypeImages):
            out[p] = [value.overlay, value.crop]
        elif isinstance(value, PIL.Image.Image):
            out[p] = [value]
        else:
            if not Path(value).is_file():
                raise FileNotFoundError(f"Picture {value} of prototype {p} not found.")
            out[p] = [_open(Path(value))]
    return out


def _pictures_from_folder(folder: Path, ids: Sequence[int]) -> dict[int, list[PIL.Image.Image]]:
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Prototype picture folder {folder} not found: pass the folder save_prototype_images wrote "
            "(the model folder or its prototypes/), or dataset= to draw the prototypes."
        )
    if (folder / PROTOTYPES_DIR).is_dir():
        folder = folder / PROTOTYPES_DIR
    out = {}
    for p in ids:
        names = prototype_filenames(p)
        found = [folder / names[kind] for kind in ("overlay", "crop")]
        if not found[0].is_file():
            found[0] = folder / names["source"]
        pictures = [_open(path) for path in found if path.is_file()]
        if pictures:
            out[p] = pictures
    return out


def _open(path: Path) -> PIL.Image.Image:
    with PIL.Image.open(path) as image:
        return image.convert("RGB")


# --------------------------------------------------------------------------- the pictures of one prototype


@dataclass
class PrototypeImages:
    """The pictures of one prototype on one image (its projection source, or a nearby patch).

    Attributes:
        prototype_id: the prototype.
        image_index: the image's index in the dataset (as recorded by the projection).
        row: feature-map row of the patch.
        col: feature-map column of the patch.
        label: class of the image.
        distance: squared distance of the prototype to that patch, now.
        activation: `(H_in, W_in)` φ(d) map upsampled to the model view.
        box: `(top, bottom, left, right)` 95th-percentile box in model-view pixels (bottom, right exclusive).
        image: the model view of the image (true colours).
        overlay: the model view with the heat map and the box.
        crop: the box's region of `image`.
        classes: the classes whose slots use the prototype.

    Example:
        ```python
        >>> import datasets, PIL.Image, torch
        >>> from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification
        >>> from protopool_hf.maps import preprocess
        >>> from protopool_hf.pictures import render_prototype
        >>> config = ProtoPoolConfig(backbone="test_resnet", num_labels=2, num_prototypes=4, num_slots_per_class=1)
        >>> model = ProtoPoolForImageClassification(config).eval()
        >>> ds = datasets.Dataset.from_dict({"image": [PIL.Image.new("RGB", (200, 180), "teal")], "label": [0]})
        >>> z = model.latent_map(preprocess(ds[0]["image"], config))
        >>> with torch.no_grad():
        ...     model.head.prototypes[:] = z[0, :, 2, 3]
        >>> model.set_projection_provenance([0] * 4, [2] * 4, [3] * 4, [0.0] * 4, [0] * 4)
        >>> pictures = render_prototype(model, ds, 0)
        >>> pictures.image.size, pictures.activation.shape
        ((160, 160), (160, 160))

        ```
    """

    prototype_id: int
    image_index: int
    row: int
    col: int
    label: int
    distance: float
    activation: np.ndarray = field(repr=False)
    box: tuple[int, int, int, int]
    image: PIL.Image.Image = field(repr=False)
    overlay: PIL.Image.Image = field(repr=False)
    crop: PIL.Image.Image = field(repr=False)
    classes: list[int] = field(default_factory=list)

    def save(self, folder: str | os.PathLike) -> dict[str, Path]:
        """Write the crop, the overlay and the plain model view as PNGs into `folder`.

        Returns:
            `{"crop", "overlay", "source"}` paths (names from `prototype_filenames`).
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        names = prototype_filenames(self.prototype_id)
        paths = {kind: folder / name for kind, name in names.items()}
        self.crop.save(paths["crop"], format="PNG")
        self.overlay.save(paths["overlay"], format="PNG")
        draw_box(self.image, self.box).save(paths["source"], format="PNG")
        return paths


def _build_images(
    prototype_id: int,
    view: PIL.Image.Image,
    feature_map: torch.Tensor,
    *,
    image_index: int,
    row: int,
    col: int,
    label: int,
    distance: float,
    classes: list[int],
    percentile: float,
    colormap: str,
) -> PrototypeImages:
    activation = upsample_map(feature_map, (view.height, view.width))
    box = high_activation_box(activation, percentile)
    top, bottom, left, right = box
    return PrototypeImages(
        prototype_id=prototype_id,
        image_index=image_index,
        row=row,
        col=col,
        label=label,
        distance=distance,
        activation=activation,
        box=box,
        image=view,
        overlay=draw_box(heatmap_overlay(view, activation, colormap), box),
        crop=view.crop((left, top, right, bottom)),
        classes=classes,
    )


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}.")
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --------------------------------------------------------------------------- drawing from the provenance


def render_prototypes(
    model: torch.nn.Module,
    dataset: Any,
    prototype_ids: Sequence[int] | None = None,
    *,
    percentile: float = 95,
    colormap: str = "jet",
    batch_size: int = 16,
    image_column: str | None = None,
    verify: bool = True,
) -> dict[int, PrototypeImages]:
    """Redraw projected prototypes from the model's provenance and the dataset they were projected on.

    Images are drawn at `model.config.projection_input_size` (the size used by the projection) when recorded. Images
    shared by several prototypes go through the model once.

    Args:
        model: a projected `ProtoPoolForImageClassification`.
        dataset: the projection dataset (a `datasets.Dataset` with an image column, or any sequence of rows with an
            image, or of `(image, label)` pairs), in the projection's order; images are read without its transform.
        prototype_ids: which prototypes; `None` draws every projected one.
        percentile: the box threshold.
        colormap: see `colormap_lut`.
        batch_size: images per forward pass.
        image_column: the image column of mapping rows (default: `image`, `img` or `pixel_values`).
        verify: check that each prototype sits at (near-)zero distance from its recorded patch, which catches a wrong
            dataset or preprocessing and prototypes changed after the projection.

    Returns:
        `{prototype id: PrototypeImages}` in id order.

    Raises:
        ValueError: the model was never projected, a prototype was not projected, or the dataset does not match the
            recorded provenance.
    """
    source = read_provenance(model)
    ids = source.projected_ids if prototype_ids is None else [_check_prototype_id(model, p) for p in prototype_ids]
    source.check_projected(ids)
    check_dataset_name(source, dataset)
    image_of = {p: int(source.image_index[p]) for p in ids}
    rows = dataset_rows(dataset, sorted(set(image_of.values())), model)
    transform = EvalTransform(model.config, getattr(model.config, "projection_input_size", None))
    classes = prototype_classes(model)
    by_image: dict[int, list[int]] = {}
    for p in ids:
        by_image.setdefault(image_of[p], []).append(p)
    out: dict[int, PrototypeImages] = {}
    for chunk in _batches(sorted(by_image), batch_size):
        views = [transform.view(dataset_image(dataset, rows[i], image_column)) for i in chunk]
        distances = distance_maps(model, torch.stack([transform.normalise(v) for v in views]))
        maps = log_similarity(distances, model.config.similarity_epsilon)
        for n, image_index in enumerate(chunk):
            for p in by_image[image_index]:
                row, col = int(source.row[p]), int(source.col[p])
                _check_location(distances[n, p], (image_index, row, col), p, dataset, model, verify)
                out[p] = _build_images(
                    p,
                    views[n],
                    maps[n, p],
                    image_index=image_index,
                    row=row,
                    col=col,
                    label=int(source.label[p]),
                    distance=float(distances[n, p, row, col]),
                    classes=classes[p],
                    percentile=percentile,
                    colormap=colormap,
                )
    return {p: out[p] for p in sorted(out)}


def _check_location(
    distance_map: torch.Tensor,
    patch: tuple[int, int, int],
    prototype_id: int,
    dataset: Any,
    model: torch.nn.Module,
    verify: bool,
) -> None:
    image_index, row, col = patch
    height, width = distance_map.shape
    if not (0 <= row < height and 0 <= col < width):
        raise ValueError(
            f"Prototype {prototype_id} was projected at feature-map cell ({row}, {col}), outside this "
            f"{height}×{width} map: the projection used another input size or backbone stage than "
            f"model.config.projection_input_size={getattr(model.config, 'projection_input_size', None)}."
        )
    if not verify:
        return
    at_patch, mean = float(distance_map[row, col]), float(distance_map.mean())
    if at_patch > max(1e-3, 0.05 * mean):
        name = dataset_name(dataset) or type(dataset).__name__
        raise ValueError(
            f"Prototype {prototype_id} is at squared distance {at_patch:.4g} from the patch ({row}, {col}) of "
            f"image {image_index} of {name} (mean over that image {mean:.4g}); right after projection it is ~0. "
            f"Either this is not the dataset, split, order or preprocessing of the projection "
            f"({getattr(model.config, 'projection_dataset', None)!r}), or the prototypes changed after it: re-run "
            "project_prototypes, or pass verify=False to draw the recorded patch anyway."
        )


def render_prototype(
    model: torch.nn.Module,
    dataset: Any,
    prototype_id: int,
    *,
    percentile: float = 95,
    colormap: str = "jet",
    image_column: str | None = None,
    verify: bool = True,
) -> PrototypeImages:
    """Redraw one projected prototype: source image with heat map and box, the crop, the plain model view.

    Args:
        model: a projected `ProtoPoolForImageClassification`.
        dataset: the projection dataset (see `render_prototypes`).
        prototype_id: the prototype, in `[0, P)`.
        percentile: the box threshold.
        colormap: see `colormap_lut`.
        image_column: the image column of mapping rows.
        verify: see `render_prototypes`.

    Returns:
        The prototype's `PrototypeImages`.
    """
    pictures = render_prototypes(
        model,
        dataset,
        [prototype_id],
        percentile=percentile,
        colormap=colormap,
        image_column=image_column,
        verify=verify,
    )
    return pictures[int(prototype_id)]


def nearest_patches(
    model: torch.nn.Module,
    dataset: Any,
    prototype_id: int,
    k: int = 5,
    *,
    batch_size: int = 16,
    percentile: float = 95,
    colormap: str = "jet",
    image_column: str | None = None,
) -> list[PrototypeImages]:
    """The `k` training images whose nearest patch is closest to a prototype (one patch per image).

    Every image of `dataset` goes through the model once; only the best `k` are drawn. The first is the projection's
    own image when `dataset` is the projection dataset.

    Args:
        model: a `ProtoPoolForImageClassification` (it need not be projected).
        dataset: images to search (see `render_prototypes`).
        prototype_id: the prototype, in `[0, P)`.
        k: how many images.
        batch_size: images per forward pass.
        percentile: the box threshold.
        colormap: see `colormap_lut`.
        image_column: the image column of mapping rows.

    Returns:
        Up to `k` `PrototypeImages`, nearest first; `image_index` is the dataset row, `row`/`col` the patch.
    """
    prototype_id = _check_prototype_id(model, prototype_id)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    if len(dataset) == 0:
        raise ValueError("nearest_patches got an empty dataset.")
    transform = EvalTransform(model.config)
    best: list[tuple[float, int, int, int]] = []  # (distance, dataset row, row, col)
    for chunk in _batches(range(len(dataset)), batch_size):
        pixels = torch.stack([transform(dataset_image(dataset, i, image_column)) for i in chunk])
        distances = distance_maps(model, pixels)[:, prototype_id]  # (N, H, W)
        flat = distances.flatten(1)
        values, where = flat.min(dim=1)
        for n, i in enumerate(chunk):
            r, c = divmod(int(where[n]), distances.shape[-1])
            best.append((float(values[n]), i, r, c))
        best = sorted(best)[:k]
    classes = prototype_classes(model)[prototype_id]
    out = []
    for distance, i, r, c in best:
        view = transform.view(dataset_image(dataset, i, image_column))
        maps = similarity_maps(model, transform.normalise(view)[None])[0, prototype_id]
        out.append(
            _build_images(
                prototype_id,
                view,
                maps,
                image_index=i,
                row=r,
                col=c,
                label=dataset_label(dataset, i),
                distance=distance,
                classes=classes,
                percentile=percentile,
                colormap=colormap,
            )
        )
    return out
