"""Projection input: the batches `project_prototypes` scans, from a DataLoader, a dataset or a list, checked.

Shape alphabet: N batch, H_in, W_in model input.

A batch is a dict with `pixel_values` `(N, 3, H_in, W_in)`, `labels` `(N,)` (or `label`, the column name of `datasets`)
and optionally `index` `(N,)`, the images' indices in the dataset, and `object_mask` `(N, H_in, W_in)` (the
restricted projection's object pixels). A map-style dataset of such examples is batched
here in order; under `torch.distributed` each process gets a contiguous shard of it. Every batch is checked before
it is used, with a message that names the batch and says what to change.
"""

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, Subset

from .torch_utils import check_labels, unwrap_model


__all__ = ["batch_object_mask", "check_projection_data", "projection_loader", "unpack_batch"]

# Names of accelerate's sharding loaders / samplers, recognised without importing accelerate.
_SHARDING_CLASSES = ("BatchSamplerShard", "DataLoaderDispatcher", "IterableDatasetShard", "SeedableRandomSampler")


def check_projection_data(model: nn.Module, data: Any, object_mask: bool = False) -> None:
    """Check the first example (or batch) of projection data, so a wrong format fails before any training.

    Reads `data[0]` of a map-style dataset or a list of batches, or the first batch of a `DataLoader`; other
    iterables (which a check could consume) are left to `project_prototypes`.

    Args:
        model: the model the data will be projected for (its `num_labels` bounds the labels).
        data: what `project_prototypes` would be given.
        object_mask: the batches must carry `object_mask` (the projection restricted to objects).

    Raises:
        ValueError: as `project_prototypes` would, naming the missing key, bad shape or label.
    """
    num_classes = unwrap_model(model).config.num_labels
    if isinstance(data, IterableDataset) or type(data).__name__ == "IterableDataset":
        projection_loader(data, 1, 0, torch.device("cpu"), False)  # raises its message
    if isinstance(data, DataLoader):
        batch = next(iter(data), None)
    elif _is_batch_list(data):
        batch = data[0]
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        if len(data) == 0:
            raise ValueError("The projection dataset is empty: pass the un-augmented training images.")
        batch = _collate_examples([data[0]])
    else:
        return
    if batch is None:
        raise ValueError("The projection DataLoader yields no batch: pass the un-augmented training images.")
    pixel_values, _, _ = unpack_batch(batch, 0, num_classes)
    if object_mask:
        batch_object_mask(batch, 0, pixel_values)


def _labels_key(batch: Mapping[str, Any]) -> str:
    """`labels`, or `label` (the `datasets` column that `DefaultDataCollator` renames) when only that is there."""
    return "label" if "labels" not in batch and "label" in batch else "labels"


def unpack_batch(batch: Any, number: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Check one batch; return `pixel_values` `(N, 3, H, W)`, `labels` `(N,)` and `index` `(N,)` or None."""
    if not isinstance(batch, Mapping):
        raise ValueError(
            f"Projection batch {number} is a {type(batch).__name__}; batches must be dicts with `pixel_values` "
            "(N, 3, H, W) and `labels` (N,) (and optionally `index`): give the dataset a transform that returns them."
        )
    missing = [name for name in ("pixel_values", _labels_key(batch)) if name not in batch]
    if missing:
        raise ValueError(
            f"Projection batch {number} has no {missing} (its keys: {sorted(batch)}); batches must hold "
            "`pixel_values` (N, 3, H, W) and `labels` (N,) (or `label`): give the dataset a transform that returns them."
        )
    pixel_values = torch.as_tensor(batch["pixel_values"])
    labels = torch.as_tensor(batch[_labels_key(batch)])
    if pixel_values.ndim != 4:
        raise ValueError(
            f"`pixel_values` of projection batch {number} has shape {tuple(pixel_values.shape)}; expected "
            "(N, 3, H, W)."
        )
    if labels.ndim != 1 or labels.shape[0] != pixel_values.shape[0] or labels.is_floating_point():
        raise ValueError(
            f"`labels` of projection batch {number} must be (N,) integer class indices for its {pixel_values.shape[0]} "
            f"images, got {labels.dtype} of shape {tuple(labels.shape)} (projection uses un-mixed labels)."
        )
    check_labels(labels, num_classes, name=f"`labels` of projection batch {number}")
    index = batch.get("index")
    if index is not None:
        index = torch.as_tensor(index)
        if index.shape != labels.shape or index.is_floating_point() or (index.numel() and int(index.min()) < 0):
            raise ValueError(
                f"`index` of projection batch {number} must be (N,) non-negative integer image indices, got "
                f"{index.dtype} of shape {tuple(index.shape)}."
            )
        index = index.long()
    return pixel_values, labels.long(), index


def batch_object_mask(batch: Mapping[str, Any], number: int, pixel_values: torch.Tensor) -> torch.Tensor:
    """The `(N, H_in, W_in)` bool `object_mask` of a projection batch, checked against its `pixel_values`."""
    mask = batch.get("object_mask")
    if mask is None:
        raise ValueError(
            f"Projection batch {number} has no `object_mask`, which the projection restricted to objects needs: "
            "build the projection transform with make_transforms(..., object_mask=...) (or add the field)."
        )
    mask = torch.as_tensor(mask)
    expected = (pixel_values.shape[0], *pixel_values.shape[2:])
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"`object_mask` of projection batch {number} has shape {tuple(mask.shape)}; expected {expected} "
            "(N, H_in, W_in), the size of its pixel_values."
        )
    return mask.bool()


def _collate_examples(examples: list[Any]) -> dict[str, torch.Tensor]:
    """Stack examples' `pixel_values`, `labels` (`index`, `object_mask`); other fields (a PIL `image`) are dropped."""
    for example in examples:
        if not isinstance(example, Mapping) or "pixel_values" not in example or _labels_key(example) not in example:
            found = sorted(example) if isinstance(example, Mapping) else type(example).__name__
            raise ValueError(
                f"Projection examples must be dicts with `pixel_values` (3, H, W) and `labels` (or `label`, an int), "
                f"got {found}: give the dataset a transform that returns them (e.g. `dataset.with_transform(...)`)."
            )
    batch = {
        "pixel_values": torch.stack([torch.as_tensor(example["pixel_values"]) for example in examples]),
        "labels": torch.as_tensor([int(example[_labels_key(example)]) for example in examples]),
    }
    if all("index" in example for example in examples):
        batch["index"] = torch.as_tensor([int(example["index"]) for example in examples])
    if all("object_mask" in example for example in examples):
        batch["object_mask"] = torch.stack([torch.as_tensor(example["object_mask"]) for example in examples])
    return batch


def projection_loader(
    data: Any, batch_size: int, num_workers: int, device: torch.device, distributed: bool
) -> tuple[Iterable[Any], int, bool]:
    """The batches to scan, the image index of the first one (a DDP shard's start), whether `index` is required."""
    if isinstance(data, IterableDataset) or type(data).__name__ == "IterableDataset":
        raise ValueError(
            f"`data` is an iterable dataset ({type(data).__name__}) of examples: wrap it in a "
            "`DataLoader(data, batch_size=...)` that yields batches, or pass a map-style dataset."
        )
    if (
        isinstance(data, DataLoader)
        or not (hasattr(data, "__getitem__") and hasattr(data, "__len__"))
        or _is_batch_list(data)
    ):
        return data, 0, distributed and _is_sharded(data)
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    size = len(data)
    offset = 0
    if distributed:
        world, rank = dist.get_world_size(), dist.get_rank()
        shard = -(-size // world)
        offset = min(rank * shard, size)
        data = Subset(data, range(offset, min(offset + shard, size)))
    loader = DataLoader(
        data,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate_examples,
        pin_memory=device.type == "cuda",
    )
    return loader, offset, False


def _is_batch_list(data: Any) -> bool:
    """A list or tuple of batches (4-D `pixel_values`) rather than of examples."""
    if not isinstance(data, (list, tuple)) or not data or not isinstance(data[0], Mapping):
        return False
    pixel_values = data[0].get("pixel_values")
    return getattr(pixel_values, "ndim", 0) == 4


def _is_sharded(loader: Any) -> bool:
    """Whether a DataLoader hands each process a different part of the data (torch's or accelerate's sharding)."""
    parts = (
        loader,
        getattr(loader, "sampler", None),
        getattr(loader, "batch_sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "batch_sampler", None),
        getattr(loader, "dataset", None),
    )
    return any(
        isinstance(part, DistributedSampler) or type(part).__name__ in _SHARDING_CLASSES
        for part in parts
        if part is not None
    )
