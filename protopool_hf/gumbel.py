"""The slot assignment's schedule on a model: the Gumbel scale s, hardening, and a guard against an unmoved scale.

In training the slots are Gumbel-softmax samples of softmax(Θ·s); the scale s grows over training (the official
schedule, `callbacks.GumbelScheduleCallback`) until the assignment is nearly one-hot, and `harden_assignment` makes it
exactly one-hot for last-layer fine-tuning. s and the hardening are head buffers, saved with the model.
[`GumbelScheduleMixin`] gives `ProtoPoolForImageClassification` this part of its API.

This module is part of what `save_pretrained` copies for remote code: it imports only torch.
"""

import warnings
from typing import Any

import torch


__all__ = ["GumbelScheduleMixin", "GumbelScheduleWarning"]


class GumbelScheduleWarning(UserWarning):
    """A model is trained in Gumbel mode while nothing moves its assignment scale.

    Example:
        ```python
        >>> import warnings
        >>> from protopool_hf.gumbel import GumbelScheduleWarning
        >>> warnings.simplefilter("ignore", GumbelScheduleWarning)  # e.g. in a test that trains at s = 1 on purpose

        ```
    """


class GumbelScheduleMixin:
    """The Gumbel scale and hardening API of a model whose `head` holds the `gumbel_scale` / `hard_assignment` buffers.

    Example:
        ```python
        >>> from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification
        >>> config = ProtoPoolConfig(backbone="test_resnet", num_labels=3, num_prototypes=6, num_slots_per_class=2)
        >>> model = ProtoPoolForImageClassification(config)
        >>> model.set_gumbel_scale(10.0)
        >>> model.gumbel_scale, model.is_assignment_hard
        (10.0, False)
        >>> model.harden_assignment()
        >>> model.deterministic_assignment().sum(dim=1).unique()  # one-hot: each slot picks one prototype
        tensor([1.])

        ```
    """

    # Whether `set_gumbel_scale` was called, and whether `train()` already checked (once) that something sets it.
    _gumbel_scale_set = False
    _scale_checked = False

    @property
    def gumbel_scale(self) -> float:
        """The current assignment scale s."""
        return float(self.head.gumbel_scale)

    def set_gumbel_scale(self, scale: float) -> None:
        """Set the assignment scale s (> 0) multiplying the slot logits; saved with the model."""
        scale = float(scale)
        if not scale > 0:
            raise ValueError(f"The Gumbel scale must be > 0, got {scale}. s = 1 is the official plain-softmax path.")
        self.head.gumbel_scale.fill_(scale)
        self._gumbel_scale_set = True

    def train(self, mode: bool = True) -> Any:
        """`nn.Module.train`; warns once when training starts in Gumbel mode while the scale was never set.

        A soft assignment trained at the initial s = 1 that nothing raises never becomes one-hot, so the prototypes
        the classes use stay blurred. The stock `Trainer` calls `model.train()` after its callbacks' `on_train_begin`,
        where [`GumbelScheduleCallback`] sets the scale, so a Trainer with that callback does not warn. The check
        lives here, not in `forward`, which stays free of branches on tensor values.

        Args:
            mode: training (True) or evaluation (False) mode.

        Returns:
            The model.
        """
        super().train(mode)
        if not mode or self._scale_checked or self.head.gumbel_scale.is_meta or self.head.hard_assignment.is_meta:
            return self
        self._scale_checked = True  # once: the Trainer calls train() at every step, and reading s may sync a GPU
        if self._scale_never_set():
            warnings.warn(
                "Training a ProtoPool model in Gumbel mode at the initial assignment scale s=1, which nothing sets: "
                "the assignment stays soft. Add protopool_hf.GumbelScheduleCallback() to the Trainer's callbacks (or "
                "call model.set_gumbel_scale(s); harden the assignment for last-layer fine-tuning).",
                GumbelScheduleWarning,
                stacklevel=2,
            )
        return self

    def _scale_never_set(self) -> bool:
        """Soft assignment at s = 1 that `set_gumbel_scale` never touched (a loaded s != 1 was set by training)."""
        if self._gumbel_scale_set:
            return False
        return not bool(self.head.hard_assignment) and float(self.head.gumbel_scale) == 1.0

    def harden_assignment(self) -> None:
        """From now on every mode uses one_hot(argmax over the pool of the slot logits); the logits are kept."""
        self.head.hard_assignment.fill_(True)

    @property
    def is_assignment_hard(self) -> bool:
        """Whether `harden_assignment()` was called."""
        return bool(self.head.hard_assignment)

    @torch.no_grad()
    def deterministic_assignment(self) -> torch.Tensor:
        """The deterministic `(C, P, S)` assignment: softmax at the current scale, or one-hot once hardened.

        It is the `slot_assignment` of an eval-mode forward pass; in training mode the forward samples Gumbel noise.
        """
        return self.head.assignment(mode="softmax")
