"""protopool_hf.training: the whole recipe (train_protopool), its loss per phase and resume, the split, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from transformers import TrainerCallback

from protopool_hf import ProtoPoolForImageClassification
from protopool_hf.data import load_fashion_mnist
from protopool_hf.losses import LOSS_TERM_NAMES, background_cells
from protopool_hf.recipe import ProtoPoolRecipe
from protopool_hf.training import finish_distributed, split_train_validation, train_protopool
from protopool_hf.transforms import collate_fn, make_transforms


sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from protopool_tiny import (
    FASHION_MNIST,
    assert_state_dicts_equal,
    fashion_config,
    fashion_mnist,
    fashion_mnist_test,
    fashion_model,
    snapshot,
)


SCRIPTS = Path(__file__).parent / "scripts"


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
    config = fashion_config()
    train, val, plain = fashion_mnist(config, n_train=16, n_val=8)

    full = train_protopool(fashion_model(seed=0), train, val, plain, tiny_recipe(tmp_path / "full"))
    expected = snapshot(full.model)
    assert full.model.is_assignment_hard
    assert set(full.metrics) == {"warmup", "joint", "finetune"}

    # Interrupted in the middle of the joint phase's second epoch (16 images, batch 8: steps 0-3, checkpoint-3).
    run = tmp_path / "interrupted"
    with pytest.raises(InterruptError):
        train_protopool(
            fashion_model(seed=0), train, val, plain, tiny_recipe(run), callbacks=[InterruptAt("joint", 3)]
        )
    assert (run / "warmup" / "phase_complete.json").is_file()
    assert not (run / "joint" / "phase_complete.json").exists()
    with pytest.raises(ValueError, match="resume_from_checkpoint=True"):
        train_protopool(fashion_model(seed=0), train, val, plain, tiny_recipe(run))
    resumed = train_protopool(fashion_model(seed=1), train, val, plain, tiny_recipe(run), resume_from_checkpoint=True)
    assert_state_dicts_equal(snapshot(resumed.model), expected)

    # A finished run resumed again trains nothing and returns the same model; the saved folder loads.
    again = train_protopool(fashion_model(seed=2), train, val, plain, tiny_recipe(run), resume_from_checkpoint=True)
    assert_state_dicts_equal(snapshot(again.model), expected)
    loaded = ProtoPoolForImageClassification.from_pretrained(run)
    assert_state_dicts_equal(snapshot(loaded), expected)
    assert loaded.config.projection_dataset == full.model.config.projection_dataset
    recipe = json.loads((run / "protopool_recipe.json").read_text())
    assert recipe["warmup_epochs"] == 1


class RecordLossWeights(TrainerCallback):
    """Record, per phase, the loss weights of the model's config at each step and the logged loss terms."""

    NAMES = ("cluster_weight", "separation_weight", "orthogonality_weight", "l1_weight")

    def __init__(self) -> None:
        self.weights: dict[str, set[tuple[float, ...]]] = {}
        self.logged: dict[str, set[str]] = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        weights = tuple(getattr(model.config, name) for name in self.NAMES)
        self.weights.setdefault(Path(args.output_dir).name, set()).add(weights)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            terms = set(LOSS_TERM_NAMES) & logs.keys()
            self.logged.setdefault(Path(args.output_dir).name, set()).update(terms)


def test_each_phase_trains_the_model_loss_with_the_recipe_loss_weights(tmp_path: Path):
    config = fashion_config()
    train, _, plain = fashion_mnist(config, n_train=8)
    main = (config.cluster_weight, config.separation_weight, config.orthogonality_weight, config.l1_weight)
    record = RecordLossWeights()
    recipe = tiny_recipe(tmp_path / "run", joint_epochs=1, eval_strategy="no", save_strategy="steps", save_steps=1)
    with pytest.warns(UserWarning, match="no image of their classes"):  # 8 images do not cover the 10 classes
        result = train_protopool(fashion_model(seed=0), train, None, plain, recipe, callbacks=[record])
    assert record.weights == {"warmup": {main}, "joint": {main}, "finetune": {(0.0, 0.0, 0.0, config.l1_weight)}}
    assert record.logged["joint"] == {"cross_entropy", "cluster", "separation", "orthogonality", "l1"}
    assert record.logged["finetune"] == {"cross_entropy", "l1"}
    # The fine-tuning checkpoints carry fine-tuning's weights; the model returned and saved, the config it came with.
    checkpoint = json.loads((tmp_path / "run" / "finetune" / "checkpoint-1" / "config.json").read_text())
    assert (checkpoint["cluster_weight"], checkpoint["orthogonality_weight"]) == (0.0, 0.0)
    saved = ProtoPoolForImageClassification.from_pretrained(tmp_path / "run").config
    for model_config in (result.model.config, saved):
        assert tuple(getattr(model_config, name) for name in RecordLossWeights.NAMES) == main


def test_recipe_with_object_masks_trains_the_background_term_and_projects_onto_objects(tmp_path: Path):
    """The demo's options beyond the official method: object masks in the batches, the background term, the
    projection restricted to object cells."""
    config = fashion_config(background_weight=1.0)
    raw = load_fashion_mnist(FASHION_MNIST, split="train", limit=16)
    train = raw.with_transform(make_transforms(config, train=True, object_mask="nonzero"))
    plain = raw.with_transform(make_transforms(config, train=False, object_mask="nonzero"))
    record = RecordLossWeights()
    recipe = tiny_recipe(
        tmp_path / "run", joint_epochs=1, eval_strategy="no", save_strategy="no", projection_restrict_to_objects=True
    )
    with pytest.warns(UserWarning, match="with an object cell was among the 16 scanned"):  # 16 images, 10 classes
        result = train_protopool(
            fashion_model(seed=0, background_weight=1.0), train, None, plain, recipe, callbacks=[record]
        )
    assert "background" in record.logged["joint"] and "background" not in record.logged["finetune"]
    model, projection = result.model, result.projection
    size = tuple(config.input_size[1:])
    with torch.no_grad():
        height, width = model.latent_map(torch.zeros(1, 3, *size)).shape[-2:]
    for p in projection.used:
        if projection.is_projected[p]:
            mask = plain[int(projection.image_index[p])]["object_mask"][None]
            assert not background_cells(mask, (height, width))[0, projection.row[p], projection.col[p]]
    # Without masks in the projection data the recipe stops before any training.
    plain_without = raw.with_transform(make_transforms(config, train=False))
    again = tiny_recipe(tmp_path / "again", projection_restrict_to_objects=True)
    with pytest.raises(ValueError, match="no `object_mask`"):
        train_protopool(fashion_model(), train, None, plain_without, again)
    assert not (tmp_path / "again" / "warmup").exists()


def test_train_protopool_checks_its_arguments(tmp_path: Path):
    recipe = ProtoPoolRecipe(output_dir=str(tmp_path), use_cpu=True)
    model = fashion_model()
    with pytest.raises(ValueError, match="projection_dataset"):
        train_protopool(model, [{}], None, None, recipe)
    (tmp_path / "joint").mkdir()
    with pytest.raises(FileNotFoundError, match=r"trainer_state\.json"):
        train_protopool(model, [{}], None, [{}], recipe, resume_from_checkpoint=str(tmp_path / "joint" / "nope"))


def recipe_on_fashion_mnist(tmp_path: Path, n_train: int, joint_epochs: int, finetune_epochs: int, **config) -> float:
    """Train on the committed Fashion-MNIST slice (un-augmented, no mixup); the test accuracy of the saved model."""
    config = fashion_config(**config)
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


@pytest.mark.filterwarnings("ignore:Prototypes .* are used by class slots")  # 16 images do not cover every class
def test_two_cpu_runs_with_the_same_seed_give_identical_weights(tmp_path):
    config = fashion_config()
    train, _, plain = fashion_mnist(config, n_train=16)
    weights = []
    for run in ("first", "second"):
        recipe = ProtoPoolRecipe(
            output_dir=str(tmp_path / run),
            warmup_epochs=1,  # 16 images in batches of 8: two warm-up steps, two joint steps, the projection
            joint_epochs=1,
            finetune_epochs=0,
            train_batch_size=8,
            projection_batch_size=16,
            save_strategy="no",
            eval_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
        )
        result = train_protopool(fashion_model(seed=0), train, None, plain, recipe)
        weights.append({k: v.detach().clone() for k, v in result.model.state_dict().items()})
    assert weights[0].keys() == weights[1].keys()
    for name, value in weights[0].items():  # exactly equal; NaN marks prototypes the projection did not move
        torch.testing.assert_close(weights[1][name], value, rtol=0, atol=0, equal_nan=True, msg=name)
    initial = fashion_model(seed=0).state_dict()
    assert not torch.equal(weights[0]["head.add_on.0.weight"], initial["head.add_on.0.weight"])  # it did train
