"""protopool_hf.trainer: mixup draws, the trainer's phases, its loss (the model's) and per-term logs."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from protopool_hf import ProtoPoolForImageClassification
from protopool_hf.callbacks import GumbelScheduleCallback
from protopool_hf.losses import LOSS_TERM_NAMES, orthogonality_loss, weighted_total
from protopool_hf.recipe import ProtoPoolRecipe
from protopool_hf.trainer import ProtoPoolTrainer, compute_accuracy, mixup_draw
from protopool_hf.transforms import collate_fn


sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from protopool_tiny import changed, fashion_config, fashion_mnist, fashion_model, snapshot, trainer_args


def test_mixup_draws_depend_only_on_seed_and_keys():
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


def test_warmup_trains_no_backbone_parameter_and_joint_does(tmp_path: Path):
    config = fashion_config()
    train, val, _ = fashion_mnist(config, n_train=16, n_val=8)
    model = fashion_model()
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
    names = [name for name in LOSS_TERM_NAMES if name != "background"]  # weight 0 here: not a term of this loss
    for entry in logs:
        assert set(names) | {"gumbel_scale", "learning_rate"} <= entry.keys() and "background" not in entry
        total = weighted_total({name: torch.tensor(entry[name]) for name in names}, model.loss_weights)
        assert float(total) == pytest.approx(entry["loss"], rel=1e-5, abs=1e-6)
    assert [entry["learning_rate"] for entry in logs] == pytest.approx([1e-4, 1e-4, 5e-5, 5e-5])
    assert [entry["gumbel_scale"] for entry in logs] == pytest.approx([1000 * math.sqrt(2 / 4)] * 2 + [866.0254] * 2)

    # Evaluation: the terms with the eval prefix, no mixup (the eval loss is the model's own loss).
    metrics = joint.evaluate()
    assert {f"eval_{name}" for name in names} | {"eval_loss", "eval_accuracy"} <= metrics.keys()
    model.eval()
    batch = collate_fn([val[i] for i in range(len(val))])
    with torch.no_grad():
        reference = model(**batch)
    assert metrics["eval_loss"] == pytest.approx(float(reference.loss), rel=1e-5)
    for name in names:
        assert metrics[f"eval_{name}"] == pytest.approx(float(reference.loss_terms[name]), rel=1e-5, abs=1e-7)


def test_trainer_loss_with_and_without_mixup(tmp_path: Path):
    config = fashion_config()
    train, _, _ = fashion_mnist(config, n_train=8)
    batch = collate_fn([train[i] for i in range(8)])
    model = fashion_model()

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

    # A training batch is mixed with λ and the permutation drawn from (seed, step, micro-batch, process); the model's
    # forward takes the mixed images with both label sets and computes the loss.
    mixed = loss_of(mixing, True)
    assert not torch.equal(mixed, model_loss(True))
    lam, perm = mixup_draw(0.5, 8, 0, 0, 1, 0)  # the second draw at step 0 (the first went to `mixed`)
    perm = torch.as_tensor(perm)
    labels, pixels = batch["labels"], lam * batch["pixel_values"] + (1 - lam) * batch["pixel_values"][perm]
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        outputs = model(pixel_values=pixels, labels=labels, mixup_labels=labels[perm], mixup_lambda=lam)
    assert torch.equal(loss_of(mixing, True), outputs.loss)
    # ... which is CE on the mixed targets and cluster / separation on the original labels, weighted by the config.
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        terms = model.loss_terms(model(pixel_values=pixels), labels, labels[perm], lam)
    assert torch.equal(outputs.loss, weighted_total(terms, model.loss_weights))
    assert not torch.equal(outputs.loss, model(pixel_values=pixels, labels=labels).loss)
    # An object mask in the batch is mixed too: the object of either image.
    masked = fashion_model(background_weight=1.0)
    mask = torch.zeros(8, *batch["pixel_values"].shape[-2:], dtype=torch.bool)
    mask[0, :10] = mask[1:, 20:] = True
    seen = {}

    def record(module, args, kwargs, output):  # the batch the model's forward received
        seen.update(kwargs)

    handle = masked.register_forward_hook(record, with_kwargs=True)
    trainer = ProtoPoolTrainer(model=masked, args=trainer_args(tmp_path), data_collator=collate_fn, mixup_alpha=0.5)
    masked.train()
    with torch.no_grad():
        trainer.compute_loss(masked, {**batch, "object_mask": mask})
    handle.remove()
    lam, perm = mixup_draw(0.5, 8, 0, 0, 0, 0)  # this trainer's first draw
    assert torch.equal(seen["object_mask"], mask | mask[torch.as_tensor(perm)])
    assert "background" in trainer._drain_terms("train")
    with pytest.raises(ValueError, match="mixup_labels"):
        model(pixel_values=pixels, mixup_labels=labels[perm], mixup_lambda=lam)
    with pytest.raises(ValueError, match="mixup_alpha"):
        ProtoPoolTrainer(model=model, args=trainer_args(tmp_path), mixup_alpha=-1)


def test_fine_tuning_loss_is_the_model_loss_under_the_recipe_weights(tmp_path: Path):
    """CE + l1_weight·L1 comes from the config's weights, not from the trainer: the logs show the loss's terms."""
    config = fashion_config(**ProtoPoolRecipe().phase_loss_weights("finetune"))
    train, _, _ = fashion_mnist(config, n_train=16)
    torch.manual_seed(0)
    model = ProtoPoolForImageClassification(config)
    model.harden_assignment()
    batch = collate_fn([train[i] for i in range(8)])
    trainer = ProtoPoolTrainer(
        model=model, args=trainer_args(tmp_path), train_dataset=train, data_collator=collate_fn, phase="finetune",
        mixup_alpha=0.5,
    )  # fmt: skip
    model.eval()
    with torch.no_grad():
        out = model(**batch)
        assert torch.equal(trainer.compute_loss(model, dict(batch)), out.loss)
    assert torch.equal(out.loss, out.loss_terms["cross_entropy"] + config.l1_weight * out.loss_terms["l1"])
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert {"cross_entropy", "l1"} <= entry.keys() and not {
            "cluster",
            "separation",
            "orthogonality",
        } & entry.keys()
        total = entry["cross_entropy"] + config.l1_weight * entry["l1"]
        assert total == pytest.approx(entry["loss"], rel=1e-5, abs=1e-6)


def test_the_model_loss_stays_float32_under_bf16_autocast():
    """Mixed or not, the loss is computed in float32 inside the forward, as it was outside it before."""
    model = fashion_model()
    pixels, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for mixup in ({}, {"mixup_labels": labels.flip(0), "mixup_lambda": 0.3}):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(pixel_values=pixels, labels=labels, **mixup)
        assert out.loss.dtype == torch.float32 and {v.dtype for v in out.loss_terms.values()} == {torch.float32}
        assert torch.equal(out.loss_terms["orthogonality"], orthogonality_loss(model.head.slot_logits))
