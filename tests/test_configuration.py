import json

import pytest

from protopool_hf import ProtoPoolConfig
from protopool_hf.configuration_protopool import PRESETS


def test_defaults_follow_the_official_code(tiny_config):
    config = tiny_config()
    assert config.similarity_epsilon == 1e-4
    assert config.gumbel_tau == 0.5
    assert (config.gumbel_scale_max, config.gumbel_scale_epochs) == (1000.0, 30)
    assert (config.cluster_weight, config.separation_weight) == (0.8, 0.08)
    assert (config.orthogonality_weight, config.l1_weight) == (1.0, 1e-4)
    assert (config.last_layer_correct_connection, config.last_layer_incorrect_connection) == (1.0, 0.0)
    assert config.model_type == "protopool"


def test_presets_give_the_paper_settings():
    cub = ProtoPoolConfig.from_preset("cub200")
    assert (cub.num_labels, cub.num_prototypes, cub.num_slots_per_class, cub.prototype_dim) == (200, 202, 10, 256)
    assert cub.backbone == "resnet50"
    assert cub.data_config()["crop_mode"] == "squash"  # the official Resize((224, 224)), no crop
    cars = ProtoPoolConfig.from_preset("cars196", backbone="resnet18")
    assert (cars.num_labels, cars.num_prototypes, cars.prototype_dim, cars.backbone) == (196, 195, 128, "resnet18")
    assert ProtoPoolConfig.from_preset("cars196").backbone == "resnet50.tv_in1k"
    assert set(PRESETS) == {"cub200", "cars196"}
    with pytest.raises(ValueError, match="Unknown preset 'cub'"):
        ProtoPoolConfig.from_preset("cub")


def test_round_trip_through_json(tiny_config, tmp_path):
    config = tiny_config(id2label={0: "cat", 1: "dog", 2: "eel"}, feature_stage=2)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["protopool_version"] == config.protopool_version
    loaded = ProtoPoolConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.id2label == {0: "cat", 1: "dog", 2: "eel"}


def test_data_config_is_taken_from_timm_when_unset(tiny_config):
    data = tiny_config().data_config()
    assert data["input_size"] == (3, 160, 160)
    assert data["mean"] == (0.5, 0.5, 0.5)
    data = tiny_config(input_size=[3, 64, 64], crop_pct=1.0, interpolation="bicubic").data_config()
    assert (data["input_size"], data["crop_pct"], data["interpolation"]) == ((3, 64, 64), 1.0, "bicubic")


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("num_prototypes", 0, "`num_prototypes` must be a positive int"),
        ("num_prototypes", -4, "`num_prototypes` must be a positive int"),
        ("num_slots_per_class", "ten", "`num_slots_per_class` must be a positive int"),
        ("prototype_dim", 2.5, "`prototype_dim` must be a positive int"),
        ("num_prototypes", 2, r"`num_prototypes` \(2\) must be larger than `num_slots_per_class` \(2\)"),
        ("similarity_epsilon", 0.0, "`similarity_epsilon` must be a finite number > 0"),
        ("similarity_epsilon", 1.0, r"`similarity_epsilon` must be in \(0, 1\)"),
        ("gumbel_tau", -1.0, "`gumbel_tau` must be a finite number > 0"),
        ("cluster_weight", -0.1, "`cluster_weight` must be a finite number >= 0"),
        ("l1_weight", float("nan"), "`l1_weight` must be a finite number >= 0"),
        ("backbone_pretrained", "yes", "`backbone_pretrained` must be a bool"),
        ("feature_stage", "last", "`feature_stage` must be None or an int"),
        ("input_size", [224, 224], r"`input_size` must be \[channels, height, width\]"),
        ("image_std", [0.5, 0.0, 0.5], "`image_std` must be > 0"),
        ("interpolation", "cubic", "`interpolation` must be one of"),
        ("crop_pct", 1.5, r"`crop_pct` must be in \(0, 1\]"),
        ("crop_mode", "border", "`crop_mode` must be one of"),
        ("last_layer_correct_connection", float("inf"), "`last_layer_correct_connection` must be a finite number"),
        ("last_layer_incorrect_connection", "-0.5", "`last_layer_incorrect_connection` must be a finite number"),
        ("last_layer_correct_connection", 0.0, r"`last_layer_correct_connection` \(0.0\) must be larger than"),
    ],
)
def test_bad_values_name_the_field_and_the_range(tiny_config, field, value, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**{field: value})


def test_label_maps_must_use_class_indices(tiny_config):
    with pytest.raises(ValueError, match="`id2label` keys must be class indices"):
        tiny_config(id2label={"cat": "cat"})


def test_unknown_backbone_suggests_close_timm_names(tiny_config):
    with pytest.raises(ValueError, match=r"`backbone`='resnet05' is not a timm model.*Did you mean.*resnet50"):
        tiny_config(backbone="resnet05")


def test_pretrained_tag_is_accepted(tiny_config):
    assert tiny_config(backbone="resnet50.tv_in1k").backbone == "resnet50.tv_in1k"


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("input_size", 224, r"`input_size` must be a list of numbers or None, got 224"),
        ("image_mean", 0.5, r"`image_mean` must be a list of numbers or None, got 0\.5"),
        ("image_mean", [float("nan")] * 3, r"`image_mean` must be three finite numbers"),
        ("backbone_kwargs", ["drop_path_rate", 0.1], r"`backbone_kwargs` must be a dict"),
        ("num_labels", "10", r"`num_labels` must be a positive int \(>= 1\), got '10'"),
        ("num_labels", -1, r"`num_labels` must be a positive int \(>= 1\), got -1"),
        ("id2label", ["cat", "dog"], r"`id2label` must be a dict"),
        ("num_prototypes", 1, r"`num_prototypes` \(1\) must be larger than `num_slots_per_class` \(2\).*Raise"),
        ("backbone", "RESNET50", r"'RESNET50' is not a timm model.*Did you mean one of \['resnet50'"),
    ],
)
def test_wrong_types_and_sizes_name_the_field(tiny_config, field, value, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**{field: value})


def test_an_absurd_num_labels_is_refused_before_an_id2label_is_built():
    # transformers would build {i: "LABEL_i"} for every class first: 10**12 entries exhaust any machine's memory.
    with pytest.raises(ValueError, match=r"`num_labels`=1000000000000 is more classes .*at most 100000"):
        ProtoPoolConfig(backbone="test_resnet", num_labels=10**12)
    assert ProtoPoolConfig(backbone="test_resnet", num_labels=100_000).num_labels == 100_000
