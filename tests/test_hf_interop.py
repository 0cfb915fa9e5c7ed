"""Stock Hugging Face and timm paths, driven as their guides drive them (issue 11, items 2, 3, 4, 6 and 7)."""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import datasets
import pytest
import timm
import torch
from PIL import Image
from timm.data import resolve_data_config, resolve_model_data_config
from torchvision.transforms import Compose, Normalize, Resize, ToTensor
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    DefaultDataCollator,
    Trainer,
)

from protopool_hf import GumbelScheduleCallback, ProjectionCallback, ProtoPoolConfig, ProtoPoolForImageClassification
from protopool_hf.card import backbone_hub_id, render_model_card
from protopool_hf.gumbel import GumbelScheduleWarning


sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from protopool_tiny import fashion_config, fashion_model, trainer_args


def _random_batches(config: ProtoPoolConfig, n: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        {"pixel_values": torch.rand(3, 32, 32, generator=generator), "labels": i % config.num_labels} for i in range(n)
    ]


def _scale_warnings(caught: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    return [w for w in caught if issubclass(w.category, GumbelScheduleWarning)]


# ---------------------------------------------------------------------------------------------- item 2: new labels


def _trained_like_folder(tmp_path: Path) -> Path:
    """A hardened, projected 10-class model with s = 1000, saved as a Trainer would."""
    model = fashion_model()
    model.set_gumbel_scale(1000.0)
    model.harden_assignment()
    count = model.config.num_prototypes
    model.set_projection_provenance(
        torch.arange(count), torch.zeros(count), torch.ones(count), torch.full((count,), 0.01), torch.arange(count) % 10,
        dataset_name="fashion_mnist", input_size=[3, 32, 32],
    )  # fmt: skip
    model.save_pretrained(tmp_path / "trained")
    return tmp_path / "trained"


def _load_with_new_labels(folder: Path) -> ProtoPoolForImageClassification:
    id2label = dict(enumerate(["cat", "dog", "fox", "owl"]))
    return AutoModelForImageClassification.from_pretrained(
        folder,
        num_labels=4,
        id2label=id2label,
        label2id={name: i for i, name in id2label.items()},
        ignore_mismatched_sizes=True,
    )


def test_new_labels_restart_a_soft_head_without_provenance_that_the_stock_trainer_trains(tmp_path: Path):
    folder = _trained_like_folder(tmp_path)
    with pytest.warns(UserWarning, match=r"re-initialised .* restarts soft at scale s=1 .* provenance was cleared"):
        model = _load_with_new_labels(folder)
    assert model.config.num_labels == 4 and model.head.slot_logits.shape[0] == 4
    assert not model.is_assignment_hard and model.gumbel_scale == 1.0
    head = model.head
    for buffer in (head.projection_image_index, head.projection_row, head.projection_col, head.projection_label):
        assert buffer.tolist() == [-1] * model.config.num_prototypes
    assert torch.isnan(head.projection_distance).all()
    assert model.config.projection_dataset is None and model.config.projection_input_size is None
    model.save_pretrained(tmp_path / "fine-tuned")
    saved = json.loads((tmp_path / "fine-tuned" / "config.json").read_text())
    assert saved["projection_dataset"] is None and saved["projection_input_size"] is None

    before = model.head.slot_logits.detach().clone()
    trainer = Trainer(
        model=model,
        args=trainer_args(tmp_path / "run", max_steps=3, learning_rate=0.05, per_device_train_batch_size=4),
        train_dataset=_random_batches(model.config, 12),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    scale_warnings = _scale_warnings(caught)
    assert len(scale_warnings) == 1, [str(w.message) for w in caught]  # once, though every step calls model.train()
    assert "GumbelScheduleCallback" in str(scale_warnings[0].message)
    assert (model.head.slot_logits.detach() - before).abs().max() > 1e-4  # a hard one-hot would get no gradient


def test_unchanged_sizes_keep_the_trained_head(tmp_path: Path):
    folder = _trained_like_folder(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no re-initialisation, so no warning
        model = AutoModelForImageClassification.from_pretrained(folder, ignore_mismatched_sizes=True)
    assert model.is_assignment_hard and model.gumbel_scale == 1000.0
    assert model.config.projection_dataset == "fashion_mnist"
    assert model.head.projection_label.tolist() == [i % 10 for i in range(model.config.num_prototypes)]


def test_train_mode_warns_only_while_the_scale_was_never_set(tmp_path: Path):
    def warnings_of(model: ProtoPoolForImageClassification) -> int:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.train()
            model.eval()
            model.train()
        return len(_scale_warnings(caught))

    assert warnings_of(fashion_model()) == 1
    scheduled = fashion_model()
    scheduled.set_gumbel_scale(1.0)  # set on purpose, even to the initial value
    assert warnings_of(scheduled) == 0
    hardened = fashion_model()
    hardened.harden_assignment()
    assert warnings_of(hardened) == 0
    moved = fashion_model()
    moved.set_gumbel_scale(300.0)
    moved.save_pretrained(tmp_path)
    assert warnings_of(ProtoPoolForImageClassification.from_pretrained(tmp_path)) == 0  # a saved s != 1 was set

    model = fashion_model()
    trainer = Trainer(
        model=model,
        args=trainer_args(tmp_path / "run", max_steps=2, per_device_train_batch_size=4),
        train_dataset=_random_batches(model.config, 8),
        callbacks=[GumbelScheduleCallback()],  # its on_train_begin runs before the Trainer's model.train()
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert _scale_warnings(caught) == []


# --------------------------------------------------------------------------------- item 3: the guide's data pipeline


def _guide_dataset(folder: Path, n: int, with_labels: bool = True):
    """The HF image-classification guide's pipeline: torchvision transforms from the image processor, `label` kept."""
    processor = AutoImageProcessor.from_pretrained(folder)
    size = processor.size.get("shortest_edge") or (processor.size["height"], processor.size["width"])
    _transforms = Compose([Resize(size), ToTensor(), Normalize(mean=processor.image_mean, std=processor.image_std)])

    def transforms(examples):
        examples["pixel_values"] = [_transforms(img.convert("RGB")) for img in examples["image"]]
        del examples["image"]
        if not with_labels:
            del examples["label"]
        return examples

    generator = torch.Generator().manual_seed(0)
    images = [
        Image.fromarray(torch.randint(0, 256, (36, 30, 3), generator=generator, dtype=torch.uint8).numpy())
        for _ in range(n)
    ]
    return datasets.Dataset.from_dict({"image": images, "label": [i % 10 for i in range(n)]}).with_transform(
        transforms
    )


def test_projection_callback_takes_the_guides_label_column(tmp_path: Path):
    model = fashion_model(crop_mode="squash")
    model.save_pretrained(tmp_path / "start")
    train = _guide_dataset(tmp_path / "start", 16)
    assert set(train[0]) == {"pixel_values", "label"}
    projection = ProjectionCallback(train, batch_size=8)
    trainer = Trainer(
        model=model,
        args=trainer_args(tmp_path / "run", max_steps=2, per_device_train_batch_size=8, label_names=None),
        train_dataset=train,
        data_collator=DefaultDataCollator(),
        callbacks=[GumbelScheduleCallback(), projection],
    )
    trainer.train()
    assert model.is_assignment_hard
    labels = [int(train[i]["label"]) for i in range(len(train))]
    projected = model.head.projection_image_index >= 0
    assert projected.any()
    for prototype in torch.nonzero(projected).flatten().tolist():  # each label is its image's `label`
        assert model.head.projection_label[prototype] == labels[int(model.head.projection_image_index[prototype])]


def test_projection_callback_refuses_a_wrong_format_before_the_first_step(tmp_path: Path):
    model = fashion_model(crop_mode="squash")
    model.save_pretrained(tmp_path / "start")
    train = _guide_dataset(tmp_path / "start", 8)
    unlabelled = _guide_dataset(tmp_path / "start", 8, with_labels=False)
    trainer = Trainer(
        model=model,
        args=trainer_args(tmp_path / "run", max_steps=2, per_device_train_batch_size=8, label_names=None),
        train_dataset=train,
        data_collator=DefaultDataCollator(),
        callbacks=[GumbelScheduleCallback(), ProjectionCallback(unlabelled)],
    )
    with pytest.raises(ValueError, match=r"`labels` \(or `label`, an int\), got \['pixel_values'\]"):
        trainer.train()
    assert trainer.state.global_step == 0


# --------------------------------------------------------------------------------------- item 4: portable configs


def test_saved_config_holds_no_local_path_and_builds_offline_without_the_weights_file(tmp_path: Path):
    torch.manual_seed(1)
    weights = tmp_path / "machine-local" / "start_weights.pth"
    weights.parent.mkdir()
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), weights)
    model = fashion_model(backbone_pretrained=True, backbone_kwargs={"pretrained_cfg_overlay": {"file": str(weights)}})
    model.save_pretrained(tmp_path / "saved")
    text = (tmp_path / "saved" / "config.json").read_text()
    assert str(weights.parent) not in text and str(tmp_path) not in text
    saved = json.loads(text)
    assert saved["backbone_pretrained"] is False
    assert saved["backbone_kwargs"] == {}
    assert saved["backbone_start_weights"] == "file:start_weights.pth"
    assert model.config.backbone_pretrained and model.config.backbone_kwargs["pretrained_cfg_overlay"]  # unchanged

    weights.unlink()
    config = AutoConfig.from_pretrained(tmp_path / "saved")
    rebuilt = AutoModelForImageClassification.from_config(config)
    assert isinstance(rebuilt, ProtoPoolForImageClassification)
    card = str(render_model_card(rebuilt))
    assert "| Backbone start weights | pretrained, from a local file `start_weights.pth`" in card
    assert backbone_hub_id(config) is None


def test_saved_config_records_timm_hub_weights_for_the_card(tmp_path: Path):
    config = fashion_config(backbone_pretrained=True, backbone_kwargs={"checkpoint_path": "/home/me/ckpt.pth"})
    assert json.loads(config.to_json_string())["backbone_start_weights"] == "file:ckpt.pth"
    assert "checkpoint_path" not in json.loads(config.to_json_string())["backbone_kwargs"]
    config = fashion_config(backbone_pretrained=True)  # timm's own weights: not downloaded here, only named
    config.save_pretrained(tmp_path)
    reloaded = AutoConfig.from_pretrained(tmp_path)
    hub_id = timm.models.get_pretrained_cfg("test_resnet").hf_hub_id
    assert reloaded.backbone_pretrained is False and reloaded.backbone_start_weights == f"hf-hub:{hub_id}"
    assert backbone_hub_id(reloaded) == hub_id


# -------------------------------------------------------------------------------------- item 6: the float32 guard


def test_prototype_distances_are_float32_under_bf16_autocast():
    model = fashion_model().eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        features = model.forward_features(x)  # the backbone runs in bf16, as in the forward pass
        distances = model.prototype_distances(x)
        forward_min = model(x).min_distances
    with torch.no_grad():
        reference = model.head.distances(features)  # the same features, float32 arithmetic outside autocast
    assert distances.dtype == torch.float32
    # float32 rounding of Σz² − 2⟨z, p⟩ + ‖p‖² over D = 16 terms of size <= 1 stays far below bf16's 2^-8 steps.
    torch.testing.assert_close(distances, reference, rtol=0, atol=16 * 4 * 2**-23 * 4)
    torch.testing.assert_close(distances.flatten(2).amin(dim=2), forward_min, rtol=0, atol=16 * 4 * 2**-23 * 4)


def test_trainer_predict_returns_the_logits_only_and_the_model_output_keeps_the_distance_maps(tmp_path: Path):
    model = fashion_model().eval()
    batches = _random_batches(model.config, 6)
    trainer = Trainer(model=model, args=trainer_args(tmp_path, per_device_eval_batch_size=4))
    result = trainer.predict(batches)
    assert not isinstance(result.predictions, tuple)  # `keys_to_ignore_at_inference` drops the explanation fields
    assert result.predictions.shape == (6, model.config.num_labels) and result.metrics["test_loss"] > 0
    pixels = torch.stack([batch["pixel_values"] for batch in batches])
    with torch.no_grad():
        out = model(pixels)
    assert out.distances.shape == (6, model.config.num_prototypes, 8, 8)  # the forward still returns them
    torch.testing.assert_close(torch.from_numpy(result.predictions), out.logits, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ item 7: timm interop


@pytest.mark.parametrize("feature_stage", [None, 1])
def test_timm_data_helpers_return_the_config_preprocessing(tmp_path: Path, feature_stage: int | None):
    model = fashion_model(
        feature_stage=feature_stage,
        input_size=[3, 48, 40],
        image_mean=[0.5, 0.4, 0.3],
        image_std=[0.2, 0.25, 0.3],
        interpolation="bicubic",
        crop_pct=0.875,
        crop_mode="squash",
    )
    expected = model.config.data_config()
    assert expected["input_size"] != timm.create_model("test_resnet").pretrained_cfg["input_size"]

    def check(resolved: dict) -> None:
        assert {key: resolved[key] for key in expected} == expected

    model.save_pretrained(tmp_path)
    for candidate in (model, ProtoPoolForImageClassification.from_pretrained(tmp_path)):
        check(resolve_data_config(model=candidate))
        check(resolve_model_data_config(candidate))
        check(resolve_model_data_config(candidate, use_test_size=True))
        check(resolve_model_data_config(candidate.backbone))  # the backbone's own copy is in step
        transform = timm.data.create_transform(**resolve_data_config(model=candidate))
        assert transform(Image.new("RGB", (100, 60))).shape == (3, 48, 40)

    model.config.input_size = [3, 64, 64]  # the config stays the single source of truth
    assert resolve_model_data_config(model)["input_size"] == (3, 64, 64)
    assert resolve_model_data_config(model.backbone)["input_size"] == (3, 64, 64)
    assert math.isclose(model.pretrained_cfg["crop_pct"], 0.875)
    assert model.pretrained_cfg["num_classes"] == model.config.num_labels
