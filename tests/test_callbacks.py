"""Trainer callbacks: the Gumbel schedule (also across a resume), the frozen-backbone guard, projection, set_epoch."""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from protopool_hf.callbacks import (
    FrozenBackboneCallback,
    GumbelScheduleCallback,
    ProjectionCallback,
    SetEpochCallback,
    WarmupCallback,
    gumbel_scale_at,
)
from protopool_hf.gumbel import GumbelScheduleWarning
from protopool_hf.phases import set_trainable
from protopool_hf.trainer import ProtoPoolTrainer
from protopool_hf.transforms import collate_fn, make_transforms


sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from protopool_tiny import fashion_config, fashion_mnist, fashion_model, trainer_args


class Recorder(TrainerCallback):
    """Records, before every optimizer step, the step, the Gumbel scale, the hard flag and the transform's epoch."""

    def __init__(self, transform=None) -> None:
        self.transform = transform
        self.rows: list[tuple[int, float, bool, int | None]] = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        epoch = self.transform.epoch if self.transform is not None else None
        self.rows.append((state.global_step, model.gumbel_scale, model.is_assignment_hard, epoch))


def fresh_state(epoch: float = 0.0, step: int = 0, max_steps: int = 100) -> TrainerState:
    return TrainerState(epoch=epoch, global_step=step, max_steps=max_steps)


# ---------------------------------------------------------------------------------------------------- schedule values


def test_gumbel_scale_at_official_values():
    assert gumbel_scale_at(0, 1000.0, 30) == pytest.approx(1000 * math.sqrt(1 / 30))
    assert gumbel_scale_at(0, 1000.0, 30) == pytest.approx(182.57, abs=0.01)
    assert gumbel_scale_at(9, 1000.0, 30) == pytest.approx(577.35, abs=0.01)
    assert gumbel_scale_at(28, 1000.0, 30) == pytest.approx(1000 * math.sqrt(29 / 30))
    assert gumbel_scale_at(29, 1000.0, 30) == 1000.0
    assert gumbel_scale_at(150, 1000.0, 30) == 1000.0
    assert gumbel_scale_at(0.5, 10.0, 4) == pytest.approx(10 * math.sqrt(1.5 / 4))
    with pytest.raises(ValueError, match="epoch"):
        gumbel_scale_at(-1, 1000.0, 30)
    with pytest.raises(ValueError, match="gumbel_scale_epochs"):
        gumbel_scale_at(0, 1000.0, 0)


def test_gumbel_callback_hooks_read_only_the_state():
    model = fashion_model(gumbel_scale_epochs=30)
    args, control = TrainingArguments("unused", use_cpu=True, report_to="none"), TrainerControl()
    per_epoch, per_step = GumbelScheduleCallback(), GumbelScheduleCallback(per_step=True)

    per_epoch.on_epoch_begin(args, fresh_state(epoch=0.0), control, model=model)
    assert model.gumbel_scale == pytest.approx(1000 * math.sqrt(1 / 30))
    per_epoch.on_epoch_begin(args, fresh_state(epoch=29.0), control, model=model)
    assert model.gumbel_scale == 1000.0
    # Mid-epoch (a resume): the per-epoch schedule uses the epoch's floor, the per-step one the fraction.
    per_epoch.on_train_begin(args, fresh_state(epoch=4.5, step=45), control, model=model)
    assert model.gumbel_scale == pytest.approx(1000 * math.sqrt(5 / 30))
    per_step.on_train_begin(args, fresh_state(epoch=4.5, step=45), control, model=model)
    assert model.gumbel_scale == pytest.approx(1000 * math.sqrt(5.5 / 30))
    # Hooks of the other mode do nothing.
    per_epoch.on_step_begin(args, fresh_state(epoch=20.3), control, model=model)
    per_step.on_epoch_begin(args, fresh_state(epoch=20.0), control, model=model)
    assert model.gumbel_scale == pytest.approx(1000 * math.sqrt(5.5 / 30))
    # A joint phase continues the warm-up's count.
    GumbelScheduleCallback(epoch_offset=9).on_epoch_begin(args, fresh_state(epoch=0.0), control, model=model)
    assert model.gumbel_scale == pytest.approx(1000 * math.sqrt(10 / 30))
    # A run resumed from its final checkpoint keeps the scale its checkpoint holds.
    model.set_gumbel_scale(123.0)
    per_epoch.on_train_begin(args, fresh_state(epoch=3.0, step=30, max_steps=30), control, model=model)
    assert model.gumbel_scale == 123.0

    with pytest.raises(ValueError, match="epoch_offset"):
        GumbelScheduleCallback(epoch_offset=-1)
    with pytest.raises(TypeError, match="ProtoPoolForImageClassification"):
        per_epoch.on_epoch_begin(args, fresh_state(), control, model=torch.nn.Linear(2, 2))


@pytest.mark.parametrize("per_step", [False, True], ids=["per_epoch", "per_step"])
def test_gumbel_schedule_and_augmentation_epoch_survive_a_resume(tmp_path: Path, per_step: bool):
    config = fashion_config()
    train, _, _ = fashion_mnist(config, n_train=16)
    transform = train._format_kwargs["transform"]

    def run(output_dir: Path, resume: str | None, seed: int):
        recorder = Recorder(transform)
        args = trainer_args(output_dir, num_train_epochs=3, save_strategy="steps", save_steps=3)
        trainer = ProtoPoolTrainer(
            model=fashion_model(seed=seed),
            args=args,
            train_dataset=train,
            data_collator=collate_fn,
            callbacks=[GumbelScheduleCallback(per_step=per_step, epoch_offset=1), SetEpochCallback(train), recorder],
            phase="joint",
            mixup_alpha=0.5,
        )
        trainer.train(resume_from_checkpoint=resume)
        return recorder.rows, trainer.model.state_dict()

    rows, final = run(tmp_path / "full", None, seed=0)
    # 16 images, batch 8: 2 steps per epoch, 6 steps; T = 4, offset 1.
    expected = []
    for step in range(6):
        epoch = step / 2 if per_step else step // 2
        expected.append((step, gumbel_scale_at(epoch + 1, 1000.0, 4), False, step // 2))
    assert [r[0] for r in rows] == list(range(6))
    assert [r[1] for r in rows] == pytest.approx([e[1] for e in expected], rel=1e-6)
    assert [r[3] for r in rows] == [e[3] for e in expected]

    # Resume in the middle of the second epoch (after step 3) with a model initialised differently.
    resumed_rows, resumed = run(tmp_path / "full", str(tmp_path / "full" / "checkpoint-3"), seed=1)
    assert resumed_rows == rows[3:]
    for name, value in final.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6, equal_nan=True, msg=name)


def test_trainer_warns_once_when_the_scale_never_moves(tmp_path: Path):
    config = fashion_config()
    train, _, _ = fashion_mnist(config, n_train=8)

    def train_with(callbacks, harden=False):
        model = fashion_model()
        if harden:
            model.harden_assignment()
        args = trainer_args(tmp_path, max_steps=2)
        trainer = ProtoPoolTrainer(
            model=model, args=args, train_dataset=train, data_collator=collate_fn, callbacks=callbacks, phase="joint"
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()
        return [w for w in caught if issubclass(w.category, GumbelScheduleWarning)]

    caught = train_with([])
    assert len(caught) == 1
    assert "GumbelScheduleCallback" in str(caught[0].message)
    assert train_with([GumbelScheduleCallback()]) == []
    assert train_with([], harden=True) == []


# ---------------------------------------------------------------------------------------------------- warm-up guard


def test_warmup_callback_refuses_a_trainable_backbone():
    model = fashion_model()
    args, state, control = (
        TrainingArguments("unused", use_cpu=True, report_to="none"),
        TrainerState(),
        TrainerControl(),
    )
    set_trainable(model, "joint")
    with pytest.raises(ValueError, match="backbone parameters require gradients"):
        WarmupCallback().on_train_begin(args, state, control, model=model)
    set_trainable(model, "warmup")
    optimizer = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="optimizer holds"):
        WarmupCallback().on_train_begin(args, state, control, model=model, optimizer=optimizer)
    WarmupCallback().on_train_begin(
        args, state, control, model=model, optimizer=torch.optim.Adam(model.head.parameters())
    )


def test_frozen_backbone_guard_names_the_phase_it_guards():
    """Fine-tuning has its own guard; `WarmupCallback` is the warm-up's."""
    model = fashion_model()
    args, state, control = (
        TrainingArguments("unused", use_cpu=True, report_to="none"),
        TrainerState(),
        TrainerControl(),
    )
    set_trainable(model, "joint")
    with pytest.raises(ValueError, match=r"FrozenBackboneCallback: .*set_trainable\(model, 'finetune'\)"):
        FrozenBackboneCallback("finetune").on_train_begin(args, state, control, model=model)
    with pytest.raises(ValueError, match=r"WarmupCallback: .*set_trainable\(model, 'warmup'\)"):
        WarmupCallback().on_train_begin(args, state, control, model=model)
    assert isinstance(WarmupCallback(), FrozenBackboneCallback) and WarmupCallback().phase == "warmup"
    with pytest.raises(ValueError, match="'warmup' or 'finetune'; got 'joint'"):
        FrozenBackboneCallback("joint")
    set_trainable(model, "finetune")
    optimizer = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match=r"protopool_param_groups\(model, lr, 'finetune'\)"):
        FrozenBackboneCallback("finetune").on_train_begin(args, state, control, model=model, optimizer=optimizer)


def test_warmup_callback_freezes_batchnorm_statistics(tmp_path: Path):
    config = fashion_config()
    train, _, _ = fashion_mnist(config, n_train=16)
    model = fashion_model()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = model.head.prototypes.detach().clone()
    callback = WarmupCallback(freeze_batchnorm=True)
    trainer = ProtoPoolTrainer(
        model=model,
        args=trainer_args(tmp_path, max_steps=2),
        train_dataset=train,
        data_collator=collate_fn,
        callbacks=[GumbelScheduleCallback(), callback],
        phase="warmup",
        mixup_alpha=0.5,
    )
    trainer.train()
    after = model.backbone.state_dict()
    for name, value in before.items():  # weights and BatchNorm statistics alike
        torch.testing.assert_close(after[name], value, rtol=0, atol=0, msg=name)
    assert not torch.equal(model.head.prototypes, head_before)  # the head did train
    # The hook is gone after training: the backbone follows model.train() again.
    model.train()
    model(torch.randn(2, 3, 32, 32))
    assert all(module.training for module in model.backbone.modules())
    assert callback._hooks == []


# ---------------------------------------------------------------------------------------------------- projection


def test_projection_callback_projects_at_chosen_epochs_and_hardens_at_the_end(tmp_path: Path):
    config = fashion_config()
    train, _, plain = fashion_mnist(config, n_train=24)
    model = fashion_model()
    recorder = Recorder()
    callback = ProjectionCallback(plain, at_epochs=[1], batch_size=16)
    trainer = ProtoPoolTrainer(
        model=model,
        args=trainer_args(tmp_path, num_train_epochs=2),
        train_dataset=train,
        data_collator=collate_fn,
        callbacks=[GumbelScheduleCallback(), callback, recorder],
        phase="joint",
    )
    trainer.train()
    assert callback.num_projections == 2
    assert not any(hard for _, _, hard, _ in recorder.rows)  # the epoch-1 projection kept the assignment soft
    assert model.is_assignment_hard

    result = callback.result
    projected = (result.image_index >= 0).nonzero().flatten().tolist()
    assert projected, "no prototype was projected"
    model.eval()
    batch = collate_fn([plain[i] for i in range(len(plain))])
    with torch.no_grad():
        latent = model.latent_map(batch["pixel_values"])  # (N, D, H, W)
    for p in projected:
        patch = latent[result.image_index[p], :, result.row[p], result.col[p]]
        torch.testing.assert_close(model.head.prototypes[p].detach(), patch, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.head.projection_image_index, result.image_index)


def test_projection_callback_checks_its_arguments():
    with pytest.raises(ValueError, match="un-augmented"):
        ProjectionCallback(None)
    with pytest.raises(ValueError, match="at_epochs"):
        ProjectionCallback([{}], at_epochs=[0])
    with pytest.raises(ValueError, match="batch_size"):
        ProjectionCallback([{}], batch_size=0)


# ---------------------------------------------------------------------------------------------------- set_epoch


def test_set_epoch_callback_accepts_transforms_and_transformed_datasets():
    config = fashion_config()
    transform = make_transforms(config, train=True)
    train, _, _ = fashion_mnist(config, n_train=4)
    dataset_transform = train._format_kwargs["transform"]
    callback = SetEpochCallback(transform, torch.utils.data.Subset(train, [0, 1]), epoch_offset=3)
    args, control = TrainingArguments("unused", use_cpu=True, report_to="none"), TrainerControl()
    callback.on_train_begin(args, fresh_state(epoch=1.5), control)
    assert (transform.epoch, dataset_transform.epoch) == (4, 4)
    callback.on_epoch_begin(args, fresh_state(epoch=2.0), control)
    assert (transform.epoch, dataset_transform.epoch) == (5, 5)
    with pytest.raises(TypeError, match="set_epoch"):
        SetEpochCallback([1, 2, 3])
