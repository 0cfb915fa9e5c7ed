"""`ProtoPoolTrainer`: transformers' `Trainer` with mixup, per-term loss logs and a phase's official optimizer.

The loss itself is the model's: `model(pixel_values, labels).loss`, weighted by the loss weights of the model's
config (`cluster_weight`, ..., `l1_weight`), which the recipe sets for each phase (`protopool_hf.recipe`). The
trainer only draws mixup (λ and a permutation) and passes it to the model's forward, and logs the loss's terms.
"""

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import EvalPrediction, Trainer, TrainingArguments

from .callbacks import sync_buffers_from_main, warn_if_scale_is_fixed
from .losses import LOSS_TERM_NAMES
from .phases import EpochStepDecay, check_group_lrs, check_phase, protopool_param_groups, set_trainable


__all__ = ["ProtoPoolTrainer", "compute_accuracy", "mixup_draw"]


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
        >>> from protopool_hf.trainer import mixup_draw
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


class ProtoPoolTrainer(Trainer):
    """A `Trainer` for ProtoPool: mixup, the loss terms in the logs, the official optimizer of a phase.

    The loss is the model's own, `model(pixel_values, labels).loss`: the weights of its terms are the model config's
    (`cluster_weight`, `separation_weight`, `orthogonality_weight`, `l1_weight`; a weight of 0 drops the term), so
    to train the last layer on CE + L1 only, set the other three weights to 0 as `train_protopool` does.

    - **Mixup** (`mixup_alpha > 0`, training only, as the official code): every training batch is mixed with a
      permutation of itself, x = λ·x + (1 − λ)·x[perm], λ ~ Beta(alpha, alpha), and the model gets
      `mixup_labels=y[perm]`, `mixup_lambda=λ`: CE on the mixed targets, λ·CE(y) + (1 − λ)·CE(y[perm]),
      cluster/separation on the original labels. λ and the permutation come from (seed, global step, micro-batch,
      process), so a resumed run mixes exactly as before. Evaluation never mixes.
    - **Logs**: each unweighted term of the loss (`cross_entropy` and those of `cluster`, `separation`,
      `orthogonality`, `l1` whose weight is not 0) averaged over the logging window like `loss`, and the current
      `gumbel_scale`; evaluation adds `eval_cross_entropy`, ... averaged over the evaluation set.
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
        lr_step_epochs: multiply the lr by `lr_step_gamma` every this many epochs (replaces `lr_scheduler_type`).
        lr_step_gamma: the factor of that decay.
        group_lrs: absolute learning rates of named parameter groups that replace the official factors of
            `args.learning_rate` (see `protopool_param_groups`), e.g. `{"backbone": 1e-3}`.
        frozen_backbone_stages: with a `phase`, keep the backbone's stem and this many leading stages frozen
            (see `set_trainable`); 0, the official choice, trains the whole backbone in the joint phase.
        **kwargs: `Trainer`'s keyword arguments.

    Example:
        ```python
        >>> import tempfile
        >>> import torch
        >>> from transformers import TrainingArguments
        >>> from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification
        >>> from protopool_hf.callbacks import GumbelScheduleCallback
        >>> from protopool_hf.trainer import ProtoPoolTrainer
        >>> config = ProtoPoolConfig(backbone="test_resnet", num_labels=2, num_prototypes=4, num_slots_per_class=2)
        >>> model = ProtoPoolForImageClassification(config)
        >>> args = TrainingArguments(
        ...     tempfile.mkdtemp(), use_cpu=True, report_to="none", remove_unused_columns=False,
        ...     label_names=["labels"], weight_decay=1e-3, lr_scheduler_type="constant", max_grad_norm=0.0,
        ... )  # fmt: skip
        >>> trainer = ProtoPoolTrainer(
        ...     model=model, args=args, callbacks=[GumbelScheduleCallback()], phase="joint", mixup_alpha=0.5,
        ...     lr_step_epochs=5,
        ... )  # fmt: skip
        >>> [group["name"] for group in trainer.create_optimizer().param_groups]
        ['backbone', 'add_on', 'prototypes', 'slot_logits']
        >>> batch = {"pixel_values": torch.randn(4, 3, 160, 160), "labels": torch.tensor([0, 1, 1, 0])}
        >>> model.set_gumbel_scale(100.0)  # in training, the GumbelScheduleCallback sets it
        >>> trainer.compute_loss(model.train(), batch).shape  # a mixed batch: model(..., mixup_labels=...).loss
        torch.Size([])

        ```

        `trainer.train()` then trains it, given `train_dataset=...` and `data_collator=protopool_hf.transforms.collate_fn`.
    """

    def __init__(
        self,
        *args: Any,
        mixup_alpha: float = 0.0,
        mixup_seed: int | None = None,
        phase: str | None = None,
        lr_step_epochs: int | None = None,
        lr_step_gamma: float = 0.1,
        group_lrs: Mapping[str, float] | None = None,
        frozen_backbone_stages: int = 0,
        **kwargs: Any,
    ) -> None:
        group_lrs = check_group_lrs(group_lrs)
        if mixup_alpha < 0:
            raise ValueError(f"mixup_alpha must be >= 0 (0 turns mixup off), got {mixup_alpha}.")
        if phase is not None:
            check_phase(phase)
        if frozen_backbone_stages and phase is None:
            raise ValueError("frozen_backbone_stages acts through `phase`: pass phase='joint' as well.")
        if lr_step_epochs is not None and (lr_step_epochs < 1 or not lr_step_gamma > 0):
            raise ValueError(
                f"lr_step_epochs must be >= 1 and lr_step_gamma > 0, got {lr_step_epochs}, {lr_step_gamma}."
            )
        super().__init__(*args, **kwargs)
        self.mixup_alpha = float(mixup_alpha)
        self.mixup_seed = mixup_seed
        self.phase = phase
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
        """The model's loss, on a mixed batch in training when `mixup_alpha > 0`; keeps the running term sums."""
        labels = inputs.get("labels")
        if labels is None or "pixel_values" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        training = model.training
        if training and self.mixup_alpha > 0:
            lam, perm = self._draw_mixup(len(labels))
            perm = torch.as_tensor(perm, device=labels.device)
            pixel_values = inputs["pixel_values"]
            mixed = lam * pixel_values + (1 - lam) * pixel_values[perm]
            inputs = {**inputs, "pixel_values": mixed, "mixup_labels": labels[perm], "mixup_lambda": lam}
            if inputs.get("object_mask") is not None:  # the object of either image
                inputs["object_mask"] = inputs["object_mask"] | inputs["object_mask"][perm]
        outputs = model(**inputs)
        self._record_terms(outputs.loss_terms, "train" if training else "eval", len(labels))
        return (outputs.loss, outputs) if return_outputs else outputs.loss

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
        weights = self.accelerator.unwrap_model(self.model).loss_weights
        names = [name for name in LOSS_TERM_NAMES if getattr(weights, name) != 0]  # the terms of the loss
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


def compute_accuracy(eval_pred: EvalPrediction) -> dict[str, float]:
    """Top-1 accuracy for `Trainer(compute_metrics=...)`: `{"accuracy": ...}` from the logits."""
    logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
    labels = eval_pred.label_ids
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}
