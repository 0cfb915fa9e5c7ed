"""Tiny ProtoPool models and Fashion-MNIST datasets shared by the training tests and their subprocess scripts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import TrainingArguments

from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification
from protopool_hf.data import load_fashion_mnist
from protopool_hf.training import split_train_validation
from protopool_hf.transforms import make_transforms


FASHION_MNIST = Path(__file__).resolve().parents[1] / "data" / "fashion-mnist"


# The suite's one tiny model: test_resnet (a few thousand parameters), 3 classes, 6 prototypes, 2 slots per class,
# 8-dimensional prototypes; the config's own input size and preprocessing. Every test that needs a generic tiny model
# builds it here (through conftest's `tiny_config` / `tiny_model` fixtures); tests that need a special construction
# (a known slot assignment, provenance, another backbone or size) pass overrides and change the model afterwards.
TINY: dict[str, Any] = {
    "backbone": "test_resnet",
    "num_labels": 3,
    "num_prototypes": 6,
    "num_slots_per_class": 2,
    "prototype_dim": 8,
}
# The shape the training tests run on the committed Fashion-MNIST slice: test_resnet cut after its first stage, an 8×8
# latent map at 32×32 px, ~28k parameters.
FASHION: dict[str, Any] = {
    "feature_stage": 1,
    "num_labels": 10,
    "num_prototypes": 20,
    "num_slots_per_class": 3,
    "prototype_dim": 16,
    "input_size": [3, 32, 32],
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "interpolation": "bilinear",
    "crop_pct": 1.0,
    "gumbel_scale_epochs": 4,
}


def tiny_config(**overrides: Any) -> ProtoPoolConfig:
    """The tiny config (`TINY`) with `overrides` applied."""
    return ProtoPoolConfig(**{**TINY, **overrides})


def tiny_model(seed: int = 0, **overrides: Any) -> ProtoPoolForImageClassification:
    """A tiny model initialised under `torch.manual_seed(seed)`, in training mode, as `from_config` returns it."""
    torch.manual_seed(seed)
    return ProtoPoolForImageClassification(tiny_config(**overrides))


def fashion_config(**overrides: Any) -> ProtoPoolConfig:
    """The tiny config in the Fashion-MNIST training shape (`FASHION`) with `overrides` applied."""
    return tiny_config(**{**FASHION, **overrides})


def fashion_model(seed: int = 0, **overrides: Any) -> ProtoPoolForImageClassification:
    """`tiny_model` in the Fashion-MNIST training shape."""
    return tiny_model(seed, **{**FASHION, **overrides})


def fashion_mnist(
    config: ProtoPoolConfig, n_train: int, n_val: int = 0, seed: int = 0, augmentation: str = "timm"
) -> tuple[datasets.Dataset, datasets.Dataset | None, datasets.Dataset]:
    """(augmented train, validation, un-augmented train for projection) from the committed Fashion-MNIST slice."""
    raw = load_fashion_mnist(FASHION_MNIST, split="train", limit=n_train + n_val)
    if n_val:
        train, val = split_train_validation(raw, n_val / (n_train + n_val), seed=seed)
        val = val.with_transform(make_transforms(config, train=False))
    else:
        train, val = raw, None
    augmented = train.with_transform(make_transforms(config, train=True, augmentation=augmentation, seed=seed))
    plain = train.with_transform(make_transforms(config, train=False))
    return augmented, val, plain


def fashion_mnist_test(config: ProtoPoolConfig, n: int) -> datasets.Dataset:
    return load_fashion_mnist(FASHION_MNIST, split="test", limit=n).with_transform(
        make_transforms(config, train=False)
    )


def trainer_args(tmp_path: Path, **overrides: Any) -> TrainingArguments:
    """CPU `TrainingArguments` for tiny test runs: no saving, no evaluation, logs every step."""
    kwargs = {
        "output_dir": str(tmp_path),
        "use_cpu": True,
        "report_to": "none",
        "remove_unused_columns": False,
        "label_names": ["labels"],
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 16,
        "num_train_epochs": 1,
        "learning_rate": 1e-3,
        "weight_decay": 1e-3,
        "lr_scheduler_type": "constant",
        "max_grad_norm": 0.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "eval_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
    }
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the module's state dict."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    """The names whose tensors differ between two snapshots."""
    return {k for k, v in before.items() if not torch.equal(v, after[k])}


def assert_state_dicts_equal(actual: dict, expected: dict, atol: float = 1e-6) -> None:
    """Equal keys and tensors within `atol` (NaN equal to NaN)."""
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=0, atol=atol, equal_nan=True, msg=name)
