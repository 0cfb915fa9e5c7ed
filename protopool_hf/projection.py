"""Prototype projection ("push"): move every prototype onto its nearest latent patch of a training image.

Shape alphabet: N batch, C classes, P prototypes, S slots per class, D prototype dim, H, W feature-map size.

ProtoPool projects once, after the last training epoch, on the un-augmented training images. A prototype's candidates
are the images of the classes whose slots use it: class c uses the prototypes `model.class_to_prototypes()[c]`
(the argmax over the pool of each slot's logits, deterministic), and a prototype shared by several classes searches
the union of their images. Among the candidates' 1×1 latent patches `model.latent_map(x)[n, :, h, w]`, the nearest
one in squared L2 distance wins; ties go to the lowest image index, then the lowest row, then the lowest column.

Unlike the official code (two backbone passes per batch and a Python loop over prototypes), each batch makes one
backbone pass and the search is one masked minimum over every (image, location) pair for all prototypes at once,
kept on the device without host synchronisation. Under DDP each process scans its own contiguous shard of the
dataset, the per-prototype winners are gathered, and every process keeps the same overall winner: the prototypes
end identical on every process and equal to a single-process run.

Where each prototype came from is saved with the model through `protopool_hf.provenance` (a [`ProjectionResult`] is
a `Provenance`), under the dataset's name (`provenance.dataset_name`, e.g. `"cub200/train"`), so that its pictures
can be redrawn later. Reading and checking the input batches is `protopool_hf.projection_data`'s job.

Prototypes that no slot uses have no candidates. They are reported in [`ProjectionResult.unused`] and left as they
were (the official code zeroes them); once the assignment is hard they take no part in any prediction, and
[`prune_unused_prototypes`] removes them from the model.
"""

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from . import provenance
from .layers import squared_l2_distances
from .losses import background_cells
from .modeling_protopool import ProtoPoolForImageClassification
from .projection_data import batch_object_mask, projection_loader, unpack_batch
from .provenance import Provenance, read_provenance, write_provenance
from .torch_utils import evaluating, unwrap_model


__all__ = ["ProjectionResult", "project_prototypes", "prune_unused_prototypes"]

# A patch's tie-break key: image_index << 24 | row << 12 | col (rows and columns below 4096).
_ROW_BITS = 12
_COL_BITS = 12
_MAX_SIDE = 1 << 12
_NO_KEY = torch.iinfo(torch.long).max


@dataclass
class ProjectionResult(Provenance):
    """Where every prototype was projected, as returned by [`project_prototypes`]: its [`Provenance`] and a report.

    Prototypes that were not moved (unused, or unmatched: used, but no image of their classes was scanned) have
    `image_index`, `row`, `col` and `label` -1 and `distance` nan.

    Attributes:
        image_index: `(P,)` long, index of the winning image in the dataset (position in iteration order, or the
            batch's `index` field).
        row: `(P,)` long, row of the winning patch in the `H × W` latent map.
        col: `(P,)` long, column of the winning patch.
        distance: `(P,)` float, squared L2 distance between the prototype before projection and the patch.
        label: `(P,)` long, class of the winning image.
        dataset_name: the name recorded in the model config (`provenance.dataset_name`, or the caller's).
        input_size: `[3, H_in, W_in]` of the scanned images, or None when it varied.
        unused: ids of the prototypes that no class slot uses (left unchanged).
        unmatched: ids of used prototypes for which no image of their classes was seen (left unchanged).
        duplicates: groups (sorted ids) of prototypes that landed on the same patch.
        num_images: images scanned, summed over processes.

    Example:
        ```python
        >>> import torch
        >>> from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification
        >>> from protopool_hf.projection import project_prototypes
        >>> config = ProtoPoolConfig(
        ...     backbone="test_resnet", num_labels=3, num_prototypes=6, num_slots_per_class=2, input_size=[3, 64, 64]
        ... )
        >>> model = ProtoPoolForImageClassification(config)
        >>> data = [{"pixel_values": torch.randn(3, 64, 64), "labels": i % 3} for i in range(6)]
        >>> result = project_prototypes(model, data, batch_size=4)
        >>> result.image_index.shape, result.num_images, model.is_assignment_hard
        (torch.Size([6]), 6, True)

        ```
    """

    unused: list[int] = field(default_factory=list)
    unmatched: list[int] = field(default_factory=list)
    duplicates: list[list[int]] = field(default_factory=list)
    num_images: int = 0

    @property
    def used(self) -> list[int]:
        """Ids of the prototypes some class slot uses (the ones [`prune_unused_prototypes`] keeps)."""
        unused = set(self.unused)
        return [p for p in range(self.num_prototypes) if p not in unused]

    def summary(self, per_prototype: bool = False) -> str:
        """A readable account of the projection; with `per_prototype`, one line per prototype as well."""
        moved = self.is_projected
        source = f" of {self.dataset_name!r}" if self.dataset_name else ""
        size = "×".join(map(str, self.input_size)) if self.input_size else "mixed"
        lines = [
            f"ProjectionResult: {int(moved.sum())}/{self.num_prototypes} prototypes projected onto patches of "
            f"{self.num_images} images{source} (input {size})"
        ]
        if bool(moved.any()):
            d = self.distance[moved]
            lines.append(
                f"  distance before projection: min {d.min():.4g}, median {d.median():.4g}, max {d.max():.4g}"
            )
        lines.append(f"  unused (no slot uses them, left unchanged): {self.unused}")
        if self.unmatched:
            lines.append(f"  unmatched (no image of their classes seen, left unchanged): {self.unmatched}")
        lines.append(f"  duplicates (same patch): {self.duplicates}")
        if per_prototype:
            for p in range(self.num_prototypes):
                if bool(moved[p]):
                    lines.append(
                        f"  prototype {p}: image {int(self.image_index[p])} (class {int(self.label[p])}), "
                        f"row {int(self.row[p])}, col {int(self.col[p])}, distance {float(self.distance[p]):.4g}"
                    )
                else:
                    lines.append(f"  prototype {p}: not projected")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()


@torch.no_grad()
def project_prototypes(
    model: ProtoPoolForImageClassification,
    data: DataLoader | Iterable[Mapping[str, Any]] | Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 64,
    dataset_name: str | None = None,
    num_workers: int = 0,
    harden: bool = True,
    restrict_to_objects: bool = False,
) -> ProjectionResult:
    """Move every used prototype onto its nearest latent patch among the images of the classes that use it.

    The model runs in eval mode under `torch.no_grad()` during the scan; every submodule's previous training mode
    is restored afterwards. The winning patches are copied into `model.head.prototypes`, their provenance into
    the model's persistent buffers and `config.projection_dataset` / `config.projection_input_size` (both saved by
    `save_pretrained`), and, with `harden`, the assignment is made hard.

    Args:
        model: the model (a DDP wrapper is unwrapped).
        data: a `DataLoader` (or any iterable) of batches, dicts with `pixel_values` `(N, 3, H_in, W_in)` and
            `labels` `(N,)` (or `label`, the column name of `datasets` and `DefaultDataCollator`'s input);
            an image's index is its position in iteration order, or the batch's `index` `(N,)`
            field when it has one. Or a map-style dataset (`datasets.Dataset` with a transform, torch `Dataset`,
            list) of examples with `pixel_values` `(3, H_in, W_in)` and `labels` (and optionally `index`), which is
            loaded here in order; under `torch.distributed` each process scans a contiguous shard of it. A list
            or tuple of batches (4-D `pixel_values`) is read as batches. A DataLoader given under
            `torch.distributed` is scanned as it is on each process: it must carry `index` if it is sharded (e.g.
            by a `DistributedSampler`), else each process must see the whole dataset.
        batch_size: batch size when `data` is a map-style dataset.
        dataset_name: the data's name, recorded in the config; by default `provenance.dataset_name(data)`
            (a `datasets.Dataset`'s name and split, e.g. `"cub200/train"`, else its fingerprint).
        num_workers: DataLoader workers when `data` is a map-style dataset.
        harden: call `model.harden_assignment()` after the projection.
        restrict_to_objects: only object patches are candidates: the latent cells of which at least
            `losses.BACKGROUND_BELOW` of the input pixels are object, by the batches' `object_mask` `(N, H_in, W_in)`
            (`make_transforms(..., object_mask=...)`). Not in the official method (off by default); a prototype
            whose classes' images have no object cell stays where it is (a warning names it).

    Returns:
        A [`ProjectionResult`], identical on every process.

    Raises:
        ValueError: a batch or example without `pixel_values` / `labels`, labels outside `[0, C)`, an
            `IterableDataset` of examples, or a sharded DataLoader without `index` under `torch.distributed`.
        RuntimeError: under `torch.distributed`, on the processes whose peer failed (the failing process raises
            its own error), so that none waits forever.
    """
    model = unwrap_model(model)
    head = model.head
    device = head.prototypes.device
    num_prototypes, dim = head.prototypes.shape
    distributed = dist.is_available() and dist.is_initialized()
    if dataset_name is None:
        dataset_name = provenance.dataset_name(data)
    loader, offset, needs_index = projection_loader(data, batch_size, num_workers, device, distributed)

    # (C, P) which prototypes each class's slots use; its rows mask each image's candidates.
    class_to_prototypes = model.class_to_prototypes().to(device)
    allowed = torch.zeros(model.config.num_labels, num_prototypes, dtype=torch.bool, device=device)
    allowed.scatter_(1, class_to_prototypes, True)
    used = allowed.any(dim=0)

    error: BaseException | None = None
    with evaluating(model):
        try:
            best, num_images, sizes = _scan(model, loader, allowed, offset, needs_index, restrict_to_objects)
        except Exception as exc:
            if not distributed:
                raise
            error, best, num_images, sizes = exc, None, 0, set()

    if distributed:
        best, num_images, sizes = _gather(best, num_images, sizes, error, num_prototypes, dim, device)

    distance, key, vectors, label = best
    projected = torch.isfinite(distance)
    image_index = torch.where(projected, key >> (_ROW_BITS + _COL_BITS), -1)
    row = torch.where(projected, (key >> _COL_BITS) & (_MAX_SIDE - 1), -1)
    col = torch.where(projected, key & (_MAX_SIDE - 1), -1)
    label = torch.where(projected, label, -1)
    distance = torch.where(projected, distance, float("nan"))

    head.prototypes[projected] = vectors[projected].to(head.prototypes.dtype)
    projected, used, key = projected.cpu(), used.cpu(), key.cpu()
    unused = torch.nonzero(~used).flatten().tolist()
    unmatched = torch.nonzero(used & ~projected).flatten().tolist()
    result = ProjectionResult(
        image_index=image_index.cpu(),
        row=row.cpu(),
        col=col.cpu(),
        distance=distance.cpu(),
        label=label.cpu(),
        dataset_name=dataset_name,
        input_size=list(next(iter(sizes))) if len(sizes) == 1 else None,
        unused=unused,
        unmatched=unmatched,
        duplicates=_duplicate_groups(key, projected),
        num_images=num_images,
    )
    write_provenance(model, result)
    if harden:
        model.harden_assignment()
    if unmatched:
        classes = _classes_of(class_to_prototypes.cpu(), unmatched)
        shown = ", ".join(map(str, classes[:20])) + (f", … ({len(classes)} classes)" if len(classes) > 20 else "")
        warnings.warn(
            f"Prototypes {unmatched} are used by class slots, but no image of their classes "
            f"[{shown}] {'with an object cell ' if restrict_to_objects else ''}was among the {num_images} scanned "
            "images: they were left unchanged. Project on data that covers every class.",
            stacklevel=3,  # the caller of project_prototypes, past torch.no_grad's wrapper
        )
    return result


def _scan(
    model: ProtoPoolForImageClassification,
    loader: Iterable[Any],
    allowed: torch.Tensor,
    offset: int,
    needs_index: bool,
    restrict_to_objects: bool = False,
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], int, set[tuple[int, ...]]]:
    """The running per-prototype best over the batches: distance, key, latent vector `(P, D)`, label."""
    device = allowed.device
    num_classes, num_prototypes = allowed.shape
    prototypes = model.head.prototypes.detach().float()
    best_distance = torch.full((num_prototypes,), math.inf, device=device)
    best_key = torch.full((num_prototypes,), _NO_KEY, dtype=torch.long, device=device)
    best_vector = torch.zeros(num_prototypes, prototypes.shape[1], device=device)
    best_label = torch.full((num_prototypes,), -1, dtype=torch.long, device=device)
    position, sizes = 0, set()
    for number, batch in enumerate(loader):
        pixel_values, labels, index = unpack_batch(batch, number, num_classes)
        count = labels.shape[0]
        if index is None and needs_index:
            raise ValueError(
                "Under torch.distributed, the projection DataLoader is sharded across processes, so positions in "
                "iteration order are not image indices: give its batches an `index` field, or pass the map-style "
                "dataset itself, which project_prototypes shards."
            )
        if index is None:
            index = torch.arange(offset + position, offset + position + count)
        position += count
        if count == 0:
            continue
        sizes.add(tuple(pixel_values.shape[1:]))
        pixel_values = pixel_values.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        index = index.to(device, non_blocking=True)

        latent = model.latent_map(pixel_values)  # (N, D, H, W) float32
        height, width = latent.shape[2:]
        if height > _MAX_SIDE or width > _MAX_SIDE:
            raise ValueError(f"Latent maps of {height}×{width} are not supported (at most {_MAX_SIDE} per side).")
        distances = squared_l2_distances(latent, prototypes)  # (N, P, H, W)
        candidates = allowed[labels][:, :, None]  # (N, P, 1)
        if restrict_to_objects:  # background cells are no candidates
            mask = batch_object_mask(batch, number, pixel_values).to(device)
            candidates = candidates & ~background_cells(mask, (height, width)).flatten(1)[:, None, :]  # (N, P, H·W)
        distances = distances.flatten(2).masked_fill(~candidates, math.inf)  # (N, P, H·W)
        batch_distance = distances.amin(dim=(0, 2))  # (P,)

        # Ties: the smallest key (image index, row, col) among the patches at the minimum.
        locations = torch.arange(height * width, device=device)
        location_keys = ((locations // width) << _COL_BITS) | (locations % width)
        keys = (index[:, None] << (_ROW_BITS + _COL_BITS)) | location_keys[None, :]  # (N, H·W)
        at_min = distances == batch_distance[None, :, None]
        batch_key = torch.where(at_min, keys[:, None, :], _NO_KEY).amin(dim=(0, 2))  # (P,)
        batch_key = torch.where(torch.isfinite(batch_distance), batch_key, _NO_KEY)

        # The winning patch's latent vector and label.
        image = batch_key >> (_ROW_BITS + _COL_BITS)
        sample = (index[None, :] == image[:, None]).int().argmax(dim=1)  # (P,) position in the batch
        row = (batch_key >> _COL_BITS) & (_MAX_SIDE - 1)
        col = batch_key & (_MAX_SIDE - 1)
        valid = batch_key != _NO_KEY
        vectors = latent[sample, :, torch.where(valid, row, 0), torch.where(valid, col, 0)]  # (P, D)

        better = (batch_distance < best_distance) | ((batch_distance == best_distance) & (batch_key < best_key))
        best_distance = torch.where(better, batch_distance, best_distance)
        best_key = torch.where(better, batch_key, best_key)
        best_vector = torch.where(better[:, None], vectors, best_vector)
        best_label = torch.where(better, labels[sample], best_label)
    return (best_distance, best_key, best_vector, best_label), position, sizes


def _gather(
    best: tuple[torch.Tensor, ...] | None,
    num_images: int,
    sizes: set[tuple[int, ...]],
    error: BaseException | None,
    num_prototypes: int,
    dim: int,
    device: torch.device,
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], int, set[tuple[int, ...]]]:
    """All-gather every process's best, keep the overall winner; every process computes the same one."""
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, (error is not None, num_images, sorted(sizes)))
    failed = [rank for rank, (bad, _, _) in enumerate(states) if bad]
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"Prototype projection failed on process(es) {failed}; see the error raised there.")

    # One float64 tensor per process (exact for float32 values and integers below 2**53): distance, key as
    # (image, row·W_max + col) halves, label, vector.
    distance, key, vectors, label = best
    packed = torch.cat(
        [
            distance.double()[:, None],
            (key >> (_ROW_BITS + _COL_BITS)).double()[:, None],
            (key & ((1 << (_ROW_BITS + _COL_BITS)) - 1)).double()[:, None],
            label.double()[:, None],
            vectors.double(),
        ],
        dim=1,
    )  # (P, 4 + D)
    backend = str(dist.get_backend())
    comm_device = device if device.type == "cuda" and "nccl" in backend else torch.device("cpu")
    packed = packed.to(comm_device)
    gathered = [torch.empty_like(packed) for _ in states]
    dist.all_gather(gathered, packed)
    stacked = torch.stack(gathered).to(device)  # (world, P, 4 + D)

    distances = stacked[:, :, 0].float()
    image = stacked[:, :, 1]
    keys = torch.where(image >= 0, (image.long() << (_ROW_BITS + _COL_BITS)) | stacked[:, :, 2].long(), _NO_KEY)
    keys = torch.where(torch.isfinite(distances), keys, _NO_KEY)
    overall = distances.amin(dim=0)  # (P,)
    overall_key = torch.where(distances == overall[None], keys, _NO_KEY).amin(dim=0)
    winner = ((distances == overall[None]) & (keys == overall_key[None])).int().argmax(dim=0)  # (P,) process
    pick = stacked[winner, torch.arange(num_prototypes, device=device)]  # (P, 4 + D)
    gathered_best = (overall, overall_key, pick[:, 4:].float(), pick[:, 3].long())
    all_sizes = {tuple(size) for _, _, rank_sizes in states for size in rank_sizes}
    return gathered_best, sum(count for _, count, _ in states), all_sizes


def _duplicate_groups(key: torch.Tensor, projected: torch.Tensor) -> list[list[int]]:
    """Groups of projected prototypes sharing a patch key."""
    ids = torch.nonzero(projected).flatten()
    if ids.numel() == 0:
        return []
    _, inverse, counts = torch.unique(key[ids], return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)
    groups = torch.split(ids[order], counts.tolist())
    return sorted(group.tolist() for group in groups if group.numel() > 1)


def _classes_of(class_to_prototypes: torch.Tensor, prototype_ids: list[int]) -> list[int]:
    """Classes whose slots use any of the given prototypes."""
    return torch.nonzero(torch.isin(class_to_prototypes, torch.tensor(prototype_ids)).any(dim=1)).flatten().tolist()


@torch.no_grad()
def prune_unused_prototypes(model: ProtoPoolForImageClassification) -> torch.Tensor:
    """Remove the prototypes that no class slot uses from a model whose assignment is hard.

    With a hard assignment the unused prototypes take no part in any prediction, so the logits do not change.
    The prototypes, the slot logits' pool axis, the provenance buffers and `config.num_prototypes` shrink to the
    used prototypes, in their old order. Build any optimizer after pruning: the parameters are replaced.

    Args:
        model: the model (a DDP wrapper is unwrapped), after `harden_assignment()`.

    Returns:
        `(P_kept,)` the old ids of the kept prototypes: new prototype `i` is old prototype `kept[i]`.

    Raises:
        ValueError: the assignment is not hard (removing pool entries would change a softmax assignment), or
            fewer than S + 1 prototypes are used (the model needs P > S).

    Example:
        ```python
        >>> import torch
        >>> from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification
        >>> from protopool_hf.projection import prune_unused_prototypes
        >>> config = ProtoPoolConfig(backbone="test_resnet", num_labels=3, num_prototypes=12, num_slots_per_class=2)
        >>> model = ProtoPoolForImageClassification(config).eval()
        >>> model.harden_assignment()
        >>> kept = prune_unused_prototypes(model)
        >>> model.config.num_prototypes == len(kept) == model.class_to_prototypes().unique().numel()
        True

        ```
    """
    model = unwrap_model(model)
    head = model.head
    if not model.is_assignment_hard:
        raise ValueError(
            "prune_unused_prototypes needs a hard assignment: removing prototypes from the pool would change the "
            "softmax assignment. Call `model.harden_assignment()` first (project_prototypes does it by default)."
        )
    kept = model.class_to_prototypes().unique()  # sorted old ids
    num_slots = model.config.num_slots_per_class
    if kept.numel() <= num_slots:
        raise ValueError(
            f"Only {kept.numel()} prototypes are used, but the model needs more than num_slots_per_class "
            f"({num_slots}) prototypes: keep them unpruned."
        )
    kept_provenance = read_provenance(model).select(kept.cpu())
    head.prototypes = nn.Parameter(head.prototypes.detach()[kept].clone(), requires_grad=head.prototypes.requires_grad)
    head.slot_logits = nn.Parameter(
        head.slot_logits.detach()[:, kept].clone(), requires_grad=head.slot_logits.requires_grad
    )
    write_provenance(model, kept_provenance)
    head.num_prototypes = int(kept.numel())
    model.config.num_prototypes = int(kept.numel())
    return kept.cpu()
