"""Small torch-only helpers that the model, the projection, the pictures and the data transforms share.

- [`evaluating`]: run a model in eval mode without autograd, then give every submodule back its own mode.
- [`check_labels`]: class labels must lie in `[0, C)`; one message, naming the bad values and what to check.
- [`unwrap_model`]: the model inside DDP / DataParallel wrappers.

This module imports only torch, so the modeling file (whose imports remote code copies) can use it.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import nn


__all__ = ["check_labels", "evaluating", "unwrap_model"]


@contextmanager
def evaluating(model: nn.Module, no_grad: bool = True) -> Iterator[nn.Module]:
    """Eval mode (and no autograd) for the duration; every submodule's own training mode is restored afterwards.

    `model.train()` afterwards would not do: a frozen backbone kept in eval mode on purpose would be switched to
    training mode. Here each submodule gets back exactly the mode it had.

    Args:
        model: any module.
        no_grad: also turn autograd off; `False` leaves it as it is (e.g. for gradients with respect to the input).

    Yields:
        The model, in eval mode.

    Example:
        ```python
        >>> import torch
        >>> from protopool_hf.torch_utils import evaluating
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
        >>> model[0].eval()  # a submodule kept in eval mode on purpose
        Linear(in_features=2, out_features=2, bias=True)
        >>> with evaluating(model):
        ...     model.training, torch.is_grad_enabled()
        (False, False)
        >>> model.training, model[0].training, model[1].training
        (True, False, True)

        ```
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad() if no_grad else nullcontext():
            yield model
    finally:
        for module, mode in modes:
            module.training = mode


def check_labels(
    labels: torch.Tensor,
    num_labels: int | None,
    *,
    name: str = "`labels`",
    index: torch.Tensor | Sequence[int] | None = None,
) -> None:
    """Raise when a class label lies outside `[0, num_labels)`.

    Under `torch.compile` / `torch.export` (no Python branch on a value there) the check is an assertion op in the
    graph, which raises a `RuntimeError` with the same range when it fails.

    Args:
        labels: `(N,)` integer class indices.
        num_labels: C, the model's number of classes; None checks only that labels are not negative.
        name: how the message names the labels (e.g. "`labels` of projection batch 3").
        index: `(N,)` the samples' dataset indices, named in the message next to the bad labels.

    Raises:
        ValueError: a label is negative or >= `num_labels`; the message lists the bad values.

    Example:
        ```python
        >>> import torch
        >>> from protopool_hf.torch_utils import check_labels
        >>> check_labels(torch.tensor([0, 2, 1]), 3)
        >>> check_labels(torch.tensor([0, 3]), 3)
        Traceback (most recent call last):
        ...
        ValueError: `labels` holds [3], outside [0, 3) for this model's 3 classes: check the dataset's label column against the config's id2label.

        ```
    """
    high = num_labels
    if torch.compiler.is_compiling():
        in_range = (labels >= 0).all() if high is None else ((labels >= 0) & (labels < high)).all()
        torch._assert_async(in_range, f"{name} outside [0, {high}) for this model's classes")
        return
    if not labels.numel():
        return
    bad_mask = labels < 0 if high is None else (labels < 0) | (labels >= high)
    if not bool(bad_mask.any()):
        return
    bad = labels[bad_mask].unique().tolist()
    where = ""
    if index is not None:
        bad_index = torch.as_tensor(index)[bad_mask.cpu()].tolist()
        where = f" (samples at index {bad_index[:5]}{', ...' if len(bad_index) > 5 else ''})"
    if high is None:
        raise ValueError(
            f"{name} holds the negative labels {bad}{where}: class labels are 0, 1, ... (-1 usually marks unlabelled "
            "rows); drop those rows or fix the label column."
        )
    raise ValueError(
        f"{name} holds {bad}{where}, outside [0, {high}) for this model's {high} classes: check the dataset's label "
        "column against the config's id2label."
    )


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside `DistributedDataParallel` / `DataParallel` wrappers (the model itself when unwrapped)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model
