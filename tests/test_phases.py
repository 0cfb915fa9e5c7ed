"""protopool_hf.phases: what trains in each phase (set_trainable), its optimizer groups, the per-epoch step decay."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from protopool_hf import ProtoPoolForImageClassification
from protopool_hf.backbone import leading_stage_parameters
from protopool_hf.callbacks import GumbelScheduleCallback
from protopool_hf.phases import EpochStepDecay, protopool_param_groups, set_trainable
from protopool_hf.recipe import ProtoPoolRecipe
from protopool_hf.trainer import ProtoPoolTrainer
from protopool_hf.training import train_protopool
from protopool_hf.transforms import collate_fn


sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from protopool_tiny import changed, fashion_config, fashion_mnist, fashion_model, snapshot, trainer_args


def test_param_groups_follow_the_official_optimizers():
    model = fashion_model()
    lr = 1e-3
    expected = {
        "warmup": [("add_on", 3 * lr, 1e-3), ("prototypes", 3 * lr, 0.0), ("slot_logits", 3 * lr, 0.0)],
        "joint": [
            ("backbone", lr / 10, 1e-3),
            ("add_on", 3 * lr, 1e-3),
            ("prototypes", 3 * lr, 0.0),
            ("slot_logits", 3 * lr, 0.0),
        ],
        "finetune": [("last_layer", lr / 10, 1e-3)],
    }
    head = model.head
    members = {
        "backbone": set(map(id, model.backbone.parameters())),
        "add_on": {id(head.add_on[0].weight), id(head.add_on[0].bias)},
        "prototypes": {id(head.prototypes)},
        "slot_logits": {id(head.slot_logits)},
        "last_layer": {id(head.last_layer.weight)},
    }
    for phase, groups in expected.items():
        got = protopool_param_groups(model, lr, phase)
        assert [g["name"] for g in got] == [name for name, _, _ in groups]
        assert [g["lr"] for g in got] == pytest.approx([lr_ for _, lr_, _ in groups])
        assert [g["weight_decay"] for g in got] == pytest.approx([wd for _, _, wd in groups])
        for group in got:
            assert set(map(id, group["params"])) == members[group["name"]]
        set_trainable(model, phase)
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert trainable == set().union(*(members[name] for name, _, _ in groups))
        torch.optim.Adam(got)  # Adam accepts the groups as they are
    assert protopool_param_groups(model, 1e-2, "joint", weight_decay=0.5)[0]["weight_decay"] == 0.5
    with pytest.raises(ValueError, match="phase"):
        protopool_param_groups(model, lr, "pretrain")
    with pytest.raises(ValueError, match="learning rate"):
        protopool_param_groups(model, 0.0, "joint")


def test_epoch_step_decay_is_steplr_per_epoch():
    decay = EpochStepDecay(steps_per_epoch=3, step_epochs=5, gamma=0.1)
    assert [decay(s) for s in (0, 14, 15, 29, 30)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    with pytest.raises(ValueError, match="steps_per_epoch"):
        EpochStepDecay(0, 5, 0.1)


def test_backbone_and_finetune_learning_rates_replace_only_their_groups(tmp_path: Path):
    model = fashion_model()
    recipe = ProtoPoolRecipe(
        output_dir=str(tmp_path), use_cpu=True, learning_rate=1e-3, backbone_learning_rate=5e-4,
        finetune_learning_rate=0.02,
    )  # fmt: skip
    expected = {
        "warmup": [("add_on", 3e-3), ("prototypes", 3e-3), ("slot_logits", 3e-3)],
        "joint": [("backbone", 5e-4), ("add_on", 3e-3), ("prototypes", 3e-3), ("slot_logits", 3e-3)],
        "finetune": [("last_layer", 0.02)],
    }
    for phase, groups in expected.items():
        trainer = ProtoPoolTrainer(
            model=model, args=recipe.training_arguments(phase, False), phase=phase,
            group_lrs=recipe.phase_group_lrs(phase),
        )  # fmt: skip
        got = [(g["name"], g["lr"]) for g in trainer.create_optimizer().param_groups]
        assert got == [(name, pytest.approx(lr)) for name, lr in groups]
    official = ProtoPoolRecipe(output_dir=str(tmp_path), use_cpu=True, learning_rate=1e-3)
    assert official.phase_group_lrs("joint") == official.phase_group_lrs("finetune") == {}
    with pytest.raises(ValueError, match="unknown groups \\['head'\\]"):
        protopool_param_groups(model, 1e-3, "joint", group_lrs={"head": 1.0})
    with pytest.raises(ValueError, match="group_lrs must be > 0"):
        ProtoPoolTrainer(model=model, args=official.training_arguments("joint", False), group_lrs={"backbone": 0})


def test_frozen_backbone_stages_keep_the_stem_and_first_stages_fixed_in_the_joint_phase(tmp_path: Path):
    config = fashion_config(feature_stage=2, input_size=[3, 32, 32])
    train, _, _ = fashion_mnist(config, n_train=16)
    model = ProtoPoolForImageClassification(config)
    stem = {f"backbone.{name}" for name in leading_stage_parameters(model.backbone, 1)}
    assert stem == {
        name for name, _ in model.named_parameters() if name.startswith(("backbone.conv1", "backbone.bn1"))
    }
    frozen = {f"backbone.{name}" for name in leading_stage_parameters(model.backbone, 2)}
    assert stem < frozen and any(name.startswith("backbone.layer1.") for name in frozen)
    start = snapshot(model)
    trainer = ProtoPoolTrainer(
        model=model, args=trainer_args(tmp_path), train_dataset=train, data_collator=collate_fn,
        callbacks=[GumbelScheduleCallback()], phase="joint", frozen_backbone_stages=2,
    )  # fmt: skip
    assert {name for name, p in model.named_parameters() if not p.requires_grad} == frozen | {"head.last_layer.weight"}
    trainer.train()
    moved = changed(start, snapshot(model))
    backbone = {name for name, _ in model.named_parameters() if name.startswith("backbone.")}
    assert not moved & frozen, "a frozen stage changed"
    assert backbone - frozen <= moved  # layer2 trains
    assert (
        "backbone.bn1.running_mean" in moved
    )  # frozen stages still update their BatchNorm statistics, as the warm-up

    set_trainable(model, "warmup", frozen_backbone_stages=2)  # the warm-up and fine-tuning freeze the backbone anyway
    assert not any(p.requires_grad for p in model.backbone.parameters())
    with pytest.raises(ValueError, match="pass phase='joint' as well"):
        ProtoPoolTrainer(model=model, args=trainer_args(tmp_path), frozen_backbone_stages=1)
    with pytest.raises(ValueError, match="frozen_backbone_stages must be an int >= 0"):
        ProtoPoolRecipe(frozen_backbone_stages=-1)
    recipe = ProtoPoolRecipe(output_dir=str(tmp_path / "run"), use_cpu=True, frozen_backbone_stages=9)
    with pytest.raises(ValueError, match="frozen_backbone_stages=9: The number of leading stages must be an int in"):
        train_protopool(model, train, None, train, recipe)
    assert not (tmp_path / "run").exists()  # refused before anything was written
