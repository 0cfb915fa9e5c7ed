"""Tests of protopool_hf.provenance: the one type and the one reader / writer of the projection provenance, and the
one dataset name that `protopool-hf project` records and the pictures and `explain` recognise."""

import json
import math
import sys
import warnings
from pathlib import Path

import datasets
import pytest
import torch
from torch.utils.data import DataLoader, Subset
from transformers import AutoModelForImageClassification

from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification, explain
from protopool_hf.cli import main
from protopool_hf.data import FASHION_MNIST_LABELS, load_fashion_mnist
from protopool_hf.pictures import render_prototypes
from protopool_hf.provenance import (
    PROVENANCE_BUFFERS,
    Provenance,
    check_dataset_name,
    clear_provenance,
    dataset_name,
    read_provenance,
    write_provenance,
)


sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from protopool_tiny import fashion_config


FASHION = Path(__file__).parent / "data" / "fashion-mnist"
NAME_WARNING = "were projected on"


def small_model(num_prototypes: int = 6) -> ProtoPoolForImageClassification:
    config = ProtoPoolConfig(
        backbone="test_resnet", num_labels=3, num_prototypes=num_prototypes, num_slots_per_class=2, prototype_dim=8
    )
    return ProtoPoolForImageClassification(config)


def some_provenance(num_prototypes: int = 6) -> Provenance:
    provenance = Provenance.empty(num_prototypes)
    provenance.image_index[:3] = torch.tensor([4, 0, 4])
    provenance.row[:3] = torch.tensor([1, 2, 3])
    provenance.col[:3] = torch.tensor([0, 1, 0])
    provenance.distance[:3] = torch.tensor([0.5, 0.25, 2.0])
    provenance.label[:3] = torch.tensor([2, 0, 2])
    provenance.dataset_name, provenance.input_size = "cub200/train", [3, 64, 64]
    return provenance


def assert_same(a: Provenance, b: Provenance) -> None:
    for name in PROVENANCE_BUFFERS:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0, equal_nan=True)
    assert (a.dataset_name, a.input_size) == (b.dataset_name, b.input_size)


# --------------------------------------------------------------------------- one type, one reader / writer


def test_a_new_model_has_no_provenance():
    provenance = read_provenance(small_model())
    assert provenance.num_prototypes == 6 and provenance.projected_ids == []
    assert_same(provenance, Provenance.empty(6))
    with pytest.raises(ValueError, match="never projected"):
        provenance.check_projected()


def test_write_read_save_load_and_clear_round_trip(tmp_path):
    model = small_model()
    write_provenance(model, some_provenance())
    provenance = read_provenance(model)
    assert_same(provenance, some_provenance())
    assert provenance.projected_ids == [0, 1, 2] and provenance.is_projected.tolist() == [True] * 3 + [False] * 3
    assert model.config.projection_dataset == "cub200/train" and model.config.projection_input_size == [3, 64, 64]
    assert model.head.projection_distance.dtype == torch.float32 and model.head.projection_row.dtype == torch.long
    provenance.check_projected([0, 2])
    with pytest.raises(ValueError, match="Prototype 4 has no projection provenance"):
        provenance.check_projected([0, 4])

    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert_same(read_provenance(loaded), some_provenance())
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["projection_dataset"], saved["projection_input_size"]) == ("cub200/train", [3, 64, 64])

    clear_provenance(loaded)
    assert_same(read_provenance(loaded), Provenance.empty(6))
    assert loaded.config.projection_dataset is None and loaded.config.projection_input_size is None


def test_the_model_methods_go_through_the_same_writer():
    model = small_model()
    expected = some_provenance()
    model.set_projection_provenance(
        expected.image_index.tolist(), expected.row, expected.col, expected.distance, expected.label,
        dataset_name="cub200/train", input_size=[3, 64, 64],
    )  # fmt: skip
    assert_same(read_provenance(model), expected)
    model.clear_projection_provenance()
    assert_same(read_provenance(model), Provenance.empty(6))


def test_write_refuses_another_number_of_prototypes():
    with pytest.raises(ValueError, match=r"shape \(4,\), but the model has 6 prototypes"):
        write_provenance(small_model(), some_provenance(4))


def test_read_provenance_returns_copies():
    model = small_model()
    provenance = read_provenance(model)
    provenance.image_index.fill_(3)
    assert (model.head.projection_image_index == -1).all()


def test_select_and_the_state_dict_view():
    provenance = some_provenance()
    kept = provenance.select([2, 0, 5])
    assert kept.image_index.tolist() == [4, 4, -1] and kept.label.tolist() == [2, 2, -1]
    assert math.isnan(float(kept.distance[2])) and kept.dataset_name == "cub200/train"

    model = small_model()
    write_provenance(model, provenance)
    state = model.state_dict()
    assert Provenance.state_dict_keys() == [f"head.{buffer}" for buffer, _, _ in PROVENANCE_BUFFERS.values()]
    from_state = Provenance.from_state_dict(state)
    from_state.dataset_name = "cub200/train"
    assert from_state.same_sources(provenance)
    moved = Provenance.from_state_dict(state)
    moved.dataset_name = "cub200/train"
    moved.row[1] += 1
    assert not moved.same_sources(provenance)
    assert Provenance.from_state_dict({k: v for k, v in state.items() if "projection_col" not in k}) is None


# --------------------------------------------------------------------------- dataset naming


def named(split: str | None = "train", config_name: str | None = None) -> datasets.Dataset:
    info = datasets.DatasetInfo(dataset_name="cub200", config_name=config_name)
    return datasets.Dataset.from_dict({"label": [0, 1, 1, 0], "index": [0, 1, 2, 3]}, info=info, split=split)


def test_dataset_name_is_name_config_and_split():
    assert dataset_name(named()) == "cub200/train"
    assert dataset_name(named(split=None)) == "cub200"
    assert dataset_name(named(config_name="default")) == "cub200/train"
    assert dataset_name(named(config_name="cub200")) == "cub200/train"
    assert dataset_name(named(config_name="birds")) == "cub200/birds/train"
    assert dataset_name(named(split="test")) == "cub200/test"


def test_dataset_name_survives_transforms_formats_shuffles_loaders_and_subsets():
    train = named()
    variants = [
        train.with_transform(lambda batch: batch),
        train.with_format("torch"),
        train.shuffle(seed=0),
        train.select([2, 3]),
        DataLoader(train, batch_size=2),
        Subset(Subset(train, [0, 1, 2]), [1]),
    ]
    assert {dataset_name(v) for v in variants} == {"cub200/train"}


def test_dataset_name_without_a_name_is_the_fingerprint():
    plain = datasets.Dataset.from_dict({"label": [0, 1]})
    assert dataset_name(plain) == f"fingerprint:{plain._fingerprint}"
    assert dataset_name([{"label": 0}]) is None and dataset_name(torch.zeros(3)) is None


def test_check_dataset_name_warns_for_another_split_only():
    recorded = some_provenance()  # "cub200/train"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_dataset_name(recorded, named().shuffle(seed=1).with_transform(lambda batch: batch))
        check_dataset_name(recorded, datasets.Dataset.from_dict({"label": [0]}))  # a fingerprint: never compared
        check_dataset_name(Provenance.empty(6), named(split="test"))  # nothing recorded
    with pytest.warns(UserWarning, match=r"projected on 'cub200/train'.*but this dataset is 'cub200/test'"):
        check_dataset_name(recorded, named(split="test"))


# --------------------------------------------------------------------------- the success path, end to end


@pytest.fixture(scope="module")
def projected_folder(tmp_path_factory) -> Path:
    """`protopool-hf project` on the first 40 Fashion-MNIST training images, as a user runs it."""
    root = tmp_path_factory.mktemp("provenance")
    torch.manual_seed(0)
    labels = dict(enumerate(FASHION_MNIST_LABELS))
    model = ProtoPoolForImageClassification(
        fashion_config(id2label=labels, label2id={name: i for i, name in labels.items()})
    )
    model.save_pretrained(root / "trained")
    argv = ["project", str(root / "trained"), "--dataset", "fashion-mnist", "--data-root", str(FASHION)]
    argv += ["--limit", "40", "--batch-size", "40", "--output-dir", str(root / "projected")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(argv) == 0
    assert not [w for w in caught if NAME_WARNING in str(w.message)]  # the CLI's own pictures recognise it
    return root / "projected"


def test_cli_project_records_the_name_that_pictures_and_explain_recognise(projected_folder):
    model = AutoModelForImageClassification.from_pretrained(projected_folder)
    assert model.config.projection_dataset == "fashion_mnist/train"
    assert read_provenance(model).projected_ids
    train = load_fashion_mnist(FASHION, "train", limit=40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pictures = render_prototypes(model, train)
        image = train[0]["image"]
        panel = explain(model, image).render(dataset=train)
    assert sorted(pictures) == read_provenance(model).projected_ids and panel.width > 0

    test = load_fashion_mnist(FASHION, "test")
    with pytest.warns(UserWarning, match=r"'fashion_mnist/train'.*'fashion_mnist/test'"):
        render_prototypes(model, test, verify=False)
