"""Projection provenance: where each prototype was projected, and the name of the dataset it was projected on.

Shape alphabet: P prototypes.

After the projection ([`protopool_hf.project_prototypes`]) each prototype is a latent patch of one training image.
Where it came from is saved with the model, so its pictures can be redrawn after `from_pretrained`: five persistent
`(P,)` buffers of the head (image index, feature-map row and column, distance before projection, class of the image)
and two config fields (`projection_dataset`, `projection_input_size`). A prototype that was not projected has
index, row, column and class -1 and distance nan.

This module is the one place that names those buffers and fields: [`Provenance`] is their value,
[`read_provenance`] / [`write_provenance`] / [`clear_provenance`] move it in and out of a model, and
[`dataset_name`] is the one name a dataset is recorded under and recognised by. It imports only torch, so the
modeling file (whose imports remote code copies) can use it.
"""

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Subset

from .torch_utils import unwrap_model


__all__ = [
    "PROVENANCE_BUFFERS",
    "Provenance",
    "check_dataset_name",
    "clear_provenance",
    "dataset_name",
    "read_provenance",
    "register_provenance_buffers",
    "write_provenance",
]

# Provenance field -> (head buffer name, dtype, value of a prototype that was not projected).
PROVENANCE_BUFFERS: dict[str, tuple[str, torch.dtype, float]] = {
    "image_index": ("projection_image_index", torch.long, -1),
    "row": ("projection_row", torch.long, -1),
    "col": ("projection_col", torch.long, -1),
    "distance": ("projection_distance", torch.float32, math.nan),
    "label": ("projection_label", torch.long, -1),
}


@dataclass
class Provenance:
    """Where every prototype was projected: one entry per prototype, -1 (nan for `distance`) when not projected.

    Attributes:
        image_index: `(P,)` long, index of the source image in the projection dataset.
        row: `(P,)` long, row of the source patch in the `H × W` latent map.
        col: `(P,)` long, column of the source patch.
        distance: `(P,)` float, squared L2 distance between the prototype before projection and the patch.
        label: `(P,)` long, class of the source image.
        dataset_name: the projection dataset's name ([`dataset_name`]), or a name the caller chose.
        input_size: `[3, H_in, W_in]` of the projected images, or None when it varied.

    Example:
        ```python
        >>> from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification
        >>> from protopool_hf.provenance import Provenance, read_provenance, write_provenance
        >>> config = ProtoPoolConfig(backbone="test_resnet", num_labels=2, num_prototypes=4, num_slots_per_class=2)
        >>> model = ProtoPoolForImageClassification(config)
        >>> read_provenance(model).projected_ids
        []
        >>> provenance = Provenance.empty(4)
        >>> provenance.image_index[1], provenance.row[1], provenance.col[1], provenance.label[1] = 7, 2, 3, 1
        >>> provenance.dataset_name = "cub200/train"
        >>> write_provenance(model, provenance)
        >>> read_provenance(model).projected_ids, model.config.projection_dataset
        ([1], 'cub200/train')

        ```
    """

    image_index: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    distance: torch.Tensor
    label: torch.Tensor
    dataset_name: str | None = None
    input_size: list[int] | None = None

    @classmethod
    def empty(cls, num_prototypes: int) -> "Provenance":
        """The provenance of `num_prototypes` prototypes none of which was projected."""
        return cls(
            **{
                name: torch.full((num_prototypes,), empty, dtype=dtype)
                for name, (_, dtype, empty) in PROVENANCE_BUFFERS.items()
            }
        )

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], prefix: str = "head.") -> "Provenance | None":
        """The provenance stored in a state dict (e.g. a checkpoint's tensors), or None when a buffer is missing.

        Args:
            state_dict: tensors by name, as `model.state_dict()` or a safetensors file gives them.
            prefix: the head's prefix in the names.
        """
        keys = {name: prefix + buffer for name, (buffer, _, _) in PROVENANCE_BUFFERS.items()}
        if any(key not in state_dict for key in keys.values()):
            return None
        return cls(**{name: state_dict[key] for name, key in keys.items()})

    @staticmethod
    def state_dict_keys(prefix: str = "head.") -> list[str]:
        """The names of the provenance buffers in a model's state dict."""
        return [prefix + buffer for buffer, _, _ in PROVENANCE_BUFFERS.values()]

    @property
    def num_prototypes(self) -> int:
        """P."""
        return int(self.image_index.numel())

    @property
    def is_projected(self) -> torch.Tensor:
        """`(P,)` bool: which prototypes were moved onto a patch."""
        return self.image_index >= 0

    @property
    def projected_ids(self) -> list[int]:
        """Ids of the projected prototypes, ascending."""
        return torch.nonzero(self.is_projected).flatten().tolist()

    def select(self, prototype_ids: torch.Tensor | Sequence[int]) -> "Provenance":
        """The provenance of the given prototypes only, in that order (e.g. the ones a pruning keeps)."""
        ids = torch.as_tensor(prototype_ids, dtype=torch.long, device=self.image_index.device)
        tensors = {name: getattr(self, name)[ids].clone() for name in PROVENANCE_BUFFERS}
        return Provenance(**tensors, dataset_name=self.dataset_name, input_size=self.input_size)

    def same_sources(self, other: "Provenance") -> bool:
        """Whether both record the same dataset name and, for every prototype, the same image and patch."""
        return self.dataset_name == other.dataset_name and all(
            torch.equal(getattr(self, name).cpu(), getattr(other, name).cpu())
            for name in ("image_index", "row", "col")
        )

    def check_projected(self, prototype_ids: Sequence[int] | None = None) -> None:
        """Raise unless the model was projected and every prototype in `prototype_ids` has a source.

        Raises:
            ValueError: no prototype was ever projected, or one of `prototype_ids` was skipped by the projection.
        """
        if not bool(self.is_projected.any()):
            raise ValueError(
                "This model was never projected: its prototypes have no source image "
                "(model.head.projection_image_index is -1 everywhere). Run "
                "`protopool_hf.project_prototypes(model, dataloader)` on the training set first, then draw the "
                "prototypes."
            )
        for prototype_id in prototype_ids or ():
            if int(self.image_index[prototype_id]) < 0:
                raise ValueError(
                    f"Prototype {prototype_id} has no projection provenance: the projection skipped it because no "
                    "class slot used it then. Draw the projected ones (`used_prototypes(model)`, or leave "
                    "prototype_ids=None)."
                )


def register_provenance_buffers(head: nn.Module, num_prototypes: int) -> None:
    """Give a ProtoPool head its persistent provenance buffers, every prototype not projected."""
    empty = Provenance.empty(num_prototypes)
    for name, (buffer, _, _) in PROVENANCE_BUFFERS.items():
        head.register_buffer(buffer, getattr(empty, name))


def read_provenance(model: nn.Module) -> Provenance:
    """The model's provenance, as copies on the CPU.

    Args:
        model: a `ProtoPoolForImageClassification` (a DDP wrapper is unwrapped).
    """
    model = unwrap_model(model)
    tensors = {
        name: getattr(model.head, buffer).detach().cpu().clone() for name, (buffer, _, _) in PROVENANCE_BUFFERS.items()
    }
    config = model.config
    input_size = getattr(config, "projection_input_size", None)
    return Provenance(
        **tensors,
        dataset_name=getattr(config, "projection_dataset", None),
        input_size=list(input_size) if input_size is not None else None,
    )


@torch.no_grad()
def write_provenance(model: nn.Module, provenance: Provenance) -> None:
    """Store `provenance` in the model's buffers and config (both saved by `save_pretrained`).

    Buffers keep their device and dtype. When the model's prototype count changed (a pruning), buffers of the old
    size are replaced by buffers of the new one.

    Args:
        model: a `ProtoPoolForImageClassification` (a DDP wrapper is unwrapped).
        provenance: one entry per prototype of the model (a `ProjectionResult` is one).

    Raises:
        ValueError: `provenance` has another number of prototypes than the model.
    """
    model = unwrap_model(model)
    head = model.head
    num_prototypes = int(head.prototypes.shape[0])
    for name, (buffer_name, _, _) in PROVENANCE_BUFFERS.items():
        value = torch.as_tensor(getattr(provenance, name))
        if value.shape != (num_prototypes,):
            raise ValueError(
                f"Provenance `{name}` has shape {tuple(value.shape)}, but the model has {num_prototypes} prototypes: "
                "give one entry per prototype."
            )
        buffer = getattr(head, buffer_name)
        if buffer.shape == value.shape:
            buffer.copy_(value.to(buffer))
        else:
            setattr(head, buffer_name, value.to(device=buffer.device, dtype=buffer.dtype).clone())
    model.config.projection_dataset = provenance.dataset_name
    input_size = provenance.input_size
    model.config.projection_input_size = list(input_size) if input_size is not None else None


def clear_provenance(model: nn.Module) -> None:
    """Forget where the prototypes were projected: buffers back to -1 / nan, config fields to None."""
    write_provenance(model, Provenance.empty(int(unwrap_model(model).head.prototypes.shape[0])))


def dataset_name(data: Any) -> str | None:
    """The name a projection records a dataset under, and recognises it by: `"<name>[/<config>][/<split>]"`.

    The name comes from a `datasets.Dataset`'s info (the loaders of `protopool_hf.data` set it: `"cub200/train"`,
    `"fashion_mnist/test"`, `"image_folder:birds"`); the config part appears when it is neither `"default"` nor the
    name itself. It does not change with a transform, a format, a shuffle or a selection of rows, so the dataset
    given to the projection (with the eval transform) and the one given to the pictures (raw) have the same name;
    whether the rows are the projected images is checked by the pictures themselves. A dataset without a name is
    recorded by its fingerprint (`"fingerprint:<hex>"`), which changes with every transform and so is never
    compared.

    Args:
        data: a `datasets.Dataset`, a `DataLoader` or `Subset` of one, or anything else.

    Returns:
        The name, or None for data that is not (a loader of) a `datasets.Dataset`.

    Example:
        ```python
        >>> import datasets
        >>> from protopool_hf.provenance import dataset_name
        >>> info = datasets.DatasetInfo(dataset_name="cub200")
        >>> train = datasets.Dataset.from_dict({"label": [0, 1, 1]}, info=info, split="train")
        >>> dataset_name(train), dataset_name(train.shuffle(seed=0).with_transform(lambda batch: batch))
        ('cub200/train', 'cub200/train')

        ```
    """
    dataset = getattr(data, "dataset", data)
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    info = getattr(dataset, "info", None)
    name = getattr(info, "dataset_name", None)
    if name:
        config_name = getattr(info, "config_name", None)
        if config_name and config_name not in ("default", name):
            name = f"{name}/{config_name}"
        split = getattr(dataset, "split", None)
        return f"{name}/{split}" if split is not None else name
    fingerprint = getattr(dataset, "_fingerprint", None)
    return f"fingerprint:{fingerprint}" if fingerprint else None


def check_dataset_name(provenance: Provenance, dataset: Any, stacklevel: int = 3) -> None:
    """Warn when `dataset`'s name differs from the one the projection recorded.

    Only a warning, and only for names: a caller may have given the projection a name of their own, and names from
    fingerprints are never compared. Whether the rows hold the projected images is for the caller to check.

    Args:
        provenance: the model's provenance ([`read_provenance`]).
        dataset: the dataset the pictures are about to be drawn from.
        stacklevel: passed to `warnings.warn` (3: the caller of the function that calls this one).
    """
    recorded, current = provenance.dataset_name, dataset_name(dataset)
    if not recorded or current is None or recorded == current:
        return
    if recorded.startswith("fingerprint:") or current.startswith("fingerprint:"):
        return  # fingerprints change with every format or transform: only the content check can tell
    warnings.warn(
        f"The prototypes were projected on {recorded!r} (model.config.projection_dataset), but this dataset is "
        f"{current!r}. Pass the dataset, split and order used by project_prototypes.",
        stacklevel=stacklevel,
    )
