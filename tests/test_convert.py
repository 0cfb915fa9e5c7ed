"""The official-checkpoint converter: parity with the official code, round trips, and refusal of bad inputs."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification
from protopool_hf.cli import main as cli_main
from protopool_hf.convert import (
    convert_original_checkpoint,
    load_inaturalist_backbone,
    load_original_state_dict,
    original_checkpoint_sizes,
    save_inaturalist_backbone,
    to_original_state_dict,
)


FIXTURES = Path(__file__).parent / "fixtures"


def _fixture_module():
    spec = importlib.util.spec_from_file_location("make_official_fixture", FIXTURES / "make_official_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def official():
    """The committed fixture and the weights regenerated from its recipe (no official code needed)."""
    recipe = _fixture_module()
    meta = json.loads((FIXTURES / "official_parity.json").read_text())
    expected = load_file(str(FIXTURES / "official_parity.safetensors"))
    weights = recipe.fill_state_dict([tuple(entry) for entry in meta["state_dict_spec"]])
    return {"recipe": recipe, "meta": meta, "expected": expected, "weights": weights}


@pytest.fixture
def source_config(tiny_config):
    """The tiny config with 7 prototypes."""
    return tiny_config(num_prototypes=7)


@pytest.fixture
def source_model(tiny_model):
    """The tiny model with 7 prototypes and a random head."""
    model = tiny_model(0, num_prototypes=7)
    with torch.no_grad():  # move the head off its structured init so the round trip is a real check
        model.head.last_layer.weight.normal_()
        model.head.slot_logits.normal_()
    return model.eval()


class _FileCreatingPayload:
    """Unpickling this object would create a file (what a malicious checkpoint could do)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


# ---------------------------------------------------------------------------------------------------- parity
def test_fixture_weights_regenerate_exactly(official):
    digest = official["recipe"].state_dict_digest(official["weights"])
    assert digest == official["meta"]["weights_sha256"], "fill_state_dict no longer reproduces the fixture's weights"
    pixel_values, labels = official["recipe"].make_inputs()
    torch.testing.assert_close(pixel_values, official["expected"]["pixel_values"], rtol=0, atol=0)
    torch.testing.assert_close(labels, official["expected"]["labels"], rtol=0, atol=0)


def test_official_resnet18_keys_are_timm_resnet18_keys(official):
    """Official `features.*` of resnet18 are timm resnet18 names; our export reproduces the whole official layout."""
    config = ProtoPoolConfig(**official["meta"]["protopool_config_kwargs"])
    exported = to_original_state_dict(ProtoPoolForImageClassification(config), use_thresh=True)
    spec = {key: tuple(shape) for key, shape, _ in official["meta"]["state_dict_spec"]}
    assert {key: tuple(value.shape) for key, value in exported.items()} == spec


def test_parity_with_official_code(official):
    expected = official["expected"]
    config = ProtoPoolConfig(**official["meta"]["protopool_config_kwargs"])
    model = convert_original_checkpoint({"model_state_dict": official["weights"], "epoch": 7}, config)
    assert model.gumbel_scale == 1e4
    assert not model.training
    model.set_gumbel_scale(1.0)  # eval softmax(slot_logits * 1) == official gumbel_scale=0
    with torch.no_grad():
        out = model(expected["pixel_values"], labels=expected["labels"])

    torch.testing.assert_close(out.logits, expected["logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.min_distances, expected["min_distances"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.slot_assignment, expected["proto_presence"], rtol=0, atol=1e-6)
    for name in ("cross_entropy", "cluster", "separation", "orthogonality", "l1"):
        torch.testing.assert_close(out.loss_terms[name], expected[f"loss.{name}"], rtol=0, atol=1e-5, msg=name)
    torch.testing.assert_close(out.loss, expected["loss.loss"], rtol=0, atol=1e-5)
    # the fixture is not degenerate: the terms and logits differ across classes and are not trivially zero
    assert expected["logits"].std() > 0.01
    assert expected["loss.l1"] > 1
    assert expected["loss.cluster"] < expected["loss.avg_separation"]


# ---------------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("wrap", ["bare", "model_state_dict", "module_prefix", "without_ones_and_alfa"])
def test_round_trip_official_layout(source_model, source_config, wrap):
    state = to_original_state_dict(source_model)
    assert "alfa" in state
    assert "ones" in state
    assert state["prototype_vectors"].shape == (7, 8, 1, 1)
    if wrap == "model_state_dict":
        state = {"model_state_dict": state, "epoch": 3}
    elif wrap == "module_prefix":
        state = {"module." + key: value for key, value in state.items()}
    elif wrap == "without_ones_and_alfa":
        del state["ones"], state["alfa"]
    converted = convert_original_checkpoint(state, source_config)

    assert converted.gumbel_scale == 1e4
    ours, theirs = source_model.state_dict(), converted.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        if key == "head.gumbel_scale":
            continue
        torch.testing.assert_close(theirs[key], ours[key], rtol=0, atol=0, equal_nan=True, msg=key)
    # and back again
    again = to_original_state_dict(converted)
    for key, value in to_original_state_dict(source_model).items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=0, msg=key)

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    converted.set_gumbel_scale(source_model.gumbel_scale)
    with torch.no_grad():
        torch.testing.assert_close(converted(x).logits, source_model(x).logits, rtol=0, atol=0)


def test_convert_from_file_then_save_and_reload(source_model, source_config, tmp_path):
    path = tmp_path / "best_model_push.pth"
    torch.save({"model_state_dict": to_original_state_dict(source_model), "epoch": 5}, path)
    converted = convert_original_checkpoint(path, source_config)
    assert converted.gumbel_scale == 1e4

    converted.save_pretrained(tmp_path / "converted")
    assert (tmp_path / "converted" / "model.safetensors").is_file()
    reloaded = ProtoPoolForImageClassification.from_pretrained(tmp_path / "converted").eval()
    assert reloaded.gumbel_scale == 1e4
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, converted(x).logits, rtol=0, atol=0)


def test_original_checkpoint_sizes(source_model):
    sizes = original_checkpoint_sizes(to_original_state_dict(source_model))
    assert sizes == {
        "num_labels": 3,
        "num_prototypes": 7,
        "num_slots_per_class": 2,
        "prototype_dim": 8,
        "backbone_channels": source_model.head.add_on[0].weight.shape[1],
    }


def test_convert_cli(source_model, tmp_path):
    path = tmp_path / "best_model.pth"
    torch.save({"model_state_dict": to_original_state_dict(source_model), "epoch": 1}, path)
    labels = tmp_path / "classes.txt"
    labels.write_text("heron\nfinch\nwren\n")
    assert (
        cli_main(["convert", str(path), str(tmp_path / "out"), "--backbone", "test_resnet", "--labels", str(labels)])
        == 0
    )
    model = ProtoPoolForImageClassification.from_pretrained(tmp_path / "out")
    assert model.config.id2label == {0: "heron", 1: "finch", 2: "wren"}
    assert model.config.data_config()["input_size"] == (3, 224, 224)
    assert model.gumbel_scale == 1e4
    torch.testing.assert_close(model.head.prototypes, source_model.head.prototypes, rtol=0, atol=0)
    # The presets and the converter share one preprocessing: the official code's.
    assert model.config.data_config() == ProtoPoolConfig.from_preset("cub200").data_config()


def test_converted_checkpoint_squashes_non_square_images_as_the_official_resize(source_model, tmp_path):
    from PIL import Image
    from transformers import AutoImageProcessor

    path = tmp_path / "best_model.pth"
    torch.save({"model_state_dict": to_original_state_dict(source_model), "epoch": 1}, path)
    assert cli_main(["convert", str(path), str(tmp_path / "out"), "--backbone", "test_resnet"]) == 0
    # Three vertical bands, red | green | blue, on a 3:1 landscape photo: a centre crop would keep only green.
    bands = torch.zeros(3, 100, 300, dtype=torch.uint8)
    for channel in range(3):
        bands[channel, :, 100 * channel : 100 * (channel + 1)] = 255
    photo = Image.fromarray(bands.permute(1, 2, 0).numpy())
    pixels = AutoImageProcessor.from_pretrained(tmp_path / "out")(photo, return_tensors="pt")["pixel_values"][0]
    assert pixels.shape == (3, 224, 224)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    rgb = (pixels * std[:, None, None] + mean[:, None, None]).mean(dim=1)  # (3, W): column colours
    for channel, columns in enumerate((slice(0, 70), slice(80, 144), slice(154, 224))):
        assert (rgb[channel, columns] > 0.99).all() and (rgb[:, columns].sum(dim=0) < 1.01).all()


# ---------------------------------------------------------------------------------------------------- bad inputs
def test_missing_keys_are_listed(source_model, source_config):
    state = to_original_state_dict(source_model)
    del state["prototype_vectors"], state["last_layer.weight"]
    with pytest.raises(ValueError, match=r"missing keys \['prototype_vectors', 'last_layer.weight'\]"):
        convert_original_checkpoint(state, source_config)


def test_missing_backbone_keys_are_listed(source_model, source_config):
    state = to_original_state_dict(source_model)
    del state["features.layer1.0.conv1.weight"]
    with pytest.raises(ValueError, match=r"1 keys missing from the checkpoint \['layer1.0.conv1.weight'\]"):
        convert_original_checkpoint(state, source_config)


def test_wrong_backbone_is_reported(source_model, source_config):
    config = ProtoPoolConfig(**{**source_config.to_dict(), "backbone": "test_convnext"})
    with pytest.raises(ValueError, match=r"does not fit config.backbone='test_convnext'.*Set config.backbone"):
        convert_original_checkpoint(to_original_state_dict(source_model), config)


def test_config_size_mismatch_names_field_and_value(source_model, source_config):
    config = ProtoPoolConfig(**{**source_config.to_dict(), "num_prototypes": 9, "prototype_dim": 4})
    with pytest.raises(ValueError, match=r"config.num_prototypes=9 but .* P=7.*prototype_dim=4 .* D=8") as info:
        convert_original_checkpoint(to_original_state_dict(source_model), config)
    assert "num_prototypes=7" in str(info.value)
    assert "prototype_dim=8" in str(info.value)


def test_backbone_shape_mismatch_names_tensor_and_shapes(source_model, source_config):
    state = to_original_state_dict(source_model)
    key = "features.layer1.0.conv1.weight"
    state[key] = torch.zeros(*state[key].shape[:-1], state[key].shape[-1] + 2)
    expected = tuple(source_model.state_dict()["backbone.layer1.0.conv1.weight"].shape)
    with pytest.raises(ValueError, match=r"Shape mismatch for `features\.layer1\.0\.conv1\.weight`") as info:
        convert_original_checkpoint(state, source_config)
    assert str(expected) in str(info.value)
    assert "config.backbone" in str(info.value)


def test_inconsistent_head_tensors(source_model, source_config):
    state = to_original_state_dict(source_model)
    state["last_layer.weight"] = torch.zeros(3, 5)
    with pytest.raises(ValueError, match=r"`last_layer.weight` has shape \(3, 5\).*imply \(3, 6\)"):
        convert_original_checkpoint(state, source_config)


def test_unexpected_keys_and_non_tensors(source_model, source_config):
    state = to_original_state_dict(source_model)
    with pytest.raises(ValueError, match=r"`ones` tensor is not all ones"):
        convert_original_checkpoint({**state, "ones": torch.full_like(state["ones"], 2.0)}, source_config)
    with pytest.raises(ValueError, match=r"Unexpected keys .*\['prototype_class_identity'\]"):
        convert_original_checkpoint({**state, "prototype_class_identity": torch.zeros(6, 3)}, source_config)
    with pytest.raises(ValueError, match=r"not tensors: \['epoch'\]"):
        load_original_state_dict({**state, "epoch": 3})
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        convert_original_checkpoint("nope.pth", source_config)


def test_pickled_payload_is_refused_without_running_it(source_model, source_config, tmp_path):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pth"
    torch.save({"model_state_dict": to_original_state_dict(source_model), "extra": _FileCreatingPayload(marker)}, path)
    with pytest.raises(ValueError, match=r"Refused to load .*evil\.pth"):
        convert_original_checkpoint(path, source_config)
    with pytest.raises(ValueError, match=r"Refused to load .*evil\.pth"):
        load_inaturalist_backbone(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------- iNaturalist
def _synthetic_bbn_state_dict() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A BBN-layout checkpoint built from timm resnet50 shapes (values: one constant per key, expanded views)."""
    import timm

    with torch.device("meta"):
        reference = timm.create_model("resnet50", num_classes=0).state_dict()
    expected, bbn = {}, {}
    for index, (key, value) in enumerate(reference.items()):
        tensor = torch.tensor(float(index), dtype=value.dtype).expand(value.shape)
        expected[key] = tensor
        if key.startswith("layer4.2."):
            bbn["module.backbone.cb_block." + key.removeprefix("layer4.2.")] = tensor
            bbn["module.backbone.rb_block." + key.removeprefix("layer4.2.")] = -tensor
        else:
            bbn["module.backbone." + key] = tensor
    bbn["module.classifier.weight"] = torch.zeros(8, 4096)
    bbn["module.classifier.bias"] = torch.zeros(8)
    return bbn, expected


def test_inaturalist_remap():
    bbn, expected = _synthetic_bbn_state_dict()
    remapped = load_inaturalist_backbone(bbn)
    assert remapped.keys() == expected.keys()
    for key in ("conv1.weight", "layer4.1.bn3.running_var", "layer4.2.conv1.weight", "layer4.2.bn3.bias"):
        torch.testing.assert_close(remapped[key], expected[key].contiguous(), rtol=0, atol=0)
    assert not any("rb_block" in key or "classifier" in key or key.startswith("fc.") for key in remapped)

    with pytest.raises(ValueError, match=r"keys outside module.backbone"):
        load_inaturalist_backbone({**bbn, "backbone.extra": torch.zeros(1)})
    without_cb = {key: value for key, value in bbn.items() if "cb_block" not in key}
    with pytest.raises(ValueError, match=r"does not remap to a timm resnet50: missing \['layer4.2"):
        load_inaturalist_backbone(without_cb)


def test_inaturalist_weights_load_as_backbone(tmp_path):
    bbn, expected = _synthetic_bbn_state_dict()
    torch.save({"state_dict": {key: value.contiguous() for key, value in bbn.items()}}, tmp_path / "bbn.pth")
    file = save_inaturalist_backbone(tmp_path / "bbn.pth", tmp_path / "resnet50_inat.safetensors")
    config = ProtoPoolConfig(
        backbone="resnet50",
        backbone_pretrained=True,
        backbone_kwargs={"pretrained_cfg_overlay": {"file": str(file)}},
        num_labels=2,
        num_prototypes=3,
        num_slots_per_class=1,
        prototype_dim=4,
    )
    model = ProtoPoolForImageClassification(config)
    backbone = model.backbone.state_dict()
    for key in ("conv1.weight", "layer4.2.conv1.weight", "layer4.2.bn3.running_mean"):
        torch.testing.assert_close(backbone[key], expected[key].contiguous(), rtol=0, atol=0)


def test_a_bad_official_checkpoint_leaves_no_output_folder(tiny_model, tmp_path):
    model = tiny_model()
    state = to_original_state_dict(model)
    del state["proto_presence"]
    path = tmp_path / "best_model.pth"
    torch.save({"model_state_dict": state}, path)
    with pytest.raises(ValueError, match=r"missing keys \['proto_presence'\]"):
        cli_main(["--debug", "convert", str(path), str(tmp_path / "out"), "--backbone", "test_resnet"])
    torch.save({"model_state_dict": to_original_state_dict(model)}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated
    with pytest.raises(ValueError, match=rf"Could not read '{re.escape(str(path))}' as a PyTorch checkpoint"):
        cli_main(["--debug", "convert", str(path), str(tmp_path / "out"), "--backbone", "test_resnet"])
    assert not (tmp_path / "out").exists()
