"""Views of many prototypes at once (the gallery, a class's slots), and writing a model folder's `prototypes/`.

Shape alphabet: C classes, P prototypes, S slots per class.

The gallery shows every used prototype labelled with the classes whose slots use it; the class view shows one class's
S slots with their prototypes and last-layer weights. `save_prototype_images` writes every prototype's pictures and
the gallery into a model folder, in the layout of `protopool_hf.pictures` (what the model card links).

Example:
    ```python
    >>> import tempfile
    >>> from pathlib import Path
    >>> import datasets, PIL.Image, torch
    >>> from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification
    >>> from protopool_hf.gallery import class_view, save_prototype_images
    >>> from protopool_hf.maps import preprocess
    >>> config = ProtoPoolConfig(backbone="test_resnet", num_labels=2, num_prototypes=4, num_slots_per_class=1)
    >>> model = ProtoPoolForImageClassification(config).eval()
    >>> ds = datasets.Dataset.from_dict({"image": [PIL.Image.new("RGB", (200, 180), "teal")], "label": [0]})
    >>> with torch.no_grad():  # what a projection leaves behind: every prototype is patch (2, 3) of image 0
    ...     model.head.prototypes[:] = model.latent_map(preprocess(ds[0]["image"], config))[0, :, 2, 3]
    >>> model.set_projection_provenance([0] * 4, [2] * 4, [3] * 4, [0.0] * 4, [0] * 4)
    >>> folder = Path(tempfile.mkdtemp())
    >>> paths = save_prototype_images(model, ds, folder)  # 3 pictures per prototype, and the gallery
    >>> len(paths), len(list((folder / "prototypes").iterdir())), (folder / "prototypes" / "gallery.png").is_file()
    (4, 13, True)
    >>> class_view(model, ds, class_id=1).mode
    'RGB'

    ```
"""

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from .drawing import CELL_GAP, MUTED, TEXT, cell, class_name, draw_box, grid, load_font, wrap_text
from .pictures import GALLERY_FILE, PROTOTYPES_DIR, PrototypeImages, render_prototypes
from .provenance import read_provenance
from .usage import prototype_classes, used_prototypes


__all__ = ["class_view", "prototype_gallery", "save_prototype_images"]


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
        prototype_gallery(model, pictures=pictures, prototype_ids=shown).save(
            Path(out_dir) / GALLERY_FILE, format="PNG"
        )
    return paths


# --------------------------------------------------------------------------- tiles


def _classes_text(config: Any, classes: Sequence[int]) -> str:
    if not classes:
        return "no class uses it"
    return ", ".join(class_name(config, c) for c in classes)


_SHOW = ("overlay", "source", "crop", "image")


def _tile(
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
    images = {
        "overlay": pictures.overlay,
        "source": draw_box(pictures.image, pictures.box),
        "crop": pictures.crop,
        "image": pictures.image,
    }
    return cell([images[kind] for kind in show], lines, thumb, text_lines)


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
    bold, small = load_font(15), load_font(13)
    classes = prototype_classes(model)
    tiles = []
    for p in prototype_ids:
        names = _classes_text(config, classes[p])
        width = len(show) * thumb_size + (len(show) - 1) * CELL_GAP
        lines = [(f"prototype {p}", bold, TEXT)]
        lines += [(line, small, MUTED) for line in wrap_text(names, width, small, 2)]
        tiles.append(_tile(pictures[p], lines, thumb_size, show, text_lines=3))
    if title is None:
        title = (
            f"ProtoPool prototypes: {len(prototype_ids)} used of {config.num_prototypes}, "
            f"{config.num_labels} classes x {config.num_slots_per_class} slots, backbone {config.backbone}"
        )
    return grid(tiles, columns, title)


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
    bold, small = load_font(15), load_font(13)
    tiles = []
    for s, p in enumerate(slots):
        others = [c for c in classes[p] if c != class_id]
        shared = f"also: {_classes_text(config, others)}" if others else "used by this class only"
        lines = [
            (f"slot {s}: prototype {p}", bold, TEXT),
            (f"weight {float(weights[class_id, class_id * num_slots + s]):+.3f}", small, TEXT),
            (shared, small, MUTED),
        ]
        tiles.append(_tile(pictures[p], lines, thumb_size, show, text_lines=3))
    return grid(tiles, columns, f"class {class_id}: {class_name(config, class_id)}")
