"""Pictures of ProtoPool prototypes: heat maps, high-activation boxes, crops, a gallery and per-class views.

Shape alphabet: N batch, C classes, P prototypes, S slots per class, H, W feature-map size, H_in, W_in model input.

Every picture is drawn on the *model view* of an image: the image the model saw, i.e. the eval transform's resize and
centre crop (`preprocessing.EvalTransform`, the stock image processor saved with the model), without the
normalisation, so colours are the photo's own (the official code min-max rescales normalised tensors instead, which
shifts them). The activation of a prototype is φ(d) = log((d + 1) / (d + ε)) of its squared distance to every latent
patch, upsampled bicubically to the model view; its high-activation box is the bounding box of the pixels at or above
the map's 95th percentile (the official rule).

A projected prototype is redrawn from the provenance the projection saved in the model
(`model.head.projection_image_index / projection_row / projection_col`, `model.config.projection_dataset`,
`projection_input_size`) and the dataset it was projected on. The core needs only PIL and numpy (the JET colour map
is built in); matplotlib (the `viz` extra) is imported only to use one of its colour maps by name.
"""

import math
import os
import unicodedata
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch
import torch.nn.functional as F

from .images import decode_image, to_rgb
from .layers import log_similarity
from .preprocessing import EvalTransform, eval_data_config
from .provenance import check_dataset_name, dataset_name, read_provenance
from .torch_utils import evaluating


__all__ = [
    "GALLERY_FILENAME",
    "PROTOTYPES_DIR",
    "PrototypeImages",
    "class_view",
    "colormap_lut",
    "draw_box",
    "heatmap_overlay",
    "high_activation_box",
    "model_view",
    "nearest_patches",
    "preprocess",
    "prototype_activation",
    "prototype_classes",
    "prototype_filenames",
    "prototype_gallery",
    "render_prototype",
    "render_prototypes",
    "save_prototype_images",
    "similarity_maps",
    "upsample_map",
    "used_prototypes",
]

PROTOTYPES_DIR = "prototypes"
GALLERY_FILENAME = "gallery.png"
BOX_COLOR = (255, 221, 0)
_IMAGE_COLUMNS = ("image", "img", "pixel_values")
_BACKGROUND = (255, 255, 255)
_TEXT = (30, 30, 30)
_MUTED = (110, 110, 110)
_REPLACEMENTS = str.maketrans({"×": "x", "−": "-", "–": "-", "—": "-", "…": "...", "·": "-", "φ": "phi", "Σ": "sum"})


# --------------------------------------------------------------------------- geometry


def _as_pil(image: Any) -> PIL.Image.Image:
    """A PIL image, a path, or a stored-image value (`{"path", "bytes"}`, bytes) -> 8-bit RGB PIL image."""
    if isinstance(image, PIL.Image.Image):
        return to_rgb(image)
    if isinstance(image, str | os.PathLike) and not Path(image).is_file():
        raise FileNotFoundError(f"Image file {image} not found.")
    return decode_image(image)


def model_view(image: Any, config: Any, processor: Any | None = None) -> PIL.Image.Image:
    """The image the model sees, before normalisation: the eval transform's resize and centre crop.

    Args:
        image: a PIL image (any mode), a path, or a normalised `(3, H_in, W_in)` / `(1, 3, H_in, W_in)` tensor
            (pixel values already preprocessed with the config's mean and std, which are undone).
        config: a `ProtoPoolConfig` or its `data_config()` mapping.
        processor: a transformers image processor to use instead of the config's preprocessing; its resize and crop
            are applied with normalisation switched off.

    Returns:
        An RGB image of the model's input size `W_in × H_in`.
    """
    if isinstance(image, torch.Tensor):
        return _tensor_to_view(image, eval_data_config(config))
    pil = _as_pil(image)
    if processor is not None:
        pixels = processor(images=pil, return_tensors="pt", do_normalize=False)["pixel_values"]
        array = pixels[0].float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
        return PIL.Image.fromarray(array, mode="RGB")
    return EvalTransform(config).view(pil)


def _tensor_to_view(pixel_values: torch.Tensor, data_config: Mapping[str, Any]) -> PIL.Image.Image:
    if pixel_values.ndim == 4 and pixel_values.shape[0] == 1:
        pixel_values = pixel_values[0]
    if pixel_values.ndim != 3 or pixel_values.shape[0] != 3:
        raise ValueError(
            f"An image tensor must be normalised pixel values of shape (3, H, W) or (1, 3, H, W), got "
            f"{tuple(pixel_values.shape)}."
        )
    mean = torch.tensor(data_config["mean"], dtype=torch.float32)[:, None, None]
    std = torch.tensor(data_config["std"], dtype=torch.float32)[:, None, None]
    unit = (pixel_values.detach().float().cpu() * std + mean).clamp(0, 1)
    return PIL.Image.fromarray(unit.mul(255).round().byte().permute(1, 2, 0).numpy(), mode="RGB")


def preprocess(image: Any, config: Any, processor: Any | None = None) -> torch.Tensor:
    """Preprocess one image exactly like the model's eval transform (the processor of `preprocessor_config.json`).

    Args:
        image: a PIL image, a path, or an already normalised `(3, H_in, W_in)` / `(1, 3, H_in, W_in)` tensor
            (returned as a batch of one).
        config: a `ProtoPoolConfig` or its `data_config()` mapping.
        processor: a transformers image processor to use instead (`processor(images=..., return_tensors="pt")`).

    Returns:
        `(1, 3, H_in, W_in)` float32 pixel values.
    """
    if isinstance(image, torch.Tensor):
        pixels = image if image.ndim == 4 else image[None]
        if pixels.ndim != 4 or pixels.shape[:2] != (1, 3):
            raise ValueError(f"An image tensor must have shape (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}.")
        return pixels.float()
    if processor is not None:
        return processor(images=_as_pil(image), return_tensors="pt")["pixel_values"].float()
    return EvalTransform(config)(_as_pil(image))[None]


# --------------------------------------------------------------------------- activation maps


def _model_device(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(model.backbone.parameters(), None)
    if parameter is None:
        parameter = model.head.prototypes
    dtype = parameter.dtype if parameter.dtype.is_floating_point else torch.float32
    return parameter.device, dtype


def _distances(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """`(N, 3, H_in, W_in)` -> `(N, P, H, W)` squared distances in float32, on the CPU."""
    device, dtype = _model_device(model)
    with evaluating(model):
        return model.prototype_distances(pixel_values.to(device=device, dtype=dtype)).float().cpu()


def similarity_maps(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """φ(d) of every prototype at every latent location, the official push's activation.

    Args:
        model: a `ProtoPoolForImageClassification` (set to eval mode for the call).
        pixel_values: `(N, 3, H_in, W_in)` normalised images.

    Returns:
        `(N, P, H, W)` float32 on the CPU; larger means closer.
    """
    return log_similarity(_distances(model, pixel_values), model.config.similarity_epsilon)


def upsample_map(activation: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Upsample a `(H, W)` map bicubically (a = −0.75, half-pixel centres: OpenCV's `INTER_CUBIC`) to `size`.

    Args:
        activation: `(H, W)` map.
        size: `(H_in, W_in)` target size.

    Returns:
        `(H_in, W_in)` float32 array.
    """
    tensor = torch.as_tensor(np.asarray(activation, dtype=np.float32))
    if tensor.ndim != 2:
        raise ValueError(f"upsample_map expects a 2-D (H, W) map, got shape {tuple(tensor.shape)}.")
    out = F.interpolate(tensor[None, None], size=tuple(size), mode="bicubic", align_corners=False)
    return out[0, 0].numpy()


def prototype_activation(
    model: torch.nn.Module, image: Any, prototype_id: int, processor: Any | None = None
) -> np.ndarray:
    """The similarity map φ(d) of one prototype on an image, upsampled to the model view.

    Args:
        model: a `ProtoPoolForImageClassification`.
        image: a PIL image, a path or a normalised tensor (see `preprocess`).
        prototype_id: the prototype, in `[0, P)`.
        processor: optional transformers image processor replacing the config's preprocessing.

    Returns:
        `(H_in, W_in)` float32 map, the size of `model_view(image, model.config)`.
    """
    _check_prototype_id(model, prototype_id)
    pixels = preprocess(image, model.config, processor)
    maps = similarity_maps(model, pixels)[0, prototype_id]
    return upsample_map(maps, tuple(pixels.shape[-2:]))


def high_activation_box(activation: np.ndarray, percentile: float = 95) -> tuple[int, int, int, int]:
    """The bounding box of the pixels at or above the map's `percentile`-th percentile (the official rule).

    Args:
        activation: `(H_in, W_in)` map.
        percentile: threshold percentile in [0, 100].

    Returns:
        `(top, bottom, left, right)` in pixels, bottom and right exclusive: the crop is
        `image.crop((left, top, right, bottom))`, or `array[top:bottom, left:right]`.
    """
    activation = np.asarray(activation, dtype=np.float64)
    if activation.ndim != 2 or activation.size == 0:
        raise ValueError(f"high_activation_box expects a non-empty 2-D map, got shape {activation.shape}.")
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}.")
    if not np.isfinite(activation).all():
        raise ValueError("The activation map holds NaN or infinite values; check the model's weights.")
    mask = activation >= np.percentile(activation, percentile)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


# --------------------------------------------------------------------------- drawing


def colormap_lut(name: str = "jet") -> np.ndarray:
    """A `(256, 3)` uint8 colour table: the built-in `"jet"` (MATLAB/OpenCV JET) or any matplotlib colour map.

    Args:
        name: `"jet"`, or a matplotlib colour map name such as `"turbo"` or `"inferno"` (needs the `viz` extra).

    Returns:
        `(256, 3)` uint8 RGB table.
    """
    if name == "jet":
        x = np.linspace(0.0, 1.0, 256)
        rgb = [np.clip(np.minimum(4 * x - shift, -4 * x + shift + 3), 0, 1) for shift in (1.5, 0.5, -0.5)]
        return np.rint(np.stack(rgb, axis=1) * 255).astype(np.uint8)
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(
            f"Colour map {name!r} needs matplotlib: `pip install 'protopool-hf[viz]'`, or use colormap='jet'."
        ) from exc
    try:
        cmap = matplotlib.colormaps[name]
    except KeyError as exc:
        raise ValueError(f"Unknown colour map {name!r}; use 'jet' or a matplotlib name such as 'turbo'.") from exc
    return np.rint(cmap(np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)


def heatmap_overlay(
    image: PIL.Image.Image,
    activation: np.ndarray,
    colormap: str = "jet",
    image_weight: float = 0.6,
    heat_weight: float = 0.4,
) -> PIL.Image.Image:
    """Blend a colour-mapped activation over an image: `image_weight·image + heat_weight·heat`.

    The map is min-max rescaled to [0, 1] first (a constant map is all 0), as the official code does before its
    JET colour map (it blends 0.5·image + 0.3·heat, a darker picture; pass those weights to match it).

    Args:
        image: RGB image of size `W_in × H_in`.
        activation: `(H_in, W_in)` map.
        colormap: see `colormap_lut`.
        image_weight: weight of the image.
        heat_weight: weight of the heat map.

    Returns:
        The blended RGB image.
    """
    activation = np.asarray(activation, dtype=np.float64)
    if activation.shape != (image.height, image.width):
        raise ValueError(
            f"The activation map has shape {activation.shape}, the image is {image.height}×{image.width} (H×W): "
            "upsample the map to the image size first (upsample_map)."
        )
    low, span = activation.min(), np.ptp(activation)
    unit = (activation - low) / span if span > 0 else np.zeros_like(activation)
    heat = colormap_lut(colormap)[np.rint(unit * 255).astype(np.intp)].astype(np.float64)
    blend = image_weight * np.asarray(to_rgb(image), dtype=np.float64) + heat_weight * heat
    return PIL.Image.fromarray(np.clip(np.rint(blend), 0, 255).astype(np.uint8), mode="RGB")


def draw_box(
    image: PIL.Image.Image, box: tuple[int, int, int, int], color: tuple[int, int, int] = BOX_COLOR, width: int = 2
) -> PIL.Image.Image:
    """A copy of `image` with the `(top, bottom, left, right)` box (bottom, right exclusive) outlined inside it."""
    top, bottom, left, right = box
    out = to_rgb(image).copy()
    PIL.ImageDraw.Draw(out).rectangle((left, top, right - 1, bottom - 1), outline=color, width=width)
    return out


# --------------------------------------------------------------------------- prototypes and provenance


def _check_prototype_id(model: torch.nn.Module, prototype_id: int) -> int:
    num = int(model.config.num_prototypes)
    if isinstance(prototype_id, bool) or not isinstance(prototype_id, int | np.integer) or not 0 <= prototype_id < num:
        raise ValueError(
            f"prototype_id must be an int in [0, {num}) for this model's {num} prototypes, got {prototype_id!r}."
        )
    return int(prototype_id)


def prototype_classes(model: torch.nn.Module) -> dict[int, list[int]]:
    """Which classes use each prototype in their slots (argmax of the slot logits).

    Returns:
        `{prototype id: sorted class ids}` for every prototype in `[0, P)` (an empty list when no slot uses it).
    """
    slots = model.class_to_prototypes().cpu()  # (C, S)
    classes: dict[int, set[int]] = {p: set() for p in range(int(model.config.num_prototypes))}
    for c, row in enumerate(slots.tolist()):
        for p in row:
            classes[p].add(c)
    return {p: sorted(cs) for p, cs in classes.items()}


def used_prototypes(model: torch.nn.Module) -> list[int]:
    """The sorted ids of the prototypes that at least one class slot uses."""
    return sorted({int(p) for p in model.class_to_prototypes().flatten().tolist()})


def _class_name(config: Any, class_id: int) -> str:
    id2label = getattr(config, "id2label", None) or {}
    name = id2label.get(class_id, id2label.get(str(class_id)))
    return str(name).replace("_", " ") if name is not None else str(class_id)


def _without_transform(dataset: Any) -> Any:
    return dataset.with_format(None) if hasattr(dataset, "with_format") else dataset


def _rows_for(dataset: Any, image_indices: Sequence[int], model: torch.nn.Module) -> dict[int, int]:
    """Map recorded image indices to dataset rows (through the `index` column when there is one)."""
    size = len(dataset)
    columns = getattr(dataset, "column_names", None) or []
    recorded = getattr(model.config, "projection_dataset", None) or "the projection dataset"
    if "index" in columns:
        stored = np.asarray(_without_transform(dataset).select_columns(["index"])["index"], dtype=np.int64)
        row_of = {int(v): r for r, v in enumerate(stored.tolist())}
        missing = sorted({i for i in image_indices if i not in row_of})
        if missing:
            raise ValueError(
                f"The prototypes were projected on images {missing[:5]} of {recorded!r}, but this dataset's `index` "
                f"column (its {size} rows) lacks them: pass the dataset used by project_prototypes, not a subset."
            )
        return {i: row_of[i] for i in image_indices}
    too_far = sorted({i for i in image_indices if i >= size})
    if too_far:
        raise ValueError(
            f"The prototypes were projected on image {too_far[-1]} of {recorded!r}, but this dataset has only {size} "
            "rows: pass the dataset (same split and order) used by project_prototypes."
        )
    return {i: i for i in image_indices}


def _dataset_image(dataset: Any, row: int, image_column: str | None = None) -> PIL.Image.Image:
    item = dataset[int(row)]
    if isinstance(item, Mapping):
        column = image_column or next((c for c in _IMAGE_COLUMNS if c in item), None)
        if column is None or column not in item:
            raise ValueError(
                f"Dataset rows have columns {sorted(item)}, none of them an image column {list(_IMAGE_COLUMNS)}: "
                "pass image_column=..."
            )
        value = item[column]
    elif isinstance(item, tuple | list):
        value = item[0]
    else:
        value = item
    if isinstance(value, torch.Tensor):
        raise ValueError(
            f"Row {row} of the dataset holds a tensor, not an image: pass the dataset without its training transform "
            "(e.g. the loader's own dataset, before `with_transform(make_transforms(...))`)."
        )
    return _as_pil(value)


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
        >>> from protopool_hf.visualization import preprocess, render_prototype
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


def prototype_filenames(prototype_id: int) -> dict[str, str]:
    """File names of a prototype's pictures inside `prototypes/`.

    `prototype_007.png` is the crop (the prototype's own picture), `prototype_007_overlay.png` the source image with
    the heat map and the box, `prototype_007_source.png` the source image in true colours with the box.
    """
    stem = f"prototype_{int(prototype_id):03d}"
    return {"crop": f"{stem}.png", "overlay": f"{stem}_overlay.png", "source": f"{stem}_source.png"}


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
    rows = _rows_for(dataset, sorted(set(image_of.values())), model)
    transform = EvalTransform(model.config, getattr(model.config, "projection_input_size", None))
    classes = prototype_classes(model)
    by_image: dict[int, list[int]] = {}
    for p in ids:
        by_image.setdefault(image_of[p], []).append(p)
    out: dict[int, PrototypeImages] = {}
    for chunk in _batches(sorted(by_image), batch_size):
        views = [transform.view(_dataset_image(dataset, rows[i], image_column)) for i in chunk]
        distances = _distances(model, torch.stack([transform.normalise(v) for v in views]))
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


def save_prototype_images(
    model: torch.nn.Module,
    dataset: Any,
    out_dir: str | os.PathLike,
    *,
    prototype_ids: Sequence[int] | None = None,
    gallery: bool = True,
    batch_size: int = 16,
    image_column: str | None = None,
    verify: bool = True,
) -> dict[int, Path]:
    """Write every projected prototype's pictures into `out_dir/prototypes/` (what the model card links).

    Per prototype: `prototype_{id:03d}.png` (crop), `prototype_{id:03d}_overlay.png` (source with heat map and box),
    `prototype_{id:03d}_source.png` (source with box); with `gallery`, also `gallery.png` (the drawn prototypes that a
    class slot uses).

    Args:
        model: a projected `ProtoPoolForImageClassification`.
        dataset: the projection dataset (see `render_prototypes`).
        out_dir: the model folder; pictures go to its `prototypes/` subfolder.
        prototype_ids: which prototypes; `None` writes every projected one.
        gallery: also write the gallery of the used prototypes.
        batch_size: images per forward pass.
        image_column: the image column of mapping rows.
        verify: see `render_prototypes`.

    Returns:
        `{prototype id: path of its crop}`.
    """
    folder = Path(out_dir) / PROTOTYPES_DIR
    pictures = render_prototypes(
        model, dataset, prototype_ids, batch_size=batch_size, image_column=image_column, verify=verify
    )
    paths = {p: images.save(folder)["crop"] for p, images in pictures.items()}
    shown = [p for p in used_prototypes(model) if p in pictures]
    if gallery and shown:
        prototype_gallery(model, pictures=pictures, prototype_ids=shown).save(folder / GALLERY_FILENAME, format="PNG")
    return paths


# --------------------------------------------------------------------------- layout


def _font(size: int) -> PIL.ImageFont.ImageFont | PIL.ImageFont.FreeTypeFont:
    try:
        return PIL.ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return PIL.ImageFont.load_default()


def _text_width(text: str, font: Any) -> float:
    return PIL.ImageDraw.Draw(PIL.Image.new("RGB", (1, 1))).textlength(text, font=font)


def _printable(text: str) -> str:
    """`text` in the ASCII that Pillow's built-in font draws: accents dropped (é -> e), × -> x, others -> ?."""
    text = unicodedata.normalize("NFKD", str(text).translate(_REPLACEMENTS))
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    return text.encode("ascii", "replace").decode("ascii")


def _fit_text(text: str, width: int, font: Any) -> str:
    """`text` (made printable), shortened with an ellipsis to fit `width` pixels."""
    text = _printable(text)
    if _text_width(text, font) <= width:
        return text
    while text and _text_width(text + "...", font) > width:
        text = text[:-1]
    return text.rstrip(" ,") + "..."


def _wrap(text: str, width: int, font: Any, max_lines: int) -> list[str]:
    """Word-wrap `text` into at most `max_lines` lines of `width` pixels (the last one ellipsised)."""
    lines: list[str] = []
    words = _printable(text).split(" ")
    while words and len(lines) < max_lines:
        line = words.pop(0)
        while words and _text_width(f"{line} {words[0]}", font) <= width:
            line = f"{line} {words.pop(0)}"
        lines.append(line)
    if words:
        lines[-1] = _fit_text(f"{lines[-1]} {' '.join(words)}", width, font)
    return [_fit_text(line, width, font) for line in lines]


def _fit(
    image: PIL.Image.Image, size: tuple[int, int], background: tuple[int, int, int] = _BACKGROUND
) -> PIL.Image.Image:
    """`image` scaled (up or down, aspect kept) to fit `size`, centred on a background."""
    scale = min(size[0] / image.width, size[1] / image.height)
    new = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resample = PIL.Image.Resampling.NEAREST if scale >= 3 else PIL.Image.Resampling.LANCZOS
    canvas = PIL.Image.new("RGB", size, background)
    canvas.paste(image.resize(new, resample), ((size[0] - new[0]) // 2, (size[1] - new[1]) // 2))
    return canvas


def _line_height(font: Any) -> int:
    top, bottom = font.getbbox("Ag")[1::2]
    return int(bottom - top) + 6


def _classes_text(config: Any, classes: Sequence[int]) -> str:
    if not classes:
        return "no class uses it"
    return ", ".join(_class_name(config, c) for c in classes)


_SHOW = ("overlay", "source", "crop", "image")


def _cell(
    pictures: PrototypeImages,
    lines: Sequence[tuple[str, Any, tuple[int, int, int]]],
    thumb: int,
    show: Sequence[str],
    text_lines: int,
) -> PIL.Image.Image:
    """One prototype's tile: the chosen pictures side by side, then `lines` of (text, font, colour)."""
    for kind in show:
        if kind not in _SHOW:
            raise ValueError(f"show= takes pictures from {_SHOW}, got {kind!r}.")
    pad = 6
    images = {
        "overlay": pictures.overlay,
        "source": draw_box(pictures.image, pictures.box),
        "crop": pictures.crop,
        "image": pictures.image,
    }
    width = len(show) * thumb + (len(show) - 1) * pad
    heights = [_line_height(font) for _, font, _ in lines]
    tile = PIL.Image.new("RGB", (width, thumb + pad + sum(heights[:text_lines])), _BACKGROUND)
    for i, kind in enumerate(show):
        tile.paste(_fit(images[kind], (thumb, thumb), (240, 240, 240)), (i * (thumb + pad), 0))
    draw, y = PIL.ImageDraw.Draw(tile), thumb + pad
    for (text, font, color), height in zip(lines[:text_lines], heights, strict=False):
        draw.text((0, y), _fit_text(text, width, font), fill=color, font=font)
        y += height
    return tile


def _grid(
    tiles: Sequence[PIL.Image.Image], columns: int, title: str | None = None, gap: int = 16, margin: int = 16
) -> PIL.Image.Image:
    if not tiles:
        raise ValueError("Nothing to draw: no prototype pictures.")
    columns = max(1, min(columns, len(tiles)))
    cell_w, cell_h = max(t.width for t in tiles), max(t.height for t in tiles)
    rows = math.ceil(len(tiles) / columns)
    font = _font(20)
    title_h = _line_height(font) + 10 if title else 0
    width = 2 * margin + columns * cell_w + (columns - 1) * gap
    height = 2 * margin + title_h + rows * cell_h + (rows - 1) * gap
    canvas = PIL.Image.new("RGB", (width, height), _BACKGROUND)
    if title:
        PIL.ImageDraw.Draw(canvas).text(
            (margin, margin), _fit_text(title, width - 2 * margin, font), fill=_TEXT, font=font
        )
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        canvas.paste(tile, (margin + c * (cell_w + gap), margin + title_h + r * (cell_h + gap)))
    return canvas


def prototype_gallery(
    model: torch.nn.Module,
    dataset: Any | None = None,
    *,
    pictures: Mapping[int, PrototypeImages] | None = None,
    prototype_ids: Sequence[int] | None = None,
    columns: int = 8,
    thumb_size: int = 128,
    show: Sequence[str] = ("overlay", "crop"),
    title: str | None = None,
    verify: bool = True,
) -> PIL.Image.Image:
    """A grid of prototypes, each labelled with its id and the classes (`config.id2label`) whose slots use it.

    Args:
        model: a projected `ProtoPoolForImageClassification`.
        dataset: the projection dataset; not needed when `pictures` are given.
        pictures: pictures from `render_prototypes`, to avoid drawing them again.
        prototype_ids: which prototypes; `None`: every projected prototype some class slot uses.
        columns: tiles per row.
        thumb_size: side of each picture in pixels.
        show: the pictures of a tile, from `"overlay"` (heat map and box), `"source"` (box only), `"crop"`,
            `"image"`.
        title: the heading; defaults to the model's backbone and prototype counts.
        verify: see `render_prototypes`.

    Returns:
        The gallery image.
    """
    if prototype_ids is None:
        source = read_provenance(model)
        source.check_projected()
        projected = set(source.projected_ids)
        prototype_ids = [p for p in used_prototypes(model) if p in projected]
    if pictures is None:
        if dataset is None:
            raise ValueError("prototype_gallery needs the projection dataset (dataset=...) or pictures=...")
        pictures = render_prototypes(model, dataset, prototype_ids, verify=verify)
    missing = [p for p in prototype_ids if p not in pictures]
    if missing:
        raise ValueError(f"No pictures for prototypes {missing[:10]}: render them with render_prototypes first.")
    config = model.config
    bold, small = _font(15), _font(13)
    classes = prototype_classes(model)
    tiles = []
    for p in prototype_ids:
        names = _classes_text(config, classes[p])
        width = len(show) * thumb_size + (len(show) - 1) * 6
        lines = [(f"prototype {p}", bold, _TEXT)]
        lines += [(line, small, _MUTED) for line in _wrap(names, width, small, 2)]
        tiles.append(_cell(pictures[p], lines, thumb_size, show, text_lines=3))
    if title is None:
        title = (
            f"ProtoPool prototypes: {len(prototype_ids)} used of {config.num_prototypes}, "
            f"{config.num_labels} classes x {config.num_slots_per_class} slots, backbone {config.backbone}"
        )
    return _grid(tiles, columns, title)


def class_view(
    model: torch.nn.Module,
    dataset: Any | None,
    class_id: int,
    *,
    pictures: Mapping[int, PrototypeImages] | None = None,
    thumb_size: int = 160,
    show: Sequence[str] = ("overlay", "crop"),
    columns: int = 5,
    verify: bool = True,
) -> PIL.Image.Image:
    """A class's S slots: each slot's prototype with its pictures, its last-layer weight and the other classes using it.

    Args:
        model: a projected `ProtoPoolForImageClassification`.
        dataset: the projection dataset; may be `None` when `pictures` holds the class's prototypes.
        class_id: the class, in `[0, C)`.
        pictures: pictures from `render_prototypes`, to avoid drawing them again.
        thumb_size: side of each picture in pixels.
        show: pictures per slot (see `prototype_gallery`).
        columns: slots per row.
        verify: see `render_prototypes`.

    Returns:
        The class view image.
    """
    config = model.config
    if (
        isinstance(class_id, bool)
        or not isinstance(class_id, int | np.integer)
        or not 0 <= class_id < config.num_labels
    ):
        raise ValueError(f"class_id must be an int in [0, {config.num_labels}), got {class_id!r}.")
    class_id = int(class_id)
    slots = model.class_to_prototypes()[class_id].tolist()
    if pictures is None or any(p not in pictures for p in slots):
        if dataset is None:
            raise ValueError("class_view needs the projection dataset (dataset=...) or pictures of the class's slots.")
        pictures = render_prototypes(model, dataset, sorted(set(slots)), verify=verify)
    weights = model.head.last_layer.weight.detach().float().cpu()
    num_slots = config.num_slots_per_class
    classes = prototype_classes(model)
    bold, small = _font(15), _font(13)
    tiles = []
    for s, p in enumerate(slots):
        others = [c for c in classes[p] if c != class_id]
        shared = f"also: {_classes_text(config, others)}" if others else "used by this class only"
        lines = [
            (f"slot {s}: prototype {p}", bold, _TEXT),
            (f"weight {float(weights[class_id, class_id * num_slots + s]):+.3f}", small, _TEXT),
            (shared, small, _MUTED),
        ]
        tiles.append(_cell(pictures[p], lines, thumb_size, show, text_lines=3))
    return _grid(tiles, columns, f"class {class_id}: {_class_name(config, class_id)}")


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
        pixels = torch.stack([transform(_dataset_image(dataset, i, image_column)) for i in chunk])
        distances = _distances(model, pixels)[:, prototype_id]  # (N, H, W)
        flat = distances.flatten(1)
        values, where = flat.min(dim=1)
        for n, i in enumerate(chunk):
            r, c = divmod(int(where[n]), distances.shape[-1])
            best.append((float(values[n]), i, r, c))
        best = sorted(best)[:k]
    classes = prototype_classes(model)[prototype_id]
    out = []
    for distance, i, r, c in best:
        view = transform.view(_dataset_image(dataset, i, image_column))
        maps = similarity_maps(model, transform.normalise(view)[None])[0, prototype_id]
        out.append(
            _build_images(
                prototype_id,
                view,
                maps,
                image_index=i,
                row=r,
                col=c,
                label=_dataset_label(dataset, i),
                distance=distance,
                classes=classes,
                percentile=percentile,
                colormap=colormap,
            )
        )
    return out


def _dataset_label(dataset: Any, row: int) -> int:
    columns = getattr(dataset, "column_names", None) or []
    if "label" in columns:  # read the label alone, without decoding the image
        return int(_without_transform(dataset).select_columns(["label"])[int(row)]["label"])
    item = dataset[int(row)]
    if isinstance(item, Mapping):
        value = item.get("label", item.get("labels", -1))
    elif isinstance(item, tuple | list) and len(item) > 1:
        value = item[1]
    else:
        value = -1
    try:
        return int(value)
    except (TypeError, ValueError):
        warnings.warn(f"Row {row} has a non-integer label {value!r}; recording -1.", stacklevel=3)
        return -1
