"""What trains in each phase of ProtoPool's recipe, and at which learning rate.

| phase | trains | optimizer (Adam, L2 weight decay) | lr decay |
|---|---|---|---|
| warm-up | add-on, prototypes, slot logits | add-on 3·lr wd 1e-3; prototypes, slot logits 3·lr | |
| joint | + backbone | backbone lr/10 wd 1e-3 | StepLR(5, ×0.1) per epoch |
| fine-tuning | last layer only | lr/10 wd 1e-3 | ×0.95 every 5 epochs |

[`set_trainable`] freezes what a phase does not train, [`protopool_param_groups`] builds its optimizer's parameter
groups, and [`EpochStepDecay`] is the per-epoch step decay, as the official code (gmum/ProtoPool @ 2bd4288) does.
"""

from collections.abc import Mapping
from typing import Any

from torch import nn

from .backbone import leading_stage_parameters


__all__ = ["PHASES", "EpochStepDecay", "protopool_param_groups", "set_trainable"]

#: The Trainer phases of the recipe, in order (the projection runs between "joint" and "finetune").
PHASES = ("warmup", "joint", "finetune")
_PARAMETER_GROUPS = ("backbone", "add_on", "prototypes", "slot_logits", "last_layer")
_PHASE_GROUPS = {
    "warmup": ("add_on", "prototypes", "slot_logits"),
    "joint": ("backbone", "add_on", "prototypes", "slot_logits"),
    "finetune": ("last_layer",),
}
# (lr multiplier, uses weight decay) of each group, as the official optimizers.
_GROUP_SETTINGS = {
    "backbone": (0.1, True),
    "add_on": (3.0, True),
    "prototypes": (3.0, False),
    "slot_logits": (3.0, False),
    "last_layer": (0.1, True),
}


# --------------------------------------------------------------------------- parameters


def check_phase(phase: str) -> None:
    """Raise ValueError unless `phase` is one of [`PHASES`]."""
    if phase not in _PHASE_GROUPS:
        raise ValueError(f"Unknown phase {phase!r}: use one of {tuple(_PHASE_GROUPS)}.")


def _named_parameter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    head = model.head
    groups = {
        "backbone": list(model.backbone.parameters()),
        "add_on": list(head.add_on.parameters()),
        "prototypes": [head.prototypes],
        "slot_logits": [head.slot_logits],
        "last_layer": list(head.last_layer.parameters()),
    }
    covered = {id(p) for params in groups.values() for p in params}
    missing = [name for name, p in model.named_parameters() if id(p) not in covered]
    if missing:
        raise ValueError(f"Parameters outside ProtoPool's groups {_PARAMETER_GROUPS}: {missing[:5]}.")
    return groups


def set_trainable(model: nn.Module, phase: str, frozen_backbone_stages: int = 0) -> None:
    """Make exactly the parameters of `phase` trainable (`requires_grad`), every other parameter frozen.

    Call it before a `Trainer` wraps the model (`ProtoPoolTrainer(phase=...)` does): "warmup" trains the add-on,
    prototypes and slot logits; "joint" also the backbone; "finetune" only the last layer.

    Args:
        model: a `ProtoPoolForImageClassification`.
        phase: "warmup", "joint" or "finetune".
        frozen_backbone_stages: keep the stem and this many leading backbone stages frozen even when the phase
            trains the backbone (see `protopool_hf.backbone.leading_stage_parameters`); 0 (official) trains it all.

    Example:
        ```python
        >>> from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification
        >>> from protopool_hf.phases import set_trainable
        >>> config = ProtoPoolConfig(backbone="test_resnet", num_labels=2, num_prototypes=4, num_slots_per_class=2)
        >>> model = ProtoPoolForImageClassification(config)
        >>> set_trainable(model, "finetune")
        >>> [name for name, p in model.named_parameters() if p.requires_grad]
        ['head.last_layer.weight']

        ```
    """
    check_phase(phase)
    frozen_ids = {
        id(model.backbone.get_parameter(n)) for n in leading_stage_parameters(model.backbone, frozen_backbone_stages)
    }
    for name, params in _named_parameter_groups(model).items():
        for param in params:
            param.requires_grad_(name in _PHASE_GROUPS[phase] and id(param) not in frozen_ids)


def protopool_param_groups(
    model: nn.Module,
    lr: float,
    phase: str = "joint",
    weight_decay: float = 1e-3,
    group_lrs: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """The official optimizer parameter groups of a phase, for `torch.optim.Adam` (L2 weight decay).

    | group | lr | weight decay | phases |
    |---|---|---|---|
    | backbone | lr/10 | `weight_decay` | joint |
    | add_on | 3·lr | `weight_decay` | warmup, joint |
    | prototypes | 3·lr | 0 | warmup, joint |
    | slot_logits | 3·lr | 0 | warmup, joint |
    | last_layer | lr/10 | `weight_decay` | finetune |

    Args:
        model: a `ProtoPoolForImageClassification`.
        lr: the base learning rate (1e-3 in the official code).
        phase: "warmup", "joint" or "finetune".
        weight_decay: the L2 weight decay of the decayed groups (1e-3 in the official code).
        group_lrs: absolute learning rates that replace the table's for the named groups, e.g. `{"backbone": 1e-3}`.

    Returns:
        A list of `{"name", "params", "lr", "weight_decay"}` dicts (Adam keeps the extra "name" key).

    Example:
        ```python
        >>> import torch
        >>> from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification
        >>> from protopool_hf.phases import protopool_param_groups
        >>> config = ProtoPoolConfig(backbone="test_resnet", num_labels=2, num_prototypes=4, num_slots_per_class=2)
        >>> model = ProtoPoolForImageClassification(config)
        >>> groups = protopool_param_groups(model, 1e-3, "joint")
        >>> [(g["name"], g["lr"], g["weight_decay"]) for g in groups]  # doctest: +NORMALIZE_WHITESPACE
        [('backbone', 0.0001, 0.001), ('add_on', 0.003, 0.001), ('prototypes', 0.003, 0.0),
         ('slot_logits', 0.003, 0.0)]
        >>> optimizer = torch.optim.Adam(groups)

        ```
    """
    check_phase(phase)
    if not lr > 0:
        raise ValueError(f"The learning rate must be > 0, got {lr}.")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
    group_lrs = check_group_lrs(group_lrs)
    named = _named_parameter_groups(model)
    groups = []
    for name in _PHASE_GROUPS[phase]:
        factor, decays = _GROUP_SETTINGS[name]
        group_lr = group_lrs.get(name, lr * factor)
        groups.append(
            {"name": name, "params": named[name], "lr": group_lr, "weight_decay": weight_decay if decays else 0.0}
        )
    return groups


def check_group_lrs(group_lrs: Mapping[str, float] | None) -> dict[str, float]:
    """`group_lrs` as a dict, after checking that it names known groups with learning rates > 0."""
    group_lrs = dict(group_lrs or {})
    unknown = sorted(set(group_lrs) - set(_PARAMETER_GROUPS))
    if unknown:
        raise ValueError(f"group_lrs names unknown groups {unknown}: use any of {_PARAMETER_GROUPS}.")
    bad = {name: value for name, value in group_lrs.items() if not value > 0}
    if bad:
        raise ValueError(f"group_lrs must be > 0, got {bad}.")
    return group_lrs


# --------------------------------------------------------------------------- step decay


class EpochStepDecay:
    """`LambdaLR` factor `gamma ** (epoch // step_epochs)` from the optimizer-step count: StepLR stepped per epoch.

    A plain object (not a closure), so `LambdaLR.state_dict` saves it and a resumed run restores it.

    Args:
        steps_per_epoch: optimizer steps in one epoch.
        step_epochs: epochs between decays (5 in the official code).
        gamma: the decay factor (0.1 in the joint phase, 0.95 in fine-tuning).

    Example:
        ```python
        >>> from protopool_hf.phases import EpochStepDecay
        >>> decay = EpochStepDecay(steps_per_epoch=10, step_epochs=5, gamma=0.1)
        >>> decay(49), decay(50), round(decay(100), 6)
        (1.0, 0.1, 0.01)

        ```
    """

    def __init__(self, steps_per_epoch: int, step_epochs: int, gamma: float) -> None:
        if steps_per_epoch < 1 or step_epochs < 1 or not gamma > 0:
            raise ValueError(
                f"EpochStepDecay needs steps_per_epoch >= 1, step_epochs >= 1 and gamma > 0, got "
                f"{steps_per_epoch}, {step_epochs}, {gamma}."
            )
        self.steps_per_epoch = int(steps_per_epoch)
        self.step_epochs = int(step_epochs)
        self.gamma = float(gamma)

    def __call__(self, step: int) -> float:
        """The lr factor after `step` optimizer steps."""
        return self.gamma ** ((step // self.steps_per_epoch) // self.step_epochs)
