"""Training ProtoPool with transformers' `Trainer`: parameter groups, mixup, per-term logging and the whole recipe.

The official recipe (gmum/ProtoPool @ 2bd4288, DESIGN.md §4) in four phases:

| phase | trains | optimizer (Adam, L2 weight decay) | other |
|---|---|---|---|
| warm-up (9 epochs) | add-on, prototypes, slot logits | add-on 3·lr wd 1e-3; prototypes, slot logits 3·lr | backbone frozen |
| joint | + backbone | a fresh Adam; backbone lr/10 wd 1e-3; StepLR(5, ×0.1) per epoch | |
| projection | | | prototypes onto their nearest training patches; assignment made hard |
| fine-tuning (25 epochs) | last layer only | lr/10 wd 1e-3; ×0.95 every 5 epochs | loss CE + 1e-4·L1 |

Mixup (Beta(0.5, 0.5) on every training batch) and the Gumbel scale schedule run in the warm-up and joint phases;
mixup also in fine-tuning, as in the official code.

Each phase is its own `Trainer` run: the backbone is frozen or unfrozen *before* that phase's `Trainer` wraps the
model (DDP-safe, see `protopool_hf.callbacks`), and every phase gets a fresh optimizer as in the official code.
[`train_protopool`] runs the phases in order, writes each phase's checkpoints under `output_dir/<phase>/`, records a
finished phase with a marker file, and resumes an interrupted run in the phase it was in.
"""

import dataclasses
import gc
import json
import math
import os
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import EvalPrediction, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from .backbone import leading_stage_parameters
from .callbacks import (
    GumbelScheduleCallback,
    SetEpochCallback,
    WarmupCallback,
    _find_epoch_setter,
    sync_buffers_from_main,
    warn_if_scale_is_fixed,
)
from .hub import check_model_folder, save_pretrained_replacing
from .losses import LOSS_TERM_NAMES, weighted_total


__all__ = [
    "PHASES",
    "EpochStepDecay",
    "ProtoPoolRecipe",
    "ProtoPoolTrainer",
    "RecipeResult",
    "TrainingRecipeArguments",
    "compute_accuracy",
    "finish_distributed",
    "mixup_draw",
    "protopool_param_groups",
    "run_recipe",
    "set_trainable",
    "split_train_validation",
    "train_protopool",
]

#: The Trainer phases of the recipe, in order (the projection runs between "joint" and "finetune").
PHASES = ("warmup", "joint", "finetune")
_STAGES = ("warmup", "joint", "projection", "finetune")
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
_MARKER = "phase_complete.json"
_RECIPE_FILE = "protopool_recipe.json"


# --------------------------------------------------------------------------- parameters


def _check_phase(phase: str) -> None:
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
        >>> from protopool_hf.training import set_trainable
        >>> config = ProtoPoolConfig(backbone="test_resnet", num_labels=2, num_prototypes=4, num_slots_per_class=2)
        >>> model = ProtoPoolForImageClassification(config)
        >>> set_trainable(model, "finetune")
        >>> [name for name, p in model.named_parameters() if p.requires_grad]
        ['head.last_layer.weight']
        ```
    """
    _check_phase(phase)
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
        >>> from protopool_hf.training import protopool_param_groups
        >>> config = ProtoPoolConfig(backbone="test_resnet", num_labels=2, num_prototypes=4, num_slots_per_class=2)
        >>> model = ProtoPoolForImageClassification(config)
        >>> groups = protopool_param_groups(model, 1e-3, "joint")
        >>> [(g["name"], g["lr"], g["weight_decay"]) for g in groups]  # doctest: +NORMALIZE_WHITESPACE
        [('backbone', 0.0001, 0.001), ('add_on', 0.003, 0.001), ('prototypes', 0.003, 0.0),
         ('slot_logits', 0.003, 0.0)]
        >>> optimizer = torch.optim.Adam(groups)
        ```
    """
    _check_phase(phase)
    if not lr > 0:
        raise ValueError(f"The learning rate must be > 0, got {lr}.")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
    group_lrs = _check_group_lrs(group_lrs)
    named = _named_parameter_groups(model)
    groups = []
    for name in _PHASE_GROUPS[phase]:
        factor, decays = _GROUP_SETTINGS[name]
        group_lr = group_lrs.get(name, lr * factor)
        groups.append(
            {"name": name, "params": named[name], "lr": group_lr, "weight_decay": weight_decay if decays else 0.0}
        )
    return groups


def _check_group_lrs(group_lrs: Mapping[str, float] | None) -> dict[str, float]:
    group_lrs = dict(group_lrs or {})
    unknown = sorted(set(group_lrs) - set(_PARAMETER_GROUPS))
    if unknown:
        raise ValueError(f"group_lrs names unknown groups {unknown}: use any of {_PARAMETER_GROUPS}.")
    bad = {name: value for name, value in group_lrs.items() if not value > 0}
    if bad:
        raise ValueError(f"group_lrs must be > 0, got {bad}.")
    return group_lrs


# --------------------------------------------------------------------------- schedule and mixup


class EpochStepDecay:
    """`LambdaLR` factor `gamma ** (epoch // step_epochs)` from the optimizer-step count: StepLR stepped per epoch.

    A plain object (not a closure), so `LambdaLR.state_dict` saves it and a resumed run restores it.

    Args:
        steps_per_epoch: optimizer steps in one epoch.
        step_epochs: epochs between decays (5 in the official code).
        gamma: the decay factor (0.1 in the joint phase, 0.95 in fine-tuning).

    Example:
        ```python
        >>> from protopool_hf.training import EpochStepDecay
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


def mixup_draw(alpha: float, batch_size: int, seed: int, *keys: int) -> tuple[float, np.ndarray]:
    """Draw mixup's λ ~ Beta(alpha, alpha) and a permutation of the batch from a seed and integer keys.

    The draw depends only on `(seed, *keys)` (the Trainer uses the global step, the micro-batch within gradient
    accumulation and the process index), so a resumed run draws exactly what the uninterrupted run drew.

    Args:
        alpha: the Beta parameter (> 0; the official code uses 0.5).
        batch_size: N.
        seed: the base seed.
        *keys: further non-negative integers.

    Returns:
        `(lam, permutation)` with `permutation` an `(N,)` int64 array.

    Example:
        ```python
        >>> from protopool_hf.training import mixup_draw
        >>> lam, perm = mixup_draw(0.5, 4, 0, 7)
        >>> 0 <= lam <= 1, sorted(perm.tolist())
        (True, [0, 1, 2, 3])
        ```
    """
    if not alpha > 0:
        raise ValueError(f"mixup alpha must be > 0 to draw, got {alpha}.")
    rng = np.random.default_rng([int(seed) % 2**63, *(int(k) for k in keys)])
    lam = float(rng.beta(alpha, alpha))
    return lam, rng.permutation(batch_size)


# --------------------------------------------------------------------------- trainer


class ProtoPoolTrainer(Trainer):
    """A `Trainer` for ProtoPool: mixup, the loss terms in the logs, the official optimizer of a phase.

    - **Mixup** (`mixup_alpha > 0`, training only, as the official code): every training batch is mixed with a
      permutation of itself, x = λ·x + (1 − λ)·x[perm], λ ~ Beta(alpha, alpha); the loss uses CE on the mixed
      targets, λ·CE(y) + (1 − λ)·CE(y[perm]), and cluster/separation on the original labels. λ and the permutation
      come from (seed, global step, micro-batch, process), so a resumed run mixes exactly as before.
      Evaluation never mixes.
    - **Logs**: each unweighted loss term (`cross_entropy`, `cluster`, `separation`, `orthogonality`, `l1`) averaged
      over the logging window like `loss`, and the current `gumbel_scale`; evaluation adds `eval_cross_entropy`,
      ... averaged over the evaluation set.
    - **Phase** (`phase="warmup" | "joint" | "finetune"`): freezes every parameter outside the phase when the trainer
      is created (before any DDP wrap) and builds `torch.optim.Adam(protopool_param_groups(model, lr, phase, wd))`
      with `args.learning_rate` as the base lr and `args.weight_decay` as the decay of the add-on, backbone and last
      layer (the official 1e-3: set `TrainingArguments(weight_decay=1e-3)`; prototypes and slot logits get none).
    - **Per-epoch step decay** (`lr_step_epochs`, `lr_step_gamma`): the official StepLR, stepped per epoch.
    - A model with a soft assignment trained without a [`GumbelScheduleCallback`] warns once per `train()`.

    Args:
        *args: `Trainer`'s positional arguments (model, args, ...).
        mixup_alpha: Beta(alpha, alpha) mixup; 0 turns it off.
        mixup_seed: the base seed of the mixup draws; defaults to `args.seed`.
        phase: build the phase's optimizer and freeze the other parameters; None keeps the Trainer's behaviour.
        loss_terms: the terms that make up the loss (default all; fine-tuning uses `("cross_entropy", "l1")`).
        lr_step_epochs: multiply the lr by `lr_step_gamma` every this many epochs (replaces `lr_scheduler_type`).
        lr_step_gamma: the factor of that decay.
        group_lrs: absolute learning rates of named parameter groups that replace the official factors of
            `args.learning_rate` (see `protopool_param_groups`), e.g. `{"backbone": 1e-3}`.
        frozen_backbone_stages: with a `phase`, keep the backbone's stem and this many leading stages frozen
            (see `set_trainable`); 0, the official choice, trains the whole backbone in the joint phase.
        **kwargs: `Trainer`'s keyword arguments.

    Example:
        ```python
        >>> import torch
        >>> from transformers import TrainingArguments
        >>> from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification
        >>> from protopool_hf.callbacks import GumbelScheduleCallback
        >>> from protopool_hf.training import ProtoPoolTrainer
        >>> config = ProtoPoolConfig(backbone="test_resnet", num_labels=2, num_prototypes=4, num_slots_per_class=2)
        >>> model = ProtoPoolForImageClassification(config)
        >>> args = TrainingArguments(
        ...     "out", use_cpu=True, report_to="none", remove_unused_columns=False, label_names=["labels"],
        ...     weight_decay=1e-3, lr_scheduler_type="constant", max_grad_norm=0.0,
        ... )  # fmt: skip
        >>> trainer = ProtoPoolTrainer(
        ...     model=model, args=args, callbacks=[GumbelScheduleCallback()], phase="joint", mixup_alpha=0.5,
        ...     lr_step_epochs=5,
        ... )  # fmt: skip
        >>> [group["name"] for group in trainer.create_optimizer().param_groups]
        ['backbone', 'add_on', 'prototypes', 'slot_logits']
        >>> batch = {"pixel_values": torch.randn(4, 3, 160, 160), "labels": torch.tensor([0, 1, 1, 0])}
        >>> trainer.compute_loss(model.train(), batch).shape  # a mixed batch
        torch.Size([])
        >>> trainer.train()  # with train_dataset=..., data_collator=protopool_hf.transforms.collate_fn  # doctest: +SKIP
        ```
    """

    def __init__(
        self,
        *args: Any,
        mixup_alpha: float = 0.0,
        mixup_seed: int | None = None,
        phase: str | None = None,
        loss_terms: Sequence[str] | None = None,
        lr_step_epochs: int | None = None,
        lr_step_gamma: float = 0.1,
        group_lrs: Mapping[str, float] | None = None,
        frozen_backbone_stages: int = 0,
        **kwargs: Any,
    ) -> None:
        group_lrs = _check_group_lrs(group_lrs)
        if mixup_alpha < 0:
            raise ValueError(f"mixup_alpha must be >= 0 (0 turns mixup off), got {mixup_alpha}.")
        if phase is not None:
            _check_phase(phase)
        if frozen_backbone_stages and phase is None:
            raise ValueError("frozen_backbone_stages acts through `phase`: pass phase='joint' as well.")
        if loss_terms is not None:
            unknown = sorted(set(loss_terms) - set(LOSS_TERM_NAMES))
            if unknown or not loss_terms:
                raise ValueError(f"loss_terms must be a non-empty subset of {LOSS_TERM_NAMES}, got {loss_terms}.")
        if lr_step_epochs is not None and (lr_step_epochs < 1 or not lr_step_gamma > 0):
            raise ValueError(
                f"lr_step_epochs must be >= 1 and lr_step_gamma > 0, got {lr_step_epochs}, {lr_step_gamma}."
            )
        super().__init__(*args, **kwargs)
        self.mixup_alpha = float(mixup_alpha)
        self.mixup_seed = mixup_seed
        self.phase = phase
        self.loss_term_names = tuple(loss_terms) if loss_terms is not None else None
        self.lr_step_epochs = lr_step_epochs
        self.lr_step_gamma = float(lr_step_gamma)
        self.group_lrs = group_lrs
        self._update_steps_per_epoch: int | None = None
        self._mixup_step = -1
        self._mixup_micro = 0
        self._term_sums = {"train": self._zero_terms(), "eval": self._zero_terms()}
        if phase is not None:
            set_trainable(self.model, phase, frozen_backbone_stages)

    # ---------------------------------------------------------------- optimizer and scheduler
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """With a `phase`: Adam over `protopool_param_groups(model, args.learning_rate, phase, ..., group_lrs)`."""
        if self.optimizer is None and self.phase is not None:
            groups = protopool_param_groups(
                self.model, self.args.learning_rate, self.phase, self.args.weight_decay, self.group_lrs
            )
            self.optimizer = torch.optim.Adam(groups)
        return super().create_optimizer(model)

    def set_initial_training_values(self, args: TrainingArguments, dataloader: Any) -> tuple:
        """`Trainer.set_initial_training_values`, remembering the optimizer steps per epoch for the step decay."""
        values = super().set_initial_training_values(args, dataloader)
        self._update_steps_per_epoch = values[1]
        return values

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        """With `lr_step_epochs`: the official per-epoch StepLR as a `LambdaLR` over optimizer steps."""
        if self.lr_scheduler is None and self.lr_step_epochs is not None:
            steps_per_epoch = self._update_steps_per_epoch
            if steps_per_epoch is None:
                steps_per_epoch = max(1, math.ceil(num_training_steps / max(self.args.num_train_epochs, 1)))
            decay = EpochStepDecay(steps_per_epoch, self.lr_step_epochs, self.lr_step_gamma)
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, decay)
            self._created_lr_scheduler = True
            return self.lr_scheduler
        return super().create_scheduler(num_training_steps, optimizer)

    # ---------------------------------------------------------------- training
    def train(self, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.train`, warning first if a soft-assignment model has no Gumbel schedule.

        Under DDP, every process ends with the main process's BatchNorm statistics (DDP only syncs buffers at the
        start of each forward), so the replicas are equal when `train` returns.
        """
        warn_if_scale_is_fixed(self.model, self.callback_handler.callbacks)
        output = super().train(*args, **kwargs)
        sync_buffers_from_main(self.model)
        return output

    def _draw_mixup(self, batch_size: int) -> tuple[float, np.ndarray]:
        step = self.state.global_step
        if step != self._mixup_step:
            self._mixup_step, self._mixup_micro = step, 0
        micro = self._mixup_micro
        self._mixup_micro += 1
        seed = self.args.seed if self.mixup_seed is None else self.mixup_seed
        return mixup_draw(self.mixup_alpha, batch_size, seed, step, micro, self.args.process_index)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """ProtoPool's loss: mixup in training when `mixup_alpha > 0`, the selected terms, their running sums."""
        labels = inputs.get("labels")
        if labels is None or "pixel_values" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        protopool = self.accelerator.unwrap_model(model)
        pixel_values = inputs["pixel_values"]
        extra = {k: v for k, v in inputs.items() if k not in ("pixel_values", "labels")}
        training = model.training
        if training and self.mixup_alpha > 0:
            lam, perm = self._draw_mixup(len(labels))
            perm = torch.as_tensor(perm, device=labels.device)
            mixed = lam * pixel_values + (1 - lam) * pixel_values[perm]
            outputs = model(pixel_values=mixed, **extra)
            terms = protopool.loss_terms(outputs, labels, labels[perm], lam)
            loss = None
        else:
            outputs = model(pixel_values=pixel_values, labels=labels, **extra)
            terms, loss = outputs.loss_terms, outputs.loss
        if self.loss_term_names is not None:
            terms = {name: terms[name] for name in self.loss_term_names}
            loss = None
        if loss is None:
            loss = weighted_total(terms, protopool.loss_weights)
            outputs["loss"] = loss
            outputs["loss_terms"] = terms
        self._record_terms(terms, "train" if training else "eval", len(labels))
        return (loss, outputs) if return_outputs else loss

    # ---------------------------------------------------------------- term logging
    def _zero_terms(self) -> torch.Tensor:
        # The sums of the terms in LOSS_TERM_NAMES order, then the count.
        return torch.zeros(len(LOSS_TERM_NAMES) + 1, dtype=torch.float64, device=self.args.device)

    def _record_terms(self, terms: dict[str, torch.Tensor], mode: str, batch_size: int) -> None:
        # Training: the mean over micro-batches, like `loss`; evaluation: the mean over images.
        weight = 1.0 if mode == "train" else float(batch_size)
        values = [terms[n].detach().double() * weight if n in terms else 0.0 for n in LOSS_TERM_NAMES]
        increment = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.args.device) for v in values])
        sums = self._term_sums[mode]
        sums[:-1] += increment
        sums[-1] += weight

    def _drain_terms(self, mode: str) -> dict[str, float]:
        sums = self._term_sums[mode]
        self._term_sums[mode] = self._zero_terms()
        if self.args.world_size > 1:
            sums = self.accelerator.reduce(sums.clone(), reduction="sum")
        count = float(sums[-1])
        if count == 0:
            return {}
        names = self.loss_term_names or LOSS_TERM_NAMES
        return {name: float(sums[i]) / count for i, name in enumerate(LOSS_TERM_NAMES) if name in names}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """`Trainer.log`; a training log (the one with `loss`) also gets the loss terms and the Gumbel scale."""
        if "loss" in logs:
            logs.update(self._drain_terms("train"))
            model = self.accelerator.unwrap_model(self.model)
            if hasattr(model, "is_assignment_hard") and not model.is_assignment_hard:
                logs["gumbel_scale"] = model.gumbel_scale
        super().log(logs, start_time)

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> Any:
        """`Trainer.evaluation_loop`, adding `<prefix>_<term>` metrics averaged over the evaluated images."""
        self._term_sums["eval"] = self._zero_terms()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        for name, value in self._drain_terms("eval").items():
            output.metrics[f"{metric_key_prefix}_{name}"] = value
        return output


# --------------------------------------------------------------------------- recipe


@dataclass
class ProtoPoolRecipe:
    """The hyperparameters of [`train_protopool`]: the official recipe by default.

    The official epoch count was never published; the default 9 warm-up + 21 joint epochs make the main phase as
    long as the Gumbel schedule (T = 30 epochs), and StepLR(5, ×0.1) has all but stopped learning by then.

    Args:
        output_dir: where phases write `<phase>/checkpoint-*` and the final projected model is saved.
        warmup_epochs: epochs with the backbone frozen (the official 9).
        joint_epochs: epochs training everything but the last layer.
        finetune_epochs: last-layer epochs after the projection (the official 25).
        learning_rate: the base lr; groups use 3·lr (head) and lr/10 (backbone, last layer).
        backbone_learning_rate: the backbone's lr in the joint phase; None: the official `learning_rate / 10`.
        frozen_backbone_stages: keep the backbone's stem and this many leading stages (timm's `feature_info`)
            frozen in the joint phase, which saves their backward pass; 0 (official) trains the whole backbone.
        finetune_learning_rate: the last layer's lr in fine-tuning; None: the official `learning_rate / 10`.
        weight_decay: L2 weight decay of the add-on, backbone and last layer.
        joint_lr_step_epochs: the joint phase's StepLR step, in epochs (5).
        joint_lr_gamma: the joint phase's StepLR factor (0.1).
        finetune_lr_step_epochs: fine-tuning's decay step, in epochs (5).
        finetune_lr_gamma: fine-tuning's decay factor (0.95).
        train_batch_size: per-device training batch size (80 in the official code).
        eval_batch_size: per-device evaluation batch size.
        projection_batch_size: per-device projection batch size.
        gradient_accumulation_steps: micro-batches per optimizer step.
        mixup_alpha: Beta(alpha, alpha) mixup in every training phase; 0 turns it off.
        gumbel_per_step: update the Gumbel scale before every step (fractional epoch) instead of every epoch.
        freeze_bn_during_warmup: keep the frozen backbone in eval mode in the warm-up (the official code lets its
            BatchNorm statistics update).
        freeze_bn_during_finetune: keep the frozen backbone in eval mode in fine-tuning, so the projected prototypes
            stay the exact latent patches they were projected on (the official code lets the statistics drift).
        eval_strategy: when to evaluate ("no", "epoch" or "steps").
        eval_steps: steps between evaluations with `eval_strategy="steps"`.
        save_strategy: when to checkpoint ("no", "epoch" or "steps").
        save_steps: steps between checkpoints with `save_strategy="steps"`.
        save_total_limit: checkpoints kept per phase (the best one is always kept).
        load_best_model_at_end: select the joint and fine-tuning models on the validation split.
        metric_for_best_model: the metric of that selection (`compute_metrics` must produce it).
        logging_steps: optimizer steps per training log.
        seed: seeds everything (phase k uses seed + k, so phases draw different data orders and mixups).
        num_workers: DataLoader workers.
        use_cpu: train on the CPU even if an accelerator is present.
        bf16: bf16 autocast (distances and similarities stay in float32).
        disable_tqdm: turn progress bars off (None: the Trainer's default).
        training_args: further `TrainingArguments` fields, e.g. `{"dataloader_persistent_workers": True}`.

    Example:
        ```python
        >>> from protopool_hf.training import ProtoPoolRecipe
        >>> recipe = ProtoPoolRecipe(output_dir="runs/cub", warmup_epochs=9, joint_epochs=21, mixup_alpha=0.5)
        >>> recipe.finetune_epochs, recipe.learning_rate
        (25, 0.001)
        ```
    """

    output_dir: str = "protopool-output"
    warmup_epochs: int = 9
    joint_epochs: int = 21
    finetune_epochs: int = 25
    learning_rate: float = 1e-3
    backbone_learning_rate: float | None = None
    frozen_backbone_stages: int = 0
    finetune_learning_rate: float | None = None
    weight_decay: float = 1e-3
    joint_lr_step_epochs: int = 5
    joint_lr_gamma: float = 0.1
    finetune_lr_step_epochs: int = 5
    finetune_lr_gamma: float = 0.95
    train_batch_size: int = 80
    eval_batch_size: int = 80
    projection_batch_size: int = 80
    gradient_accumulation_steps: int = 1
    mixup_alpha: float = 0.5
    gumbel_per_step: bool = False
    freeze_bn_during_warmup: bool = False
    freeze_bn_during_finetune: bool = True
    eval_strategy: str = "epoch"
    eval_steps: int | None = None
    save_strategy: str = "epoch"
    save_steps: int | None = None
    save_total_limit: int | None = 2
    load_best_model_at_end: bool = True
    metric_for_best_model: str = "accuracy"
    logging_steps: int = 10
    seed: int = 0
    num_workers: int = 0
    use_cpu: bool = False
    bf16: bool = False
    disable_tqdm: bool | None = None
    training_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Check every field; raise ValueError naming the field."""
        for name in ("warmup_epochs", "joint_epochs", "finetune_epochs", "frozen_backbone_stages"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an int >= 0, got {getattr(self, name)!r}.")
        if self.warmup_epochs + self.joint_epochs < 1:
            raise ValueError(
                "warmup_epochs + joint_epochs must be >= 1: the prototypes need training before projection."
            )
        for name in ("learning_rate", "joint_lr_gamma", "finetune_lr_gamma"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}.")
        for name in ("backbone_learning_rate", "finetune_learning_rate"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 or None, got {getattr(self, name)!r}.")
        for name in (
            "joint_lr_step_epochs", "finetune_lr_step_epochs", "train_batch_size", "eval_batch_size",
            "projection_batch_size", "gradient_accumulation_steps", "logging_steps",
        ):  # fmt: skip
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}.")
        if self.weight_decay < 0 or self.mixup_alpha < 0 or self.num_workers < 0:
            raise ValueError(
                "weight_decay, mixup_alpha and num_workers must be >= 0, got "
                f"{self.weight_decay}, {self.mixup_alpha}, {self.num_workers}."
            )
        for name in ("eval_strategy", "save_strategy"):
            if getattr(self, name) not in ("no", "epoch", "steps"):
                raise ValueError(f"{name} must be 'no', 'epoch' or 'steps', got {getattr(self, name)!r}.")
        reserved = {"output_dir", "num_train_epochs", "learning_rate", "seed", "remove_unused_columns", "label_names"}
        clash = sorted(reserved & set(self.training_args))
        if clash:
            raise ValueError(f"training_args may not set {clash}: use the recipe's own fields.")

    def phase_epochs(self, phase: str) -> int:
        """The epochs of a Trainer phase."""
        _check_phase(phase)
        return {"warmup": self.warmup_epochs, "joint": self.joint_epochs, "finetune": self.finetune_epochs}[phase]

    def epoch_offset(self, phase: str) -> int:
        """Epochs trained before `phase`: the Gumbel schedule and the augmentation continue counting from here."""
        offsets = {"warmup": 0, "joint": self.warmup_epochs, "finetune": self.warmup_epochs + self.joint_epochs}
        return offsets[phase]

    def phase_group_lrs(self, phase: str) -> dict[str, float]:
        """The absolute group learning rates of a phase that replace the official factors (`ProtoPoolTrainer`)."""
        _check_phase(phase)
        if phase == "joint" and self.backbone_learning_rate is not None:
            return {"backbone": self.backbone_learning_rate}
        if phase == "finetune" and self.finetune_learning_rate is not None:
            return {"last_layer": self.finetune_learning_rate}
        return {}

    def training_arguments(self, phase: str, evaluate: bool = True) -> TrainingArguments:
        """The `TrainingArguments` of a phase (its folder is `output_dir/<phase>`).

        Args:
            phase: "warmup", "joint" or "finetune".
            evaluate: whether an evaluation split is given (without one: no evaluation, no model selection).
        """
        _check_phase(phase)
        evaluate = evaluate and self.eval_strategy != "no"
        select = evaluate and self.load_best_model_at_end and phase != "warmup" and self.save_strategy != "no"
        kwargs: dict[str, Any] = {
            "output_dir": str(Path(self.output_dir) / phase),
            "num_train_epochs": self.phase_epochs(phase),
            "per_device_train_batch_size": self.train_batch_size,
            "per_device_eval_batch_size": self.eval_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "learning_rate": self.learning_rate,
            "weight_decay": self.weight_decay,  # of the decayed groups only (protopool_param_groups)
            "lr_scheduler_type": "constant",
            "max_grad_norm": 0.0,  # the official code does not clip gradients
            "eval_strategy": self.eval_strategy if evaluate else "no",
            "save_strategy": self.save_strategy,
            "save_total_limit": self.save_total_limit,
            "load_best_model_at_end": select,
            "logging_strategy": "steps",
            "logging_steps": self.logging_steps,
            "seed": self.seed + PHASES.index(phase),
            "dataloader_num_workers": self.num_workers,
            "use_cpu": self.use_cpu,
            "bf16": self.bf16,
            "report_to": "none",
            "remove_unused_columns": False,
            "label_names": ["labels"],
            "ddp_find_unused_parameters": False,
        }
        if select:
            kwargs["metric_for_best_model"] = self.metric_for_best_model
        if self.eval_steps is not None:
            kwargs["eval_steps"] = self.eval_steps
        if self.save_steps is not None:
            kwargs["save_steps"] = self.save_steps
        if self.disable_tqdm is not None:
            kwargs["disable_tqdm"] = self.disable_tqdm
        kwargs.update(self.training_args)
        return TrainingArguments(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as a JSON-serialisable dict."""
        return dataclasses.asdict(self)


#: The recipe's arguments under the `*Arguments` name of transformers' `TrainingArguments`.
TrainingRecipeArguments = ProtoPoolRecipe


@dataclass
class RecipeResult:
    """What [`train_protopool`] returns.

    Attributes:
        model: the trained, projected, fine-tuned model (also saved in `output_dir`).
        output_dir: the folder holding the final model and the phases' checkpoints.
        metrics: per phase, the evaluation metrics of its final (selected) model, when an evaluation split was given.
        projection: the `ProjectionResult` of the projection, or None when a resumed run found it already done.

    Example:
        ```python
        >>> result = train_protopool(model, train_ds, val_ds, push_ds, recipe)  # doctest: +SKIP
        >>> result.metrics["finetune"]["eval_accuracy"], result.projection.unused  # doctest: +SKIP
        (0.84, [3, 17])
        ```
    """

    model: Any
    output_dir: str
    metrics: dict[str, dict[str, float]]
    projection: Any = None


def compute_accuracy(eval_pred: EvalPrediction) -> dict[str, float]:
    """Top-1 accuracy for `Trainer(compute_metrics=...)`: `{"accuracy": ...}` from the logits."""
    logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
    labels = eval_pred.label_ids
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}


def _distributed() -> tuple[bool, Callable[[], None]]:
    """(is this the main process, a barrier) for the current process group, if any."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from accelerate import PartialState

        state = PartialState()
        return state.is_main_process, state.wait_for_everyone
    return True, lambda: None


def _check_class_names(config: Any, dataset: Any, argument: str) -> None:
    """Refuse a dataset whose `ClassLabel` names disagree with `config.id2label`, before anything is trained.

    Datasets without a `ClassLabel` `label` column are not checked; neither are names when either side has only
    placeholder names (the config's `LABEL_i`, or `"0"`, `"1"`, ... from integer labels).
    """
    features = getattr(dataset, "features", None)
    names = getattr(features.get("label"), "names", None) if isinstance(features, dict) else None
    if not names:
        return
    expected = [str(config.id2label[i]) for i in range(config.num_labels)]
    placeholder = names == [str(i) for i in range(len(names))]
    if len(names) != len(expected) and not (placeholder and len(names) < len(expected)):
        raise ValueError(
            f"`{argument}` has {len(names)} classes but the model has num_labels={len(expected)}: build the config "
            f"from the dataset (id2label=dict(enumerate(dataset.features['label'].names))) or pass the dataset the "
            "model was made for."
        )
    if placeholder or expected == [f"LABEL_{i}" for i in range(len(expected))]:
        return
    wrong = next((i for i, (a, b) in enumerate(zip(names, expected, strict=True)) if a != b), None)
    if wrong is not None:
        raise ValueError(
            f"`{argument}` calls class {wrong} {names[wrong]!r} but the model's id2label[{wrong}] is "
            f"{expected[wrong]!r}: its labels would train the wrong classes. Build the config from the dataset "
            "(id2label=dict(enumerate(dataset.features['label'].names))) or pass the dataset the model was made for."
        )


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _save_model_atomic(model: nn.Module, folder: Path) -> None:
    """`save_pretrained` into a sibling folder, then swap it in: the folder holds one complete model or none."""
    tmp = folder.with_name(folder.name + ".tmp")
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def _load_stage_model(model: nn.Module, folder: Path) -> None:
    """Load the weights (and projection provenance) a finished stage saved in `folder`."""
    from safetensors.torch import load_file

    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(
            f"{weights} is missing although its phase is marked complete; delete {folder.parent / _MARKER} to rerun "
            "that phase."
        )
    device = next(model.parameters()).device
    model.load_state_dict(load_file(str(weights), device=str(device)), strict=True)
    config_file = folder / "config.json"
    if config_file.is_file():
        saved = json.loads(config_file.read_text())
        for key in ("projection_dataset", "projection_input_size"):
            if key in saved:
                setattr(model.config, key, saved[key])


def _checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob("checkpoint-*")) if folder.is_dir() else []


def _resume_plan(
    output_dir: Path, resume_from_checkpoint: str | bool | None, overwrite: bool = False
) -> tuple[set[str], str | None, str | None]:
    """(completed stages, the phase to resume, its checkpoint) from the markers and the resume argument.

    Starting afresh with `overwrite` ignores a previous run (the caller removes it).
    """
    completed = {stage for stage in _STAGES if (output_dir / stage / _MARKER).is_file()}
    prefix = set()
    for stage in _STAGES:
        if stage not in completed:
            break
        prefix.add(stage)
    if completed != prefix and not (overwrite and not resume_from_checkpoint):
        raise ValueError(
            f"{output_dir} has phase markers out of order ({sorted(completed)}): it was not written by one run of "
            "train_protopool. Use a fresh output_dir."
        )
    if not resume_from_checkpoint:
        leftovers = completed or any(_checkpoints(output_dir / phase) for phase in PHASES)
        if leftovers and not overwrite:
            raise ValueError(
                f"{output_dir} holds a previous run (finished phases {sorted(completed)} or checkpoints): pass "
                "resume_from_checkpoint=True to continue it, overwrite=True to start afresh (the previous run is "
                "deleted), or choose another output_dir."
            )
        return set(), None, None
    if resume_from_checkpoint is True:
        current = next((s for s in _STAGES if s not in completed), None)
        if current not in PHASES:
            return completed, None, None
        last = get_last_checkpoint(str(output_dir / current)) if (output_dir / current).is_dir() else None
        return completed, current, last
    checkpoint = Path(resume_from_checkpoint)
    if not (checkpoint / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{checkpoint} is not a Trainer checkpoint (no trainer_state.json).")
    phase = checkpoint.resolve().parent.name
    if phase not in PHASES or checkpoint.resolve().parent.parent != output_dir.resolve():
        raise ValueError(f"{checkpoint} is not a checkpoint of a phase of {output_dir} (<output_dir>/<phase>/...).")
    if phase in completed:
        raise ValueError(f"Phase {phase!r} of {output_dir} is already complete; resume with True instead.")
    missing = [s for s in _STAGES[: _STAGES.index(phase)] if s not in completed]
    if missing:
        raise ValueError(f"Cannot resume {phase!r} from {checkpoint}: the earlier phases {missing} are not complete.")
    return completed, phase, str(checkpoint)


def train_protopool(
    model: nn.Module,
    train_dataset: Any,
    eval_dataset: Any,
    projection_dataset: Any,
    recipe: ProtoPoolRecipe | None = None,
    *,
    data_collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]] | None = None,
    compute_metrics: Callable[[EvalPrediction], dict[str, float]] | None = compute_accuracy,
    callbacks: Sequence[TrainerCallback] = (),
    resume_from_checkpoint: str | bool | None = None,
    projection_dataset_name: str | None = None,
    test_dataset: Any = None,
    overwrite: bool = False,
) -> RecipeResult:
    """Run the whole ProtoPool recipe with `Trainer`: warm-up, joint, projection, last-layer fine-tuning.

    1. **warm-up** (`recipe.warmup_epochs`): backbone and last layer frozen; add-on, prototypes, slot logits train.
    2. **joint** (`recipe.joint_epochs`): a fresh `Trainer` and Adam; the backbone trains at lr/10 (or
       `recipe.backbone_learning_rate`; its stem and first `recipe.frozen_backbone_stages` stages stay frozen);
       StepLR(5, 0.1).
       With an evaluation split, the best epoch on it is kept (`load_best_model_at_end`).
    3. **projection**: each prototype moves onto its nearest latent patch of `projection_dataset` (the training
       images with the *eval* transform); the assignment becomes hard.
    4. **fine-tuning** (`recipe.finetune_epochs`): only the last layer, CE + 1e-4·L1, lr/10 (or
       `recipe.finetune_learning_rate`), ×0.95 every 5 epochs.

    The Gumbel scale follows the schedule over warm-up and joint epochs together, mixup runs in every phase
    (`recipe.mixup_alpha`), seeded augmentation (`protopool_hf.transforms.make_transforms`) gets the global epoch. Model
    selection uses `eval_dataset` only: pass a validation split carved from the training data
    ([`split_train_validation`]), never the test split.

    Each phase checkpoints into `output_dir/<phase>/`; a finished phase saves its model into `<phase>/final` and
    writes `<phase>/phase_complete.json`. With `resume_from_checkpoint=True` completed phases are skipped and the
    phase in progress continues from its last checkpoint with the same optimizer, scheduler, RNG, data order,
    augmentation, mixup and Gumbel scale: on the CPU with a fixed seed the final weights equal an uninterrupted
    run's. The final model is saved to `output_dir` with `save_pretrained`, replacing a model saved there only with
    `overwrite=True`, in one atomic swap that drops the old model's card and pictures. Under DDP (`torchrun`, `accelerate
    launch`) call it on every process; end the script with [`finish_distributed`].

    Args:
        model: a `ProtoPoolForImageClassification`.
        train_dataset: training examples `{"pixel_values", "labels"}` (augmented), e.g. a `datasets.Dataset` with
            `make_transforms(config, train=True)`.
        eval_dataset: the validation split (eval transform), or None for no evaluation and no model selection.
        projection_dataset: the training images with the eval transform, for the projection.
        recipe: the hyperparameters; defaults to `ProtoPoolRecipe()`.
        data_collator: batches examples; defaults to `protopool_hf.transforms.collate_fn`.
        compute_metrics: evaluation metrics; must produce `recipe.metric_for_best_model` (default accuracy).
        callbacks: extra callbacks added to every phase's `Trainer`.
        resume_from_checkpoint: True continues the run in `output_dir`; a path `output_dir/<phase>/checkpoint-N`
            continues that phase from that checkpoint; None/False starts afresh (and refuses a non-empty run folder).
        projection_dataset_name: provenance recorded with the projection; by default a `datasets.Dataset`'s name,
            else its fingerprint.
        test_dataset: the test split (eval transform), evaluated once with the final model: `metrics["test"]`
            holds `test_*` metrics. Its class names must be the training split's.
        overwrite: replace a model already saved in `output_dir` (config.json, weights, card, prototypes/) and start
            afresh over a previous run's phases; without it such a folder is refused before anything is done.

    Returns:
        A [`RecipeResult`].

    Example:
        ```python
        >>> recipe = ProtoPoolRecipe(output_dir="runs/fmnist", warmup_epochs=2, joint_epochs=4, finetune_epochs=2)
        >>> result = train_protopool(model, train_ds, val_ds, push_ds, recipe)  # doctest: +SKIP
        >>> result.model.is_assignment_hard  # doctest: +SKIP
        True
        ```
    """
    from .transforms import collate_fn

    recipe = recipe if recipe is not None else ProtoPoolRecipe()
    if train_dataset is None or projection_dataset is None:
        raise ValueError(
            "train_protopool needs train_dataset and projection_dataset (the training images with the eval "
            "transform, make_transforms(config, train=False))."
        )
    if not hasattr(model, "harden_assignment"):
        raise TypeError(f"train_protopool needs a ProtoPoolForImageClassification, got {type(model).__name__}.")
    if model.config.num_labels < 2:
        raise ValueError(
            f"The model has num_labels={model.config.num_labels} ({list(model.config.id2label.values())}): a "
            "classifier needs at least two classes to learn anything. Give the dataset two or more classes (an "
            "image folder: one sub-folder per class)."
        )
    for argument, dataset in (
        ("train_dataset", train_dataset),
        ("eval_dataset", eval_dataset),
        ("projection_dataset", projection_dataset),
        ("test_dataset", test_dataset),
    ):
        _check_class_names(model.config, dataset, argument)
    try:  # fail before the warm-up, not when the joint phase starts
        leading_stage_parameters(model.backbone, recipe.frozen_backbone_stages)
    except ValueError as error:
        raise ValueError(f"ProtoPoolRecipe.frozen_backbone_stages={recipe.frozen_backbone_stages}: {error}") from None
    output_dir = Path(recipe.output_dir)
    data_collator = data_collator or collate_fn
    evaluate = eval_dataset is not None
    # Creating TrainingArguments sets up the process group under torchrun / accelerate launch.
    recipe.training_arguments("warmup", evaluate)
    is_main, barrier = _distributed()

    if not resume_from_checkpoint:  # a model in the folder is replaced only when asked
        check_model_folder(output_dir, overwrite)
    completed, resume_phase, resume_checkpoint = _resume_plan(output_dir, resume_from_checkpoint, overwrite)
    if resume_from_checkpoint and not completed and resume_checkpoint is None:  # nothing to resume: a fresh start
        check_model_folder(output_dir, overwrite)
    if completed or resume_checkpoint is not None:
        _check_resumed_config(model.config, output_dir, completed, resume_checkpoint)
    if is_main and not resume_from_checkpoint:  # a previous run allowed by `overwrite`: start afresh
        for stage in _STAGES:
            shutil.rmtree(output_dir / stage, ignore_errors=True)
        (output_dir / _RECIPE_FILE).unlink(missing_ok=True)
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        recipe_file = output_dir / _RECIPE_FILE
        if recipe_file.is_file():
            saved = json.loads(recipe_file.read_text())
            changed = sorted(k for k, v in recipe.to_dict().items() if saved.get(k, v) != v and k != "output_dir")
            if changed:
                warnings.warn(
                    f"Resuming {output_dir} with a recipe that differs from its first run in {changed}: the result "
                    "will not equal an uninterrupted run.",
                    stacklevel=2,
                )
        else:
            _write_json_atomic(recipe_file, recipe.to_dict())
    barrier()

    metrics: dict[str, dict[str, float]] = {}
    projection = None
    loaded_through: str | None = None  # the last finished stage whose weights the model holds

    def ensure_previous_loaded(stage: str) -> None:
        nonlocal loaded_through
        previous = [s for s in _STAGES[: _STAGES.index(stage)] if s in completed]
        if previous and loaded_through != previous[-1]:
            _load_stage_model(model, output_dir / previous[-1] / "final")
            loaded_through = previous[-1]

    def finish_stage(stage: str, info: dict[str, Any]) -> None:
        nonlocal loaded_through
        if is_main:
            (output_dir / stage).mkdir(parents=True, exist_ok=True)
            _save_model_atomic(model, output_dir / stage / "final")
        barrier()
        if is_main:
            _write_json_atomic(output_dir / stage / _MARKER, {"stage": stage, **info})
        barrier()
        completed.add(stage)
        loaded_through = stage

    for stage in _STAGES:
        if stage in completed:
            marker = json.loads((output_dir / stage / _MARKER).read_text())
            if marker.get("metrics"):
                metrics[stage] = marker["metrics"]
            continue
        if stage == "projection":
            ensure_previous_loaded(stage)
            from .projection import project_prototypes

            projection = project_prototypes(
                model,
                projection_dataset,
                batch_size=recipe.projection_batch_size,
                dataset_name=projection_dataset_name,
                num_workers=recipe.num_workers,
                harden=True,
            )
            finish_stage(stage, {"dataset_name": projection.dataset_name, "unused": projection.unused})
            continue
        epochs = recipe.phase_epochs(stage)
        if epochs == 0:
            ensure_previous_loaded(stage)
            finish_stage(stage, {"skipped": True})
            continue
        checkpoint = resume_checkpoint if stage == resume_phase else None
        if checkpoint is None:
            ensure_previous_loaded(stage)
        phase_metrics = _run_phase(
            stage,
            model,
            recipe,
            train_dataset,
            eval_dataset,
            data_collator=data_collator,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            checkpoint=checkpoint,
        )
        if phase_metrics:
            metrics[stage] = phase_metrics
        finish_stage(stage, {"metrics": phase_metrics, "epochs": epochs})

    if loaded_through != _STAGES[-1]:  # every stage was already complete: the final weights are on disk
        _load_stage_model(model, output_dir / _STAGES[-1] / "final")
    if test_dataset is not None:
        metrics["test"] = _evaluate_test(model, recipe, test_dataset, data_collator, compute_metrics)
    if is_main:
        save_pretrained_replacing(model, output_dir)
    barrier()
    return RecipeResult(model=model, output_dir=str(output_dir), metrics=metrics, projection=projection)


def _evaluate_test(
    model: nn.Module,
    recipe: ProtoPoolRecipe,
    test_dataset: Any,
    data_collator: Callable,
    compute_metrics: Callable | None,
) -> dict[str, float]:
    """`test_*` metrics of the final model; `epoch` is the run's last epoch (all phases together)."""
    trainer = ProtoPoolTrainer(
        model=model,
        args=recipe.training_arguments("finetune", evaluate=False),
        data_collator=data_collator,
        compute_metrics=compute_metrics,
        phase="finetune",
    )
    metrics = trainer.evaluate(test_dataset, metric_key_prefix="test")
    trainer.accelerator.free_memory()
    metrics["epoch"] = float(recipe.epoch_offset("finetune") + recipe.finetune_epochs)
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


#: Config fields that fix the shapes of the weights: a resumed run must keep them.
_ARCHITECTURE_FIELDS = (
    "backbone",
    "feature_stage",
    "num_labels",
    "num_prototypes",
    "num_slots_per_class",
    "prototype_dim",
    "input_size",
)


def _check_resumed_config(config: Any, output_dir: Path, completed: set[str], checkpoint: str | None) -> None:
    """Refuse to resume a run with a model whose architecture or classes differ from those the run saved."""
    candidates = [Path(checkpoint) / "config.json"] if checkpoint else []
    candidates += [output_dir / stage / "final" / "config.json" for stage in reversed(_STAGES) if stage in completed]
    saved_file = next((path for path in candidates if path.is_file()), None)
    if saved_file is None:
        return
    saved = json.loads(saved_file.read_text())
    saved_labels = {int(k): v for k, v in (saved.get("id2label") or {}).items()}
    saved["num_labels"] = len(saved_labels) if saved_labels else saved.get("num_labels")
    for field_name in _ARCHITECTURE_FIELDS:
        ours, theirs = getattr(config, field_name, None), saved.get(field_name)
        if isinstance(ours, tuple | list):
            ours, theirs = list(ours), list(theirs) if isinstance(theirs, tuple | list) else theirs
        if ours != theirs:
            break
    else:
        ours = {int(k): v for k, v in config.id2label.items()}
        if not saved_labels or ours == saved_labels:
            return
        field_name, wrong = "id2label", next(i for i in sorted(ours) if ours[i] != saved_labels.get(i))
        ours, theirs = f"{{{wrong}: {ours[wrong]!r}, ...}}", f"{{{wrong}: {saved_labels.get(wrong)!r}, ...}}"
    raise ValueError(
        f"Cannot resume {output_dir}: the model's {field_name}={ours} differs from the run's {field_name}={theirs} "
        f"(in {saved_file}). Resume with the settings of the first run, or start a new run (another output_dir, or "
        "overwrite=True without resuming)."
    )


def _run_phase(
    phase: str,
    model: nn.Module,
    recipe: ProtoPoolRecipe,
    train_dataset: Any,
    eval_dataset: Any,
    *,
    data_collator: Callable,
    compute_metrics: Callable | None,
    callbacks: Sequence[TrainerCallback],
    checkpoint: str | None,
) -> dict[str, float]:
    """One Trainer phase; returns the evaluation metrics of its final model (empty without an eval split)."""
    evaluate = eval_dataset is not None
    args = recipe.training_arguments(phase, evaluate)
    offset = recipe.epoch_offset(phase)
    phase_callbacks: list[TrainerCallback] = []
    if phase in ("warmup", "joint"):
        phase_callbacks.append(GumbelScheduleCallback(per_step=recipe.gumbel_per_step, epoch_offset=offset))
    if phase == "warmup":
        phase_callbacks.append(WarmupCallback(freeze_batchnorm=recipe.freeze_bn_during_warmup))
    if phase == "finetune":
        phase_callbacks.append(WarmupCallback(freeze_batchnorm=recipe.freeze_bn_during_finetune))
    if _find_epoch_setter(train_dataset) is not None:  # seeded augmentation: tell it the global epoch
        phase_callbacks.append(SetEpochCallback(train_dataset, epoch_offset=offset))
    lr_step = {
        "joint": (recipe.joint_lr_step_epochs, recipe.joint_lr_gamma),
        "finetune": (recipe.finetune_lr_step_epochs, recipe.finetune_lr_gamma),
    }.get(phase, (None, 0.1))
    trainer = ProtoPoolTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=data_collator,
        compute_metrics=compute_metrics if evaluate else None,
        callbacks=[*phase_callbacks, *callbacks],
        phase=phase,
        mixup_alpha=recipe.mixup_alpha,
        loss_terms=("cross_entropy", "l1") if phase == "finetune" else None,
        lr_step_epochs=lr_step[0],
        lr_step_gamma=lr_step[1],
        group_lrs=recipe.phase_group_lrs(phase),
        frozen_backbone_stages=recipe.frozen_backbone_stages,
    )
    trainer.train(resume_from_checkpoint=checkpoint)
    metrics = trainer.evaluate() if evaluate and args.eval_strategy != "no" else {}
    if "epoch" in metrics:  # the run's epoch, counted over the phases as the Gumbel schedule counts
        metrics["epoch"] = offset + metrics["epoch"]
    trainer.accelerator.free_memory()
    del trainer
    gc.collect()
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


#: `train_protopool` under the name of the package spec.
run_recipe = train_protopool


# --------------------------------------------------------------------------- data split and DDP exit


def split_train_validation(
    dataset: Any, fraction: float = 0.1, seed: int = 0, labels: Sequence[int] | None = None
) -> tuple[Any, Any]:
    """Carve a validation split out of the training data, stratified by class when the labels are known.

    Each class gives `round(fraction · n_c)` of its images (chosen by `seed`) to the validation split; both splits
    keep the dataset's order. Model selection belongs on this split, never on the test split.

    Args:
        dataset: a `datasets.Dataset` (its `label` column gives the classes) or any map-style dataset.
        fraction: the share of images for validation, in (0, 1).
        seed: seeds the choice.
        labels: the class of every item, for datasets without a `label` column; without any labels the split is
            random, not stratified.

    Returns:
        `(train, validation)`: `Dataset.select` views for a `datasets.Dataset` (format and transform kept), else
        `torch.utils.data.Subset`s.

    Example:
        ```python
        >>> import datasets
        >>> from protopool_hf.training import split_train_validation
        >>> ds = datasets.Dataset.from_dict({"label": [0] * 10 + [1] * 10})
        >>> train, val = split_train_validation(ds, fraction=0.2, seed=0)
        >>> len(train), len(val), sorted(val["label"])
        (16, 4, [0, 0, 1, 1])
        ```
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}.")
    try:
        import datasets as hf_datasets
    except ImportError:  # pragma: no cover - datasets is a core dependency
        hf_datasets = None
    is_hf = hf_datasets is not None and isinstance(dataset, hf_datasets.Dataset)
    n = len(dataset)
    if labels is None and is_hf:
        column = next((c for c in ("label", "labels") if c in dataset.column_names), None)
        if column is not None:
            labels = list(dataset.with_format(None)[column])
    if labels is not None and len(labels) != n:
        raise ValueError(f"labels has {len(labels)} entries for a dataset of {n} items.")
    rng = np.random.default_rng(seed)
    if labels is None:
        validation = rng.permutation(n)[: round(fraction * n)]
    else:
        labels = np.asarray(labels)
        validation = np.concatenate(
            [
                rng.permutation(np.flatnonzero(labels == c))[: round(fraction * np.sum(labels == c))]
                for c in np.unique(labels)
            ]
        )
    if len(validation) == 0 or len(validation) == n:
        raise ValueError(
            f"A validation fraction of {fraction} leaves {len(validation)} of {n} items for validation: choose a "
            "fraction that gives both splits some items."
        )
    mask = np.zeros(n, dtype=bool)
    mask[validation] = True
    train_idx, val_idx = np.flatnonzero(~mask).tolist(), np.flatnonzero(mask).tolist()
    if is_hf:
        return dataset.select(train_idx), dataset.select(val_idx)
    return torch.utils.data.Subset(dataset, train_idx), torch.utils.data.Subset(dataset, val_idx)


def finish_distributed() -> None:
    """End a distributed run cleanly: wait for every process, then destroy the process group.

    Without it, a rank can abort at exit while rank 0 is still saving ("terminate called without an active
    exception"). Call it once at the end of a training script; without a process group it does nothing.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
