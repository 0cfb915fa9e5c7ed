"""Training: parameter groups, phases, mixup and term logging, the step decay, the recipe and its resume, DDP."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from transformers import TrainerCallback

from protopool_hf import ProtoPoolForImageClassification
from protopool_hf.backbone import leading_stage_parameters
from protopool_hf.callbacks import GumbelScheduleCallback
from protopool_hf.losses import LOSS_TERM_NAMES, weighted_total
from protopool_hf.training import (
    EpochStepDecay,
    ProtoPoolRecipe,
    ProtoPoolTrainer,
    compute_accuracy,
    finish_distributed,
    mixup_draw,
    protopool_param_groups,
    set_trainable,
    split_train_validation,
    train_protopool,
)
from protopool_hf.transforms import collate_fn


sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from protopool_tiny import fashion_mnist, fashion_mnist_test, tiny_config, tiny_model, trainer_args


SCRIPTS = Path(__file__).parent / "scripts"


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {k for k, v in before.items() if not torch.equal(v, after[k])}


def assert_state_dicts_equal(actual: dict, expected: dict, atol: float = 1e-6) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=0, atol=atol, equal_nan=True, msg=name)


# ---------------------------------------------------------------------------------------------------- groups


def test_param_groups_follow_the_official_optimizers():
    model = tiny_model()
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


def test_epoch_step_decay_and_mixup_draws():
    decay = EpochStepDecay(steps_per_epoch=3, step_epochs=5, gamma=0.1)
    assert [decay(s) for s in (0, 14, 15, 29, 30)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    with pytest.raises(ValueError, match="steps_per_epoch"):
        EpochStepDecay(0, 5, 0.1)
    lam, perm = mixup_draw(0.5, 8, 0, 3, 0, 0)
    lam2, perm2 = mixup_draw(0.5, 8, 0, 3, 0, 0)
    assert lam == lam2 and perm.tolist() == perm2.tolist()
    assert sorted(perm.tolist()) == list(range(8))
    draws = {mixup_draw(0.5, 8, 0, step, 0, 0)[0] for step in range(50)}
    assert len(draws) == 50 and all(0 <= d <= 1 for d in draws)
    # Beta(0.5, 0.5) is U-shaped: most draws are near 0 or 1.
    assert np.mean([abs(d - 0.5) > 0.25 for d in draws]) > 0.5
    with pytest.raises(ValueError, match="alpha"):
        mixup_draw(0.0, 8, 0)


# ---------------------------------------------------------------------------------------------------- phases


def test_warmup_trains_no_backbone_parameter_and_joint_does(tmp_path: Path):
    config = tiny_config()
    train, val, _ = fashion_mnist(config, n_train=16, n_val=8)
    model = tiny_model()
    start = snapshot(model)

    warmup = ProtoPoolTrainer(
        model=model,
        args=trainer_args(tmp_path / "warmup"),
        train_dataset=train,
        data_collator=collate_fn,
        callbacks=[GumbelScheduleCallback()],
        phase="warmup",
        mixup_alpha=0.5,
    )
    warmup.train()
    after_warmup = snapshot(model)
    moved = changed(start, after_warmup)
    backbone_weights = {k for k, _ in model.named_parameters() if k.startswith("backbone.")}
    assert not moved & backbone_weights, "the warm-up changed backbone weights"
    assert {k for k in moved if k.startswith("backbone.")} >= {"backbone.conv1.1.running_mean"}  # BN statistics
    assert {"head.add_on.0.weight", "head.prototypes", "head.slot_logits"} <= moved
    assert "head.last_layer.weight" not in moved
    assert model.gumbel_scale == pytest.approx(500.0)  # T = 4: 1000·sqrt(1/4) in epoch 0
    del warmup

    # The joint phase is a new Trainer (a new DDP wrapper and optimizer); it continues the schedule at epoch 1.
    joint = ProtoPoolTrainer(
        model=model,
        args=trainer_args(tmp_path / "joint", num_train_epochs=2),
        train_dataset=train,
        eval_dataset=val,
        data_collator=collate_fn,
        compute_metrics=compute_accuracy,
        callbacks=[GumbelScheduleCallback(epoch_offset=1)],
        phase="joint",
        mixup_alpha=0.5,
        lr_step_epochs=1,
        lr_step_gamma=0.5,
    )
    assert [g["name"] for g in joint.create_optimizer().param_groups] == [
        "backbone", "add_on", "prototypes", "slot_logits",
    ]  # fmt: skip
    joint.train()
    moved = changed(after_warmup, snapshot(model))
    assert backbone_weights <= moved
    assert "head.last_layer.weight" not in moved
    assert model.gumbel_scale == pytest.approx(1000 * math.sqrt(3 / 4))

    # Training logs: each term averaged like `loss` (so the weighted terms add up to it), the scale, the decayed lr.
    logs = [entry for entry in joint.state.log_history if "loss" in entry]
    assert len(logs) == 4
    for entry in logs:
        assert set(LOSS_TERM_NAMES) | {"gumbel_scale", "learning_rate"} <= entry.keys()
        total = weighted_total({name: torch.tensor(entry[name]) for name in LOSS_TERM_NAMES}, model.loss_weights)
        assert float(total) == pytest.approx(entry["loss"], rel=1e-5, abs=1e-6)
    assert [entry["learning_rate"] for entry in logs] == pytest.approx([1e-4, 1e-4, 5e-5, 5e-5])
    assert [entry["gumbel_scale"] for entry in logs] == pytest.approx([1000 * math.sqrt(2 / 4)] * 2 + [866.0254] * 2)

    # Evaluation: the terms with the eval prefix, no mixup (the eval loss is the model's own loss).
    metrics = joint.evaluate()
    assert {f"eval_{name}" for name in LOSS_TERM_NAMES} | {"eval_loss", "eval_accuracy"} <= metrics.keys()
    model.eval()
    batch = collate_fn([val[i] for i in range(len(val))])
    with torch.no_grad():
        reference = model(**batch)
    assert metrics["eval_loss"] == pytest.approx(float(reference.loss), rel=1e-5)
    for name in LOSS_TERM_NAMES:
        assert metrics[f"eval_{name}"] == pytest.approx(float(reference.loss_terms[name]), rel=1e-5, abs=1e-7)


def test_trainer_loss_with_and_without_mixup(tmp_path: Path):
    config = tiny_config()
    train, _, _ = fashion_mnist(config, n_train=8)
    batch = collate_fn([train[i] for i in range(8)])
    model = tiny_model()

    def loss_of(trainer, training: bool) -> torch.Tensor:
        model.train(training)
        torch.manual_seed(0)  # the Gumbel noise of a training forward
        with torch.no_grad():
            return trainer.compute_loss(model, dict(batch))

    def model_loss(training: bool) -> torch.Tensor:
        model.train(training)
        torch.manual_seed(0)
        with torch.no_grad():
            return model(**batch).loss

    plain = ProtoPoolTrainer(model=model, args=trainer_args(tmp_path), data_collator=collate_fn, mixup_alpha=0.0)
    mixing = ProtoPoolTrainer(model=model, args=trainer_args(tmp_path), data_collator=collate_fn, mixup_alpha=0.5)
    for training in (True, False):
        assert torch.equal(loss_of(plain, training), model_loss(training))
    assert torch.equal(loss_of(mixing, False), model_loss(False))  # evaluation never mixes

    # A training batch is mixed with λ and the permutation drawn from (seed, step, micro-batch, process).
    mixed = loss_of(mixing, True)
    assert not torch.equal(mixed, model_loss(True))
    lam, perm = mixup_draw(0.5, 8, 0, 0, 1, 0)  # the second draw at step 0 (the first went to `mixed`)
    perm = torch.as_tensor(perm)
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        outputs = model(pixel_values=lam * batch["pixel_values"] + (1 - lam) * batch["pixel_values"][perm])
        terms = model.loss_terms(outputs, batch["labels"], batch["labels"][perm], lam)
    assert torch.equal(loss_of(mixing, True), weighted_total(terms, model.loss_weights))

    # Fine-tuning keeps CE + L1 only.
    finetune = ProtoPoolTrainer(
        model=model, args=trainer_args(tmp_path), data_collator=collate_fn, loss_terms=("cross_entropy", "l1")
    )
    model.eval()
    with torch.no_grad():
        out = model(**batch)
        expected = out.loss_terms["cross_entropy"] + model.config.l1_weight * out.loss_terms["l1"]
    torch.testing.assert_close(loss_of(finetune, False), expected)
    with pytest.raises(ValueError, match="loss_terms"):
        ProtoPoolTrainer(model=model, args=trainer_args(tmp_path), loss_terms=("focal",))
    with pytest.raises(ValueError, match="mixup_alpha"):
        ProtoPoolTrainer(model=model, args=trainer_args(tmp_path), mixup_alpha=-1)


# ---------------------------------------------------------------------------------------------------- recipe


def tiny_recipe(output_dir: Path, **overrides) -> ProtoPoolRecipe:
    kwargs = {
        "output_dir": str(output_dir),
        "warmup_epochs": 1,
        "joint_epochs": 2,
        "finetune_epochs": 1,
        "train_batch_size": 8,
        "eval_batch_size": 16,
        "projection_batch_size": 16,
        "use_cpu": True,
        "disable_tqdm": True,
        "logging_steps": 1,
        "eval_strategy": "steps",
        "save_strategy": "steps",
        "eval_steps": 3,
        "save_steps": 3,
    }
    kwargs.update(overrides)
    return ProtoPoolRecipe(**kwargs)


class InterruptError(Exception):
    pass


class InterruptAt(TrainerCallback):
    """Raise at the start of a step of one phase, after that phase's checkpoint at `step` was written."""

    def __init__(self, phase: str, step: int) -> None:
        self.phase, self.step = phase, step

    def on_step_begin(self, args, state, control, **kwargs):
        if Path(args.output_dir).name == self.phase and state.global_step == self.step:
            raise InterruptError(f"{self.phase} step {self.step}")


def test_recipe_interrupted_and_resumed_equals_uninterrupted(tmp_path: Path):
    config = tiny_config()
    train, val, plain = fashion_mnist(config, n_train=16, n_val=8)

    full = train_protopool(tiny_model(seed=0), train, val, plain, tiny_recipe(tmp_path / "full"))
    expected = snapshot(full.model)
    assert full.model.is_assignment_hard
    assert set(full.metrics) == {"warmup", "joint", "finetune"}

    # Interrupted in the middle of the joint phase's second epoch (16 images, batch 8: steps 0-3, checkpoint-3).
    run = tmp_path / "interrupted"
    with pytest.raises(InterruptError):
        train_protopool(tiny_model(seed=0), train, val, plain, tiny_recipe(run), callbacks=[InterruptAt("joint", 3)])
    assert (run / "warmup" / "phase_complete.json").is_file()
    assert not (run / "joint" / "phase_complete.json").exists()
    with pytest.raises(ValueError, match="resume_from_checkpoint=True"):
        train_protopool(tiny_model(seed=0), train, val, plain, tiny_recipe(run))
    resumed = train_protopool(tiny_model(seed=1), train, val, plain, tiny_recipe(run), resume_from_checkpoint=True)
    assert_state_dicts_equal(snapshot(resumed.model), expected)

    # A finished run resumed again trains nothing and returns the same model; the saved folder loads.
    again = train_protopool(tiny_model(seed=2), train, val, plain, tiny_recipe(run), resume_from_checkpoint=True)
    assert_state_dicts_equal(snapshot(again.model), expected)
    loaded = ProtoPoolForImageClassification.from_pretrained(run)
    assert_state_dicts_equal(snapshot(loaded), expected)
    assert loaded.config.projection_dataset == full.model.config.projection_dataset
    recipe = json.loads((run / "protopool_recipe.json").read_text())
    assert recipe["warmup_epochs"] == 1


def test_recipe_checks_its_arguments(tmp_path: Path):
    with pytest.raises(ValueError, match="warmup_epochs"):
        ProtoPoolRecipe(warmup_epochs=-1)
    with pytest.raises(ValueError, match="warmup_epochs \\+ joint_epochs"):
        ProtoPoolRecipe(warmup_epochs=0, joint_epochs=0)
    with pytest.raises(ValueError, match="eval_strategy"):
        ProtoPoolRecipe(eval_strategy="sometimes")
    with pytest.raises(ValueError, match="training_args may not set"):
        ProtoPoolRecipe(training_args={"seed": 3})
    recipe = ProtoPoolRecipe(output_dir=str(tmp_path), use_cpu=True)
    args = recipe.training_arguments("joint")
    assert (args.num_train_epochs, args.load_best_model_at_end, args.metric_for_best_model) == (21, True, "accuracy")
    assert (args.weight_decay, args.max_grad_norm, args.seed) == (1e-3, 0.0, 1)
    assert Path(args.output_dir) == tmp_path / "joint"
    assert not recipe.training_arguments("warmup").load_best_model_at_end
    assert recipe.training_arguments("finetune", evaluate=False).eval_strategy == "no"
    assert (recipe.epoch_offset("joint"), recipe.epoch_offset("finetune")) == (9, 30)
    model = tiny_model()
    with pytest.raises(ValueError, match="projection_dataset"):
        train_protopool(model, [{}], None, None, recipe)
    (tmp_path / "joint").mkdir()
    with pytest.raises(FileNotFoundError, match=r"trainer_state\.json"):
        train_protopool(model, [{}], None, [{}], recipe, resume_from_checkpoint=str(tmp_path / "joint" / "nope"))
    with pytest.raises(ValueError, match="finetune_learning_rate must be > 0"):
        ProtoPoolRecipe(finetune_learning_rate=0.0)
    with pytest.raises(ValueError, match="backbone_learning_rate must be > 0"):
        ProtoPoolRecipe(backbone_learning_rate=-1e-4)


def test_backbone_and_finetune_learning_rates_replace_only_their_groups(tmp_path: Path):
    model = tiny_model()
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
    config = tiny_config(feature_stage=2, input_size=[3, 32, 32])
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


def recipe_on_fashion_mnist(tmp_path: Path, n_train: int, joint_epochs: int, finetune_epochs: int, **config) -> float:
    """Train on the committed Fashion-MNIST slice (un-augmented, no mixup); the test accuracy of the saved model."""
    config = tiny_config(**config)
    _, val, plain = fashion_mnist(config, n_train=n_train, n_val=100)
    recipe = tiny_recipe(
        tmp_path,
        warmup_epochs=1,
        joint_epochs=joint_epochs,
        finetune_epochs=finetune_epochs,
        learning_rate=1e-2,
        train_batch_size=16,
        eval_batch_size=100,
        projection_batch_size=100,
        mixup_alpha=0.0,
        eval_strategy="epoch",
        save_strategy="epoch",
        eval_steps=None,
        save_steps=None,
        logging_steps=50,
    )
    model = ProtoPoolForImageClassification(config)
    train_protopool(model, plain, val, plain, recipe)
    loaded = ProtoPoolForImageClassification.from_pretrained(tmp_path).eval()
    assert loaded.is_assignment_hard
    assert (loaded.head.projection_image_index >= 0).any()
    assert_state_dicts_equal(snapshot(loaded), snapshot(model), atol=0)
    test = fashion_mnist_test(config, 200)
    batch = collate_fn([test[i] for i in range(len(test))])
    with torch.no_grad():
        return float((loaded(batch["pixel_values"]).logits.argmax(-1) == batch["labels"]).float().mean())


@pytest.mark.slow  # a three-phase recipe on 300 Fashion-MNIST images: 36 s on a 2-core machine
def test_short_recipe_on_fashion_mnist_beats_chance(tmp_path: Path):
    torch.manual_seed(0)
    accuracy = recipe_on_fashion_mnist(tmp_path, 300, 3, 2, num_prototypes=30, num_slots_per_class=2)
    assert accuracy > 0.3, f"test accuracy {accuracy:.3f}, chance 0.1"


@pytest.mark.slow
def test_recipe_on_fashion_mnist_beats_chance_by_far(tmp_path: Path):
    torch.manual_seed(0)
    accuracy = recipe_on_fashion_mnist(tmp_path, 1800, 5, 3)
    assert accuracy > 0.6, f"test accuracy {accuracy:.3f}, chance 0.1"


# ---------------------------------------------------------------------------------------------------- helpers


def test_split_train_validation_is_stratified_and_disjoint():
    labels = [0] * 30 + [1] * 20 + [2] * 10
    ds = datasets.Dataset.from_dict(
        {"x": list(range(60)), "label": labels},
        features=datasets.Features({"x": datasets.Value("int64"), "label": datasets.ClassLabel(num_classes=3)}),
    )
    train, val = split_train_validation(ds, fraction=0.2, seed=1)
    assert sorted(val["label"]) == [0] * 6 + [1] * 4 + [2] * 2
    train_x, val_x = list(train["x"]), list(val["x"])
    assert sorted(train_x + val_x) == list(range(60))
    assert train_x == sorted(train_x) and val_x == sorted(val_x)
    assert list(split_train_validation(ds, fraction=0.2, seed=1)[1]["x"]) == val_x
    assert list(split_train_validation(ds, fraction=0.2, seed=2)[1]["x"]) != val_x

    items = [{"labels": y} for y in labels]
    _, val_subset = split_train_validation(items, 0.5, seed=0, labels=labels)
    assert isinstance(val_subset, torch.utils.data.Subset)
    assert sorted(items[i]["labels"] for i in val_subset.indices) == [0] * 15 + [1] * 10 + [2] * 5
    assert len(split_train_validation(list(range(10)), 0.3)[1]) == 3  # no labels: a random split
    with pytest.raises(ValueError, match="fraction"):
        split_train_validation(ds, fraction=1.0)
    with pytest.raises(ValueError, match="leaves 0"):
        split_train_validation(ds, fraction=0.01)


def test_finish_distributed_waits_then_destroys_the_group_and_without_one_does_nothing(tmp_path, monkeypatch):
    calls = []
    barrier, destroy = torch.distributed.barrier, torch.distributed.destroy_process_group

    def recorded(name, function):
        def call(*args, **kwargs):
            calls.append(name)
            return function(*args, **kwargs)

        return call

    monkeypatch.setattr(torch.distributed, "barrier", recorded("barrier", barrier))
    monkeypatch.setattr(torch.distributed, "destroy_process_group", recorded("destroy", destroy))
    assert not torch.distributed.is_initialized()
    finish_distributed()
    assert calls == []  # no group: no barrier (which would raise) and nothing to destroy
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        finish_distributed()
        assert calls == ["barrier", "destroy"] and not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            destroy()


# ---------------------------------------------------------------------------------------------------- DDP


@pytest.mark.slow
def test_two_process_ddp_recipe_keeps_replicas_equal(tmp_path: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(SCRIPTS.parent.parent)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
        str(SCRIPTS / "ddp_recipe.py"), str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for report in reports:
        assert report["world_size"] == 2
        checks = {check["where"]: check for check in report["checks"]}
        assert set(checks) == {
            "warmup:end", "joint:start", "joint:first_step", "joint:end", "finetune:end", "recipe:end",
        }  # fmt: skip
        # Parameters agree everywhere, in particular one optimizer step after the warm-up -> joint switch; buffers
        # (BatchNorm statistics) agree whenever DDP or the recipe has synced them.
        assert all(check["parameters_equal"] for check in checks.values()), checks
        assert checks["joint:start"]["equal"] and checks["recipe:end"]["equal"], checks
    assert reports[0]["final_checksum"] == reports[1]["final_checksum"]
    assert reports[0]["backbone_moved_in_joint"] and not reports[0]["backbone_moved_in_warmup"]
    assert reports[0]["stem_moved_in_joint"] is False  # frozen_backbone_stages=1 keeps it fixed under DDP too
    model = ProtoPoolForImageClassification.from_pretrained(tmp_path / "run")
    assert model.is_assignment_hard
