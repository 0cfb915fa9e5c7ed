"""The whole ProtoPool recipe in one call, [`train_protopool`], plus the validation split and the end of a DDP run.

The official recipe (gmum/ProtoPool @ 2bd4288) in four phases:

| phase | trains | optimizer (Adam, L2 weight decay) | other |
|---|---|---|---|
| warm-up (9 epochs) | add-on, prototypes, slot logits | add-on 3·lr wd 1e-3; prototypes, slot logits 3·lr | backbone frozen |
| joint | + backbone | a fresh Adam; backbone lr/10 wd 1e-3; StepLR(5, ×0.1) per epoch | |
| projection | | | prototypes onto their nearest training patches; assignment made hard |
| fine-tuning (25 epochs) | last layer only | lr/10 wd 1e-3; ×0.95 every 5 epochs | loss CE + 1e-4·L1 |

Mixup (Beta(0.5, 0.5) on every training batch) and the Gumbel scale schedule run in the warm-up and joint phases;
mixup also in fine-tuning, as in the official code.

Each phase trains on the model's own loss, `model(pixel_values, labels).loss`, with the loss weights the recipe sets
in the model's config for that phase (`ProtoPoolRecipe.phase_loss_weights`): fine-tuning sets the cluster,
separation and orthogonality weights to 0 and puts the config's weights back when it ends, so the saved model's config
holds the weights it came with.

Each phase is its own `Trainer` run: the backbone is frozen or unfrozen *before* that phase's `Trainer` wraps the
model (DDP-safe, see `protopool_hf.callbacks`), and every phase gets a fresh optimizer as in the official code.
[`train_protopool`] runs the phases in order, writes each phase's checkpoints under `output_dir/<phase>/`, records a
finished phase with a marker file, and resumes an interrupted run in the phase it was in (`protopool_hf.resume`).
The parts: `protopool_hf.phases` (what trains, at which lr), `protopool_hf.trainer` (`ProtoPoolTrainer`),
`protopool_hf.recipe` (`ProtoPoolRecipe`, `RecipeResult`).
"""

import contextlib
import gc
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import EvalPrediction, TrainerCallback

from .backbone import leading_stage_parameters
from .callbacks import (
    FrozenBackboneCallback,
    GumbelScheduleCallback,
    SetEpochCallback,
    WarmupCallback,
    _find_epoch_setter,
)
from .hub import check_model_folder, save_pretrained_replacing
from .recipe import ProtoPoolRecipe, RecipeResult
from .resume import (
    MARKER,
    STAGES,
    check_resumed_config,
    load_stage_model,
    mark_stage_finished,
    record_recipe,
    resume_plan,
    save_stage_model,
    start_afresh,
)
from .trainer import ProtoPoolTrainer, compute_accuracy


__all__ = ["finish_distributed", "split_train_validation", "train_protopool"]


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
    4. **fine-tuning** (`recipe.finetune_epochs`): only the last layer, CE + 1e-4·L1 (the model's config carries
       cluster, separation and orthogonality weights 0 during it, `ProtoPoolRecipe.phase_loss_weights`), lr/10 (or
       `recipe.finetune_learning_rate`), ×0.95 every 5 epochs.

    Every phase optimises `model(pixel_values, labels).loss`. The model returned and saved keeps the loss weights
    of the config it came with (those of the warm-up and joint phases); the fine-tuning checkpoints
    (`output_dir/finetune/checkpoint-*`) hold fine-tuning's.

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
        >>> import tempfile
        >>> import torch
        >>> from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification, ProtoPoolRecipe, train_protopool
        >>> config = ProtoPoolConfig(
        ...     backbone="test_resnet", num_labels=2, num_prototypes=4, num_slots_per_class=2, input_size=[3, 64, 64]
        ... )
        >>> images = [{"pixel_values": torch.randn(3, 64, 64), "labels": i % 2} for i in range(4)]
        >>> recipe = ProtoPoolRecipe(  # one epoch of warm-up and of fine-tuning, on four images
        ...     output_dir=tempfile.mkdtemp(), warmup_epochs=1, joint_epochs=0, finetune_epochs=1, train_batch_size=4,
        ...     eval_strategy="no", save_strategy="no", load_best_model_at_end=False, use_cpu=True, disable_tqdm=True,
        ... )  # fmt: skip
        >>> result = train_protopool(ProtoPoolForImageClassification(config), images, None, images, recipe)
        {'train_runtime': ...}
        {'train_runtime': ...}
        >>> ProtoPoolForImageClassification.from_pretrained(result.output_dir).is_assignment_hard
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
    if recipe.projection_restrict_to_objects:  # the masks the projection will need, before any training
        from .projection_data import check_projection_data

        check_projection_data(model, projection_dataset, object_mask=True)
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
    completed, resume_phase, resume_checkpoint = resume_plan(output_dir, resume_from_checkpoint, overwrite)
    if resume_from_checkpoint and not completed and resume_checkpoint is None:  # nothing to resume: a fresh start
        check_model_folder(output_dir, overwrite)
    if completed or resume_checkpoint is not None:
        check_resumed_config(model.config, output_dir, completed, resume_checkpoint)
    if is_main and not resume_from_checkpoint:  # a previous run allowed by `overwrite`: start afresh
        start_afresh(output_dir)
    if is_main:
        record_recipe(output_dir, recipe.to_dict())
    barrier()

    metrics: dict[str, dict[str, float]] = {}
    projection = None
    loaded_through: str | None = None  # the last finished stage whose weights the model holds

    def ensure_previous_loaded(stage: str) -> None:
        nonlocal loaded_through
        previous = [s for s in STAGES[: STAGES.index(stage)] if s in completed]
        if previous and loaded_through != previous[-1]:
            load_stage_model(model, output_dir / previous[-1] / "final")
            loaded_through = previous[-1]

    def finish_stage(stage: str, info: dict[str, Any]) -> None:
        nonlocal loaded_through
        if is_main:
            save_stage_model(model, output_dir, stage)
        barrier()
        if is_main:
            mark_stage_finished(output_dir, stage, info)
        barrier()
        completed.add(stage)
        loaded_through = stage

    for stage in STAGES:
        if stage in completed:
            marker = json.loads((output_dir / stage / MARKER).read_text())
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
                restrict_to_objects=recipe.projection_restrict_to_objects,
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

    if loaded_through != STAGES[-1]:  # every stage was already complete: the final weights are on disk
        load_stage_model(model, output_dir / STAGES[-1] / "final")
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


@contextlib.contextmanager
def _phase_loss_weights(model: nn.Module, weights: Mapping[str, float]) -> Iterator[None]:
    """Set the phase's loss weights on the model's config while the phase trains, then put the config's back."""
    before = {name: getattr(model.config, name) for name in weights}
    for name, value in weights.items():
        setattr(model.config, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(model.config, name, value)


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
    """One Trainer phase; returns the evaluation metrics of its final model (empty without an eval split).

    The phase trains on `model(pixel_values, labels).loss` with the recipe's loss weights for it in the config.
    """
    evaluate = eval_dataset is not None
    args = recipe.training_arguments(phase, evaluate)
    offset = recipe.epoch_offset(phase)
    phase_callbacks: list[TrainerCallback] = []
    if phase in ("warmup", "joint"):
        phase_callbacks.append(GumbelScheduleCallback(per_step=recipe.gumbel_per_step, epoch_offset=offset))
    if phase == "warmup":
        phase_callbacks.append(WarmupCallback(freeze_batchnorm=recipe.freeze_bn_during_warmup))
    if phase == "finetune":
        phase_callbacks.append(FrozenBackboneCallback("finetune", freeze_batchnorm=recipe.freeze_bn_during_finetune))
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
        lr_step_epochs=lr_step[0],
        lr_step_gamma=lr_step[1],
        group_lrs=recipe.phase_group_lrs(phase),
        frozen_backbone_stages=recipe.frozen_backbone_stages,
    )
    with _phase_loss_weights(model, recipe.phase_loss_weights(phase)):
        trainer.train(resume_from_checkpoint=checkpoint)
        metrics = trainer.evaluate() if evaluate and args.eval_strategy != "no" else {}
    if "epoch" in metrics:  # the run's epoch, counted over the phases as the Gumbel schedule counts
        metrics["epoch"] = offset + metrics["epoch"]
    trainer.accelerator.free_memory()
    del trainer
    gc.collect()
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


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
