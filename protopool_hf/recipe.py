"""The hyperparameters of ProtoPool's training recipe ([`ProtoPoolRecipe`]) and what a run returns ([`RecipeResult`]).

The recipe also sets each phase's loss: the weights of the loss terms that the model's config carries while that
phase trains ([`ProtoPoolRecipe.phase_loss_weights`]).
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from .phases import PHASES, check_phase


__all__ = ["ProtoPoolRecipe", "RecipeResult"]

# The config's loss weights in last-layer fine-tuning: CE + l1_weight·L1 only, as the official code.
_FINETUNE_LOSS_WEIGHTS = {
    "cluster_weight": 0.0,
    "separation_weight": 0.0,
    "orthogonality_weight": 0.0,
    "background_weight": 0.0,
}


@dataclass
class ProtoPoolRecipe:
    """The hyperparameters of `protopool_hf.training.train_protopool`: the official recipe by default.

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
        projection_restrict_to_objects: project onto object patches only, by the projection data's `object_mask`
            (`project_prototypes(restrict_to_objects=True)`; not in the official method, off by default).
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
        >>> from protopool_hf.recipe import ProtoPoolRecipe
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
    projection_restrict_to_objects: bool = False
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
        check_phase(phase)
        return {"warmup": self.warmup_epochs, "joint": self.joint_epochs, "finetune": self.finetune_epochs}[phase]

    def epoch_offset(self, phase: str) -> int:
        """Epochs trained before `phase`: the Gumbel schedule and the augmentation continue counting from here."""
        offsets = {"warmup": 0, "joint": self.warmup_epochs, "finetune": self.warmup_epochs + self.joint_epochs}
        return offsets[phase]

    def phase_group_lrs(self, phase: str) -> dict[str, float]:
        """The absolute group learning rates of a phase that replace the official factors (`ProtoPoolTrainer`)."""
        check_phase(phase)
        if phase == "joint" and self.backbone_learning_rate is not None:
            return {"backbone": self.backbone_learning_rate}
        if phase == "finetune" and self.finetune_learning_rate is not None:
            return {"last_layer": self.finetune_learning_rate}
        return {}

    def phase_loss_weights(self, phase: str) -> dict[str, float]:
        """The config fields that set the loss of a phase, to set on the model's config while that phase trains.

        The warm-up and joint phases train on the loss of the model's own config (`{}`: nothing changes);
        fine-tuning trains the last layer on CE + `l1_weight`·L1 only, as the official code, so it sets the cluster,
        separation and orthogonality weights to 0 (those terms do not depend on the last layer anyway).

        Example:
            ```python
            >>> from protopool_hf.recipe import ProtoPoolRecipe
            >>> ProtoPoolRecipe().phase_loss_weights("finetune")
            {'cluster_weight': 0.0, 'separation_weight': 0.0, 'orthogonality_weight': 0.0, 'background_weight': 0.0}
            >>> ProtoPoolRecipe().phase_loss_weights("joint")
            {}

            ```
        """
        check_phase(phase)
        return dict(_FINETUNE_LOSS_WEIGHTS) if phase == "finetune" else {}

    def training_arguments(self, phase: str, evaluate: bool = True) -> TrainingArguments:
        """The `TrainingArguments` of a phase (its folder is `output_dir/<phase>`).

        Args:
            phase: "warmup", "joint" or "finetune".
            evaluate: whether an evaluation split is given (without one: no evaluation, no model selection).
        """
        check_phase(phase)
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


@dataclass
class RecipeResult:
    """What `protopool_hf.training.train_protopool` returns.

    Attributes:
        model: the trained, projected, fine-tuned model (also saved in `output_dir`). Its config holds the loss
            weights it came with (the warm-up's and joint phase's), not fine-tuning's (`phase_loss_weights`).
        output_dir: the folder holding the final model and the phases' checkpoints.
        metrics: per phase, the evaluation metrics of its final (selected) model, when an evaluation split was given.
        projection: the `ProjectionResult` of the projection, or None when a resumed run found it already done.

    Example:
        ```python
        >>> from protopool_hf.recipe import RecipeResult
        >>> result = RecipeResult(model=None, output_dir="runs/fmnist", metrics={"finetune": {"eval_accuracy": 0.84}})
        >>> result.metrics["finetune"]["eval_accuracy"], result.projection  # what train_protopool fills in
        (0.84, None)

        ```
    """

    model: Any
    output_dir: str
    metrics: dict[str, dict[str, float]]
    projection: Any = None
