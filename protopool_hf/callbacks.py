"""Trainer callbacks for ProtoPool: the Gumbel assignment schedule, the frozen-backbone guard, projection.

Callbacks see the `TrainerState` and the (unwrapped) model, never the outputs of a step: the mixup and the per-term
loss logging live in `protopool_hf.trainer.ProtoPoolTrainer`.

Everything here is derived from `TrainerState` (its `epoch`, `global_step`, `max_steps`), so a run resumed from a
checkpoint sets exactly the values an uninterrupted run would have had. Under DDP every process runs every callback
on its own replica with the same state, so the replicas stay equal.

Why the official warm-up is run as separate `Trainer` phases and not by one callback that unfreezes the backbone
: toggling `requires_grad` after `Trainer` has wrapped the model in `DistributedDataParallel` crashes
(the reducer's buckets were built for the old set of parameters), and freezing before the wrap then unfreezing later
trains the backbone without ever all-reducing its gradients, so the replicas drift apart. `protopool_hf.training`
therefore freezes the backbone before the warm-up `Trainer` exists and starts a fresh `Trainer` (fresh DDP wrapper,
fresh optimizer) for the joint phase. [`FrozenBackboneCallback`] is the guard of a frozen-backbone phase (the
warm-up, whose guard is [`WarmupCallback`], and last-layer fine-tuning): it checks the freeze when training starts
and can keep the frozen backbone's BatchNorm statistics fixed.
"""

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .gumbel import GumbelScheduleWarning


__all__ = [
    "FrozenBackboneCallback",
    "GumbelScheduleCallback",
    "ProjectionCallback",
    "SetEpochCallback",
    "WarmupCallback",
    "gumbel_scale_at",
    "sync_buffers_from_main",
]


def gumbel_scale_at(epoch: float, scale_max: float, num_epochs: int) -> float:
    """The official assignment-scale schedule: s = s_max·sqrt((e + 1) / T) while e + 1 < T, then s_max.

    Args:
        epoch: e, the 0-based training epoch (fractional for a per-step schedule). The official code's first
            training epoch is its epoch 1, with s = s_max·sqrt(1 / T); here that epoch is e = 0.
        scale_max: s_max (`config.gumbel_scale_max`, 1000 by default).
        num_epochs: T (`config.gumbel_scale_epochs`, 30 by default).

    Returns:
        The scale s (> 0).

    Example:
        ```python
        >>> from protopool_hf.callbacks import gumbel_scale_at
        >>> round(gumbel_scale_at(0, 1000.0, 30), 1), gumbel_scale_at(29, 1000.0, 30)
        (182.6, 1000.0)

        ```
    """
    if epoch < 0:
        raise ValueError(f"The epoch of the Gumbel schedule must be >= 0, got {epoch}.")
    if num_epochs < 1 or not scale_max > 0:
        raise ValueError(
            f"The Gumbel schedule needs gumbel_scale_epochs >= 1 and gumbel_scale_max > 0, got T={num_epochs}, "
            f"s_max={scale_max}: fix them in the model's config."
        )
    if epoch + 1 < num_epochs:
        return scale_max * math.sqrt((epoch + 1) / num_epochs)
    return float(scale_max)


def _unwrap(model: Any) -> Any:
    """The model behind a DDP-like wrapper (callbacks normally already get the unwrapped model)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def sync_buffers_from_main(model: torch.nn.Module) -> None:
    """Copy the main process's floating-point buffers (BatchNorm statistics) to every process.

    DDP broadcasts buffers from rank 0 at the start of each forward, so after the last training step every rank
    holds the running statistics of its own last batch. Projection and saving need one model: call this first.
    Without a process group it does nothing.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() < 2:
        return
    for buffer in _unwrap(model).buffers():
        if buffer.is_floating_point():
            torch.distributed.broadcast(buffer.data, src=0)


def _require_protopool(model: Any, callback: str) -> Any:
    model = _unwrap(model)
    if model is None or not hasattr(model, "set_gumbel_scale") or not hasattr(model, "head"):
        raise TypeError(
            f"{callback} needs a ProtoPoolForImageClassification as the Trainer's model, got {type(model).__name__}."
        )
    return model


class GumbelScheduleCallback(TrainerCallback):
    """Set the model's Gumbel assignment scale from the training epoch: s_max·sqrt((e + 1)/T), then s_max.

    s_max and T come from the model's config (`gumbel_scale_max`, `gumbel_scale_epochs`). e is the 0-based epoch
    of `TrainerState` plus `epoch_offset`: `floor(state.epoch)` at each epoch start, like the official code, or with
    `per_step=True` the fractional `state.epoch` before each optimizer step. The value is written into the model's
    persistent `head.gumbel_scale` buffer, so checkpoints carry it, and it is recomputed from the state when training
    (re)starts, so a resumed run continues with exactly the value it would have had.

    Args:
        per_step: update before every optimizer step from the fractional epoch instead of once per epoch.
        epoch_offset: added to the Trainer's epoch, so that a phase run by its own `Trainer` (the joint phase after
            the warm-up) continues the count of the previous phases.

    Example:
        ```python
        >>> from transformers import TrainerControl, TrainerState, TrainingArguments
        >>> from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification
        >>> from protopool_hf.callbacks import GumbelScheduleCallback
        >>> config = ProtoPoolConfig(backbone="test_resnet", num_labels=2, num_prototypes=4, num_slots_per_class=2)
        >>> model = ProtoPoolForImageClassification(config)
        >>> callback = GumbelScheduleCallback(epoch_offset=9)
        >>> state = TrainerState(epoch=0.0, global_step=0, max_steps=10)
        >>> _ = callback.on_epoch_begin(TrainingArguments("out", use_cpu=True), state, TrainerControl(), model=model)
        >>> round(model.gumbel_scale, 1)  # e = 9: 1000 * sqrt(10 / 30)
        577.4

        ```
    """

    def __init__(self, per_step: bool = False, epoch_offset: int = 0) -> None:
        if epoch_offset < 0:
            raise ValueError(f"epoch_offset must be >= 0, got {epoch_offset}.")
        self.per_step = per_step
        self.epoch_offset = int(epoch_offset)

    def scale_for(self, state: TrainerState, model: Any) -> float:
        """The scale the schedule gives for this state and the model's config."""
        epoch = float(state.epoch or 0.0)
        if not self.per_step:
            epoch = math.floor(epoch)
        config = model.config
        return gumbel_scale_at(epoch + self.epoch_offset, config.gumbel_scale_max, config.gumbel_scale_epochs)

    def _apply(self, state: TrainerState, model: Any) -> None:
        model = _require_protopool(model, type(self).__name__)
        model.set_gumbel_scale(self.scale_for(state, model))

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        """Set the scale of the state training starts (or resumes) from.

        A run resumed from its final checkpoint trains no further; its model keeps the scale saved with it.
        """
        if not state.max_steps or state.global_step < state.max_steps:
            self._apply(state, model)

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        """Per-epoch schedule: s(floor(epoch) + offset)."""
        if not self.per_step:
            self._apply(state, model)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        """Per-step schedule: s(epoch + offset) with the fractional epoch reached before this step."""
        if self.per_step:
            self._apply(state, model)


def _eval_mode_hook(module: torch.nn.Module, args: Any) -> None:
    """Forward pre-hook: run this module in eval mode whatever `model.train()` set before."""
    module.training = False


class FrozenBackboneCallback(TrainerCallback):
    """Guard of a phase whose backbone is frozen: the warm-up ([`WarmupCallback`]) and last-layer fine-tuning.

    The backbone must be frozen *before* the `Trainer` wraps the model (`protopool_hf.phases.set_trainable(model,
    phase)`, or `ProtoPoolTrainer(phase=phase)`): when training starts, this callback checks that no backbone
    parameter requires a gradient or sits in the optimizer, and raises otherwise. It never toggles `requires_grad`
    itself, which is unsafe once DDP has wrapped the model (see the module docstring).

    With `freeze_batchnorm=True` the backbone runs in eval mode during the phase (a forward pre-hook re-applies it
    after every `model.train()`), so its BatchNorm running statistics (and any dropout) stay fixed; the official code
    lets them update during the warm-up (the default here too). The hook sits on every backbone submodule, because
    backbones are often called through methods such as `forward_intermediates` that bypass the root's hooks.

    Args:
        phase: the frozen-backbone phase it guards, "warmup" or "finetune" (named in its errors).
        freeze_batchnorm: keep the frozen backbone in eval mode, its BatchNorm statistics unchanged.

    Example:
        ```python
        >>> import torch
        >>> from transformers import TrainerControl, TrainerState, TrainingArguments
        >>> from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification
        >>> from protopool_hf.callbacks import FrozenBackboneCallback
        >>> from protopool_hf.phases import set_trainable
        >>> config = ProtoPoolConfig(backbone="test_resnet", num_labels=2, num_prototypes=4, num_slots_per_class=2)
        >>> model = ProtoPoolForImageClassification(config)
        >>> model.harden_assignment()  # fine-tuning follows the projection, which hardens the assignment
        >>> set_trainable(model, "finetune")
        >>> callback = FrozenBackboneCallback("finetune", freeze_batchnorm=True)
        >>> args, state, control = TrainingArguments("out", use_cpu=True), TrainerState(), TrainerControl()
        >>> _ = callback.on_train_begin(args, state, control, model=model)
        >>> _ = model.train()(torch.randn(2, 3, 160, 160))
        >>> [m.training for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)][:3]
        [False, False, False]
        >>> _ = callback.on_train_end(args, state, control, model=model)

        ```
    """

    def __init__(self, phase: str = "warmup", freeze_batchnorm: bool = False) -> None:
        if phase not in ("warmup", "finetune"):
            raise ValueError(
                f"{type(self).__name__} guards a frozen-backbone phase, 'warmup' or 'finetune'; got {phase!r}."
            )
        self.phase = phase
        self.freeze_batchnorm = freeze_batchnorm
        self._hooks: list[Any] = []

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        """Check the freeze; install the eval-mode hook when asked."""
        model = _require_protopool(model, type(self).__name__)
        trainable = [name for name, p in model.backbone.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(
                f"{type(self).__name__}: {len(trainable)} backbone parameters require gradients (e.g. backbone."
                f"{trainable[0]}). Freeze the backbone before creating the Trainer, with "
                f"protopool_hf.phases.set_trainable(model, {self.phase!r}) or ProtoPoolTrainer(phase={self.phase!r}): "
                "toggling requires_grad after the Trainer has wrapped the model in DDP is unsafe."
            )
        if optimizer is not None:
            backbone_ids = {id(p) for p in model.backbone.parameters()}
            optimized = [p for group in optimizer.param_groups for p in group["params"] if id(p) in backbone_ids]
            if optimized:
                raise ValueError(
                    f"{type(self).__name__}: the optimizer holds {len(optimized)} backbone parameters during a "
                    f"frozen-backbone phase; build it from protopool_param_groups(model, lr, {self.phase!r})."
                )
        self._remove_hooks()
        if self.freeze_batchnorm:
            self._hooks = [module.register_forward_pre_hook(_eval_mode_hook) for module in model.backbone.modules()]
            model.backbone.eval()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Remove the eval-mode hooks, so later phases control the backbone's mode again."""
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


class WarmupCallback(FrozenBackboneCallback):
    """Guard of the warm-up, whose backbone is frozen: a [`FrozenBackboneCallback`] for phase "warmup".

    Args:
        freeze_batchnorm: keep the frozen backbone in eval mode during the warm-up, its BatchNorm statistics
            unchanged (the official code lets them update: the default).

    Example:
        ```python
        >>> from transformers import TrainerControl, TrainerState, TrainingArguments
        >>> from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification
        >>> from protopool_hf.callbacks import WarmupCallback
        >>> config = ProtoPoolConfig(backbone="test_resnet", num_labels=2, num_prototypes=4, num_slots_per_class=2)
        >>> model = ProtoPoolForImageClassification(config)  # backbone not frozen: the warm-up would train it
        >>> args, state, control = TrainingArguments("out", use_cpu=True), TrainerState(), TrainerControl()
        >>> WarmupCallback().on_train_begin(args, state, control, model=model)
        Traceback (most recent call last):
        ValueError: WarmupCallback: ... backbone parameters require gradients ...

        ```
    """

    def __init__(self, freeze_batchnorm: bool = False) -> None:
        super().__init__("warmup", freeze_batchnorm=freeze_batchnorm)


def _find_epoch_setter(target: Any) -> Any:
    """The object whose `set_epoch` seeds augmentation: the target itself or a dataset's format transform."""
    while isinstance(target, torch.utils.data.Subset):
        target = target.dataset
    if hasattr(target, "_format_kwargs"):  # a datasets.Dataset: its `with_transform` transform
        target = target._format_kwargs.get("transform")
    return target if callable(getattr(target, "set_epoch", None)) else None


class SetEpochCallback(TrainerCallback):
    """Tell seeded data transforms the current training epoch, so augmentation depends on (seed, epoch, index).

    Calls `set_epoch(floor(state.epoch) + epoch_offset)` on each target when training starts or resumes and at each
    epoch start. A target is anything with a `set_epoch` method (`protopool_hf.transforms.ImageTransform`) or a
    `datasets.Dataset` whose `with_transform` transform has one.

    Args:
        *targets: transforms or transformed datasets.
        epoch_offset: added to the epoch, so that each phase of a recipe sees new augmentations.

    Example:
        ```python
        >>> from transformers import TrainerControl, TrainerState, TrainingArguments
        >>> from protopool_hf.callbacks import SetEpochCallback
        >>> from protopool_hf.transforms import make_transforms
        >>> transform = make_transforms({"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3}, train=True)
        >>> callback = SetEpochCallback(transform, epoch_offset=9)
        >>> args, control = TrainingArguments("out", use_cpu=True), TrainerControl()
        >>> _ = callback.on_epoch_begin(args, TrainerState(epoch=2.0), control)
        >>> transform.epoch
        11

        ```
    """

    def __init__(self, *targets: Any, epoch_offset: int = 0) -> None:
        setters = []
        for target in targets:
            setter = _find_epoch_setter(target)
            if setter is None:
                raise TypeError(
                    f"SetEpochCallback: {type(target).__name__} has no set_epoch method and no transform with one; "
                    "pass protopool_hf.transforms.make_transforms(...) or a dataset transformed with it."
                )
            setters.append(setter)
        if epoch_offset < 0:
            raise ValueError(f"epoch_offset must be >= 0, got {epoch_offset}.")
        self.setters = setters
        self.epoch_offset = int(epoch_offset)

    def _apply(self, state: TrainerState) -> None:
        epoch = math.floor(float(state.epoch or 0.0)) + self.epoch_offset
        for setter in self.setters:
            setter.set_epoch(epoch)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Set the epoch training starts or resumes in."""
        self._apply(state)

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Set the epoch about to be trained."""
        self._apply(state)


class ProjectionCallback(TrainerCallback):
    """Project the prototypes onto their nearest training patches at the end of training, then harden the assignment.

    Runs `protopool_hf.projection.project_prototypes` on `dataset`, which must hold the *un-augmented* training
    images (eval transform): at `on_train_end` (after `load_best_model_at_end` has restored the best weights), and
    optionally at the end of chosen epochs. Under DDP every process first takes the main process's BatchNorm
    statistics, then scans its shard, and all end with identical prototypes. The last result is kept in
    `self.result`.

    Args:
        dataset: a map-style dataset of `{"pixel_values", "labels"}` examples (`label`, the column name the HF
            guides' transforms keep for `DefaultDataCollator`, is read as `labels`), e.g. a `datasets.Dataset` with
            `make_transforms(config, train=False)`, or a DataLoader of such batches. Its first example is checked
            when training starts, so a wrong format fails at once, not after the last epoch.
        at_epochs: also project after these epochs (counted from 1, i.e. after the k-th epoch ends); these
            intermediate projections keep the assignment soft.
        batch_size: images per projection batch.
        dataset_name: provenance recorded in the config; by default `project_prototypes` names a `datasets.Dataset`
            by its name, else its fingerprint.
        harden: make the assignment hard after the final projection (the recipe's behaviour).

    Example:
        ```python
        >>> import torch
        >>> from transformers import TrainerControl, TrainerState, TrainingArguments
        >>> from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification
        >>> from protopool_hf.callbacks import ProjectionCallback
        >>> config = ProtoPoolConfig(backbone="test_resnet", num_labels=2, num_prototypes=4, num_slots_per_class=2)
        >>> model = ProtoPoolForImageClassification(config)
        >>> images = [{"pixel_values": torch.rand(3, 160, 160), "labels": i % 2} for i in range(4)]
        >>> callback = ProjectionCallback(images, at_epochs=[10], batch_size=2)  # then Trainer(callbacks=[callback])
        >>> args, state, control = TrainingArguments("out", use_cpu=True), TrainerState(), TrainerControl()
        >>> _ = callback.on_train_end(args, state, control, model=model)
        >>> model.is_assignment_hard, callback.result.image_index.tolist() == model.head.projection_image_index.tolist()
        (True, True)

        ```
    """

    def __init__(
        self,
        dataset: Any,
        at_epochs: Iterable[int] | None = None,
        batch_size: int = 64,
        dataset_name: str | None = None,
        harden: bool = True,
    ) -> None:
        if dataset is None:
            raise ValueError("ProjectionCallback needs the un-augmented training images as `dataset`.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.at_epochs = frozenset(int(e) for e in (at_epochs or ()))
        if any(e < 1 for e in self.at_epochs):
            raise ValueError(f"at_epochs counts completed epochs from 1, got {sorted(self.at_epochs)}.")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.dataset_name = dataset_name
        self.harden = harden
        self.result: Any = None
        self.num_projections = 0

    def project(self, model: Any, harden: bool) -> Any:
        """Run the projection on `model` now; returns the `ProjectionResult`."""
        from .projection import project_prototypes

        model = _require_protopool(model, type(self).__name__)
        sync_buffers_from_main(model)
        self.result = project_prototypes(
            model, self.dataset, batch_size=self.batch_size, dataset_name=self.dataset_name, harden=harden
        )
        self.num_projections += 1
        return self.result

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        """Check the dataset's first example now, so a wrong format fails before the first step, not at the end."""
        from .projection_data import check_projection_data

        check_projection_data(_require_protopool(model, type(self).__name__), self.dataset)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        """Project after the epochs listed in `at_epochs` (before that epoch's evaluation and checkpoint)."""
        epoch = float(state.epoch or 0.0)
        if self.at_epochs and epoch == round(epoch) and round(epoch) in self.at_epochs:
            self.project(model, harden=False)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        """The final projection, then the hard assignment."""
        self.project(model, harden=self.harden)


def warn_if_scale_is_fixed(model: Any, callbacks: Iterable[Any]) -> bool:
    """Warn once (per call) when a soft-assignment model would train while nothing moves its Gumbel scale.

    Args:
        model: the model about to be trained.
        callbacks: the Trainer's callbacks.

    Returns:
        Whether it warned.
    """
    model = _unwrap(model)
    if not hasattr(model, "is_assignment_hard") or model.is_assignment_hard:
        return False
    if any(isinstance(cb, GumbelScheduleCallback) for cb in callbacks):
        return False
    warnings.warn(
        f"Training a ProtoPool model in Gumbel mode at a fixed assignment scale s={model.gumbel_scale:g}: no "
        "GumbelScheduleCallback is registered. Add protopool_hf.GumbelScheduleCallback() to the Trainer's callbacks "
        "(or harden the assignment for last-layer fine-tuning).",
        GumbelScheduleWarning,
        stacklevel=3,
    )
    model._scale_checked = True  # `model.train()` would give the same advice: once is enough
    return True
