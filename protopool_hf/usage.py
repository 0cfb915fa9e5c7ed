"""Prototype usage: which prototypes the class slots use, read from `model.class_to_prototypes()`.

Shape alphabet: C classes, P prototypes, S slots per class.

Each of the C·S class slots picks one prototype of the pool of P (the argmax of its slot logits; once the assignment
is hardened, the one it is fixed to). A prototype can be used by several slots, of one class or of several, or by
none. Everything that asks "which prototypes does a class use, which classes use a prototype" reads it here.

Example:
    ```python
    >>> import torch
    >>> from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification
    >>> from protopool_hf.usage import classes_using, prototype_classes, slot_counts, used_prototypes
    >>> config = ProtoPoolConfig(backbone="test_resnet", num_labels=2, num_prototypes=4, num_slots_per_class=2)
    >>> model = ProtoPoolForImageClassification(config)
    >>> with torch.no_grad():  # class 0 uses prototypes 0 and 2, class 1 uses 2 and 3
    ...     _ = model.head.slot_logits.fill_(0.0)
    ...     for c, s, p in [(0, 0, 0), (0, 1, 2), (1, 0, 2), (1, 1, 3)]:
    ...         model.head.slot_logits[c, p, s] = 1.0
    >>> used_prototypes(model), prototype_classes(model)
    ([0, 2, 3], {0: [0], 1: [], 2: [0, 1], 3: [1]})
    >>> slot_counts(model).tolist(), classes_using(model, [3])
    ([1, 0, 2, 1], [1])

    ```
"""

from collections.abc import Sequence

import torch


__all__ = ["classes_using", "prototype_classes", "slot_counts", "used_prototypes"]


def prototype_classes(model: torch.nn.Module) -> dict[int, list[int]]:
    """Which classes use each prototype in their slots (argmax of the slot logits).

    Args:
        model: a `ProtoPoolForImageClassification`.

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
    """The sorted ids of the prototypes that at least one class slot uses.

    Args:
        model: a `ProtoPoolForImageClassification`.

    Returns:
        Sorted prototype ids in `[0, P)`.
    """
    return sorted({int(p) for p in model.class_to_prototypes().flatten().tolist()})


def slot_counts(model: torch.nn.Module) -> torch.Tensor:
    """How many class slots use each prototype (a count above 1 is a shared prototype).

    Args:
        model: a `ProtoPoolForImageClassification`.

    Returns:
        `(P,)` int64 counts on the CPU; they add up to C·S.
    """
    slots = model.class_to_prototypes().cpu().flatten()
    return torch.bincount(slots, minlength=int(model.config.num_prototypes))


def classes_using(model: torch.nn.Module, prototype_ids: Sequence[int]) -> list[int]:
    """The classes whose slots use any of the given prototypes.

    Args:
        model: a `ProtoPoolForImageClassification`.
        prototype_ids: prototype ids in `[0, P)`.

    Returns:
        Sorted class ids in `[0, C)`.
    """
    slots = model.class_to_prototypes().cpu()  # (C, S)
    wanted = torch.as_tensor(list(prototype_ids), dtype=slots.dtype)
    return torch.nonzero(torch.isin(slots, wanted).any(dim=1)).flatten().tolist()
