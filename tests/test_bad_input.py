"""Bad input to the library (issue 12): each is refused with one line naming the file, field or value, before work.

Model folders are never overwritten unless asked, and then atomically; configurations that cannot learn (a 1×1
feature map, one class, a test split with other classes) are refused.
"""

import hashlib
import json
import re
import sys
from pathlib import Path

import datasets
import PIL.Image
import pytest
import torch
from transformers import AutoModelForImageClassification, pipeline

from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification
from protopool_hf.cli import main as cli_main
from protopool_hf.convert import to_original_state_dict
from protopool_hf.data import from_hf_dataset, load_cub200, load_fashion_mnist, load_image_folder, load_stanford_cars
from protopool_hf.projection import project_prototypes
from protopool_hf.recipe import ProtoPoolRecipe
from protopool_hf.training import _check_class_names, train_protopool
from protopool_hf.transforms import collate_fn


sys.path.insert(0, str(Path(__file__).parent / "scripts"))
sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
from protopool_tiny import FASHION_MNIST, TINY, fashion_config, fashion_mnist, fashion_model


def _recipe(output_dir: Path, **overrides) -> ProtoPoolRecipe:
    """One warm-up epoch on 16 images, then the projection: a couple of seconds."""
    kwargs = {
        "output_dir": str(output_dir),
        "warmup_epochs": 1,
        "joint_epochs": 0,
        "finetune_epochs": 0,
        "train_batch_size": 8,
        "projection_batch_size": 16,
        "eval_batch_size": 16,
        "save_strategy": "no",
        "eval_strategy": "no",
        "use_cpu": True,
        "disable_tqdm": True,
    }
    return ProtoPoolRecipe(**{**kwargs, **overrides})


def _snapshot(folder: Path) -> dict[str, str]:
    """{relative path: content hash} of every file under `folder`."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _old_model_folder(folder: Path) -> dict[str, str]:
    """A saved model with a card and prototype pictures, as the demo or `project` leave it."""
    ProtoPoolForImageClassification(
        fashion_config(num_labels=2, num_prototypes=5, num_slots_per_class=2)
    ).save_pretrained(folder)
    (folder / "README.md").write_text("# Old model\n\nFashion-MNIST accuracy 88.55 %\n")
    (folder / "prototypes").mkdir()
    PIL.Image.new("RGB", (4, 4)).save(folder / "prototypes" / "prototype_000.png")
    return _snapshot(folder)


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.new("RGB", (8, 8), (path.stem.__hash__() % 255, 0, 0)).save(path)


def _named(names: list[str], labels: list[int]) -> datasets.Dataset:
    features = datasets.Features({"pixel_values": datasets.Value("int64"), "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict({"pixel_values": [0] * len(labels), "label": labels}, features=features)


# --------------------------------------------------------------------------- model folders: train and convert


def test_train_refuses_a_model_folder_and_replaces_it_whole_with_overwrite(tmp_path):
    out = tmp_path / "model"
    before = _old_model_folder(out)
    model = fashion_model()
    train, _, plain = fashion_mnist(model.config, 16)
    with pytest.raises(FileExistsError, match=r"already holds a saved model \(config\.json, .*README\.md, prototypes"):
        train_protopool(model, train, None, plain, _recipe(out))
    assert _snapshot(out) == before  # refused before anything was written

    result = train_protopool(model, train, None, plain, _recipe(out), overwrite=True)
    assert not (out / "README.md").exists() and not (out / "prototypes").exists()  # nothing of the old model
    assert json.loads((out / "config.json").read_text())["num_prototypes"] == 20
    reloaded = ProtoPoolForImageClassification.from_pretrained(out)
    assert torch.equal(reloaded.head.prototypes, result.model.head.prototypes)
    assert (out / "warmup" / "phase_complete.json").is_file()  # the run's own files are kept
    assert not list(tmp_path.glob(".model.protopool-*"))  # no staging folder left behind

    # A finished run in the folder: overwrite starts afresh (the old phases go), resuming needs no overwrite.
    with pytest.raises(FileExistsError, match="overwrite=True"):
        train_protopool(fashion_model(), train, None, plain, _recipe(out))
    train_protopool(fashion_model(), train, None, plain, _recipe(out), resume_from_checkpoint=True)
    again = train_protopool(fashion_model(seed=1), train, None, plain, _recipe(out), overwrite=True)
    assert again.projection is not None  # every stage ran again


def test_resuming_a_model_folder_that_is_not_a_run_still_needs_overwrite(tmp_path):
    out = tmp_path / "model"
    before = _old_model_folder(out)
    model = fashion_model()
    train, _, plain = fashion_mnist(model.config, 16)
    with pytest.raises(FileExistsError, match="already holds a saved model"):
        train_protopool(model, train, None, plain, _recipe(out), resume_from_checkpoint=True)
    assert _snapshot(out) == before


def test_convert_refuses_a_model_folder_and_replaces_it_whole_with_overwrite(tiny_config, tmp_path, capsys):
    config = tiny_config()
    checkpoint = tmp_path / "best_model.pth"
    torch.save({"model_state_dict": to_original_state_dict(ProtoPoolForImageClassification(config))}, checkpoint)
    out = tmp_path / "model"
    before = _old_model_folder(out)
    argv = ["convert", str(checkpoint), str(out), "--backbone", "test_resnet"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(r"OUTPUT_DIR '.*model' already holds a saved model .*pass --overwrite", err), err
    assert _snapshot(out) == before

    assert cli_main([*argv, "--overwrite"]) == 0
    assert not (out / "README.md").exists() and not (out / "prototypes").exists()
    assert AutoModelForImageClassification.from_pretrained(out).config.num_prototypes == 6


def test_convert_names_a_text_file_that_is_not_a_checkpoint(tmp_path, capsys):
    text = tmp_path / "best_model.pth"
    text.write_text("this is not a checkpoint\n")
    assert cli_main(["convert", str(text), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"'.*best_model\.pth' is not a PyTorch checkpoint .*main\.py saved", err), err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- configurations that cannot learn


def test_a_1x1_feature_map_is_refused_with_the_fix(tiny_model):
    message = r"'test_resnet' makes a 1×1 feature map from 32×32 images .*earlier `feature_stage` \(e\.g\. 3\)"
    with pytest.raises(ValueError, match=message):
        tiny_model(input_size=[3, 32, 32])
    with pytest.raises(ValueError, match=r"\(feature_stage=-1\)"):
        tiny_model(input_size=[3, 32, 32], feature_stage=-1)
    with pytest.raises(ValueError, match=r"16×16 images .*Use a larger image size"):  # ViT stages share one grid
        tiny_model(backbone="test_vit", input_size=[3, 16, 16])
    model = tiny_model(input_size=[3, 32, 32], feature_stage=3)
    assert model.forward_features(torch.zeros(2, 3, 32, 32)).shape[-2:] == (2, 2)  # the suggested stage works


def test_training_refuses_one_class(tmp_path):
    model = fashion_model(num_labels=1, id2label={0: "Sneaker"})
    one = _named(["Sneaker"], [0, 0])
    with pytest.raises(ValueError, match=r"num_labels=1 \(\['Sneaker'\]\): a classifier needs at least two classes"):
        train_protopool(model, one, None, one, _recipe(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_training_refuses_a_test_split_with_other_class_names(tmp_path):
    names = ["T-shirt/top", "Trouser", "Sneaker"]
    model = fashion_model(num_labels=3, id2label=dict(enumerate(names)))
    train = _named(names, [0, 1, 2])
    other = _named(["T-shirt/top", "Trouser", "Sandal"], [0])  # labels 0 only: the names are compared
    with pytest.raises(ValueError, match=r"`test_dataset` calls class 2 'Sandal' but the model's id2label\[2\]"):
        train_protopool(model, train, None, train, _recipe(tmp_path / "run"), test_dataset=other)
    with pytest.raises(ValueError, match=r"`test_dataset` has 2 classes but the model has num_labels=3"):
        train_protopool(model, train, None, train, _recipe(tmp_path / "run"), test_dataset=_named(names[:2], [0]))
    assert not (tmp_path / "run").exists()


def test_cli_train_refuses_a_test_folder_with_other_classes(tmp_path, capsys):
    for split, classes in (("train", ("ant", "bee")), ("test", ("ant", "wasp"))):  # 8 training images: 2 validate
        for name in classes:
            for i in range(4):
                _image(tmp_path / "data" / split / name / f"{i}.png")
    argv = ["train", "--dataset", "folder", "--data-root", str(tmp_path / "data"), "--backbone", "test_resnet"]
    argv += [
        "--feature-stage",
        "1",
        "--image-size",
        "32",
        "--num-prototypes",
        "4",
        "--num-slots-per-class",
        "1",
        "--cpu",
    ]
    argv += ["--val-fraction", "0.25"]
    assert cli_main([*argv, "--output-dir", str(tmp_path / "out")]) == 2
    assert "`test_dataset` calls class 1 'wasp' but the model's id2label[1] is 'bee'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- config fields


def test_id2label_must_name_every_class_with_indices_0_to_c_minus_1(tiny_model, tiny_config, tmp_path):
    with pytest.raises(ValueError, match=r"`num_labels`=3 but `id2label` names 2 classes"):
        tiny_config(id2label={0: "a", 1: "b"})
    with pytest.raises(ValueError, match=r"`id2label` keys must be exactly the class indices 0\.\.1, got \[0, 5\]"):
        ProtoPoolConfig(**{k: v for k, v in TINY.items() if k != "num_labels"}, id2label={"0": "a", "5": "b"})

    folder = tmp_path / "model"
    tiny_model(id2label={0: "a", 1: "b", 2: "c"}).save_pretrained(folder)
    with pytest.raises(ValueError, match=r"got \[0, 5\]"):
        AutoModelForImageClassification.from_pretrained(folder, id2label={"0": "a", "5": "b"})
    tampered = json.loads((folder / "config.json").read_text())
    tampered["id2label"] = {"0": "a", "1": "b", "5": "c"}
    (folder / "config.json").write_text(json.dumps(tampered))
    with pytest.raises(ValueError, match=r"got \[0, 1, 5\]"):
        AutoModelForImageClassification.from_pretrained(folder)


def test_stock_from_pretrained_with_new_labels_still_works(tiny_config, tmp_path):
    folder = tmp_path / "model"
    config = tiny_config(input_size=[3, 64, 64], id2label={0: "a", 1: "b", 2: "c"})
    ProtoPoolForImageClassification(config).save_pretrained(folder)
    names = {0: "w", 1: "x", 2: "y", 3: "z"}
    model = AutoModelForImageClassification.from_pretrained(
        folder, num_labels=4, id2label=names, ignore_mismatched_sizes=True
    )
    assert model.config.id2label == names and model.config.label2id == {"w": 0, "x": 1, "y": 2, "z": 3}
    assert model.head.last_layer.weight.shape == (4, 4 * 2)
    relabelled = AutoModelForImageClassification.from_pretrained(folder, id2label={0: "p", 1: "q", 2: "r"})
    assert relabelled.config.label2id == {"p": 0, "q": 1, "r": 2}
    assert AutoModelForImageClassification.from_pretrained(folder, num_labels=3).config.id2label[2] == "c"
    unnamed = AutoModelForImageClassification.from_pretrained(folder, num_labels=4, ignore_mismatched_sizes=True)
    assert unnamed.config.id2label == {i: f"LABEL_{i}" for i in range(4)}  # transformers' behaviour
    classifier = pipeline("image-classification", model=model, image_processor=str(folder), top_k=4)
    assert {row["label"] for row in classifier(PIL.Image.new("RGB", (64, 64)))} == set(names.values())


def test_input_size_needs_three_channels(tiny_config):
    with pytest.raises(ValueError, match=r"`input_size` must have 3 channels .*got \[1, 64, 64\]: use \[3, 64, 64\]"):
        tiny_config(input_size=[1, 64, 64])


def test_unknown_backbone_kwargs_name_the_key_and_the_backbone(tiny_config):
    config = tiny_config(backbone_kwargs={"no_such_arg": 1})
    with pytest.raises(
        ValueError, match=r"`backbone_kwargs` key 'no_such_arg' is not an argument of timm's 'test_resnet'"
    ):
        ProtoPoolForImageClassification(config)


@pytest.mark.parametrize("content", [b"hello world\n", b"\x80\x02not really a pickle", b""])
def test_a_weights_file_that_is_not_a_checkpoint_is_named(tiny_config, tmp_path, content):
    weights = tmp_path / "weights.pth"
    weights.write_bytes(content)
    overlay = {"pretrained_cfg_overlay": {"file": str(weights)}}
    config = tiny_config(input_size=[3, 64, 64], backbone_pretrained=True, backbone_kwargs=overlay)
    with pytest.raises(ValueError, match=r"weights file '.*weights\.pth' for backbone 'test_resnet'") as error:
        ProtoPoolForImageClassification(config)
    assert "weights_only=False" not in str(error.value) and "\n" not in str(error.value)


def test_a_missing_weights_file_is_named(tiny_config, tmp_path):
    overlay = {"pretrained_cfg_overlay": {"file": str(tmp_path / "nope.safetensors")}}
    config = tiny_config(input_size=[3, 64, 64], backbone_pretrained=True, backbone_kwargs=overlay)
    with pytest.raises(FileNotFoundError, match=r"'.*nope\.safetensors' for backbone 'test_resnet' does not exist"):
        ProtoPoolForImageClassification(config)


# --------------------------------------------------------------------------- resuming, data, metrics


def test_resuming_with_a_changed_num_prototypes_names_the_field(tmp_path):
    model = fashion_model()
    train, _, plain = fashion_mnist(model.config, 16)
    train_protopool(model, train, None, plain, _recipe(tmp_path / "run"))
    changed = fashion_model(num_prototypes=24)
    with pytest.raises(ValueError, match=r"the model's num_prototypes=24 differs from the run's num_prototypes=20"):
        train_protopool(changed, train, None, plain, _recipe(tmp_path / "run"), resume_from_checkpoint=True)
    names = json.loads((tmp_path / "run" / "config.json").read_text())["id2label"]
    renamed = fashion_model(id2label={**{int(i): name for i, name in names.items()}, 3: "Gown"})
    unnamed = datasets.Dataset.from_list([{"pixel_values": 0, "label": 0}])  # no class names to compare
    with pytest.raises(
        ValueError, match=r"the model's id2label=\{3: 'Gown', \.\.\.\} differs .*\{3: 'LABEL_3', \.\.\.\}"
    ):
        train_protopool(renamed, unnamed, None, unnamed, _recipe(tmp_path / "run"), resume_from_checkpoint=True)


@pytest.mark.parametrize("limit", [0, -5, True, 2.5])
def test_a_limit_below_one_is_refused_by_every_loader(tmp_path, limit):
    _image(tmp_path / "ant" / "0.png")
    for load in (lambda: load_image_folder(tmp_path, limit=limit), lambda: load_cub200(tmp_path, limit=limit)):
        with pytest.raises(ValueError, match=rf"limit must be a positive number of images or None, got {limit!r}"):
            load()
    with pytest.raises(ValueError, match="limit must be a positive number"):
        load_fashion_mnist(FASHION_MNIST, limit=limit)


def test_a_limit_keeps_the_first_images_and_every_class_name(tmp_path):
    for name in ("ant", "bee"):
        for i in range(3):
            _image(tmp_path / name / f"{i}.png")
    ds = load_image_folder(tmp_path, limit=2)
    assert len(ds) == 2 and ds.features["label"].names == ["ant", "bee"] and ds["index"] == [0, 1]


def test_test_metrics_carry_the_run_s_final_epoch(tmp_path):
    model = fashion_model()
    train, _, plain = fashion_mnist(model.config, 16)
    recipe = _recipe(tmp_path / "run", finetune_epochs=1)
    result = train_protopool(model, train, None, plain, recipe, test_dataset=plain)
    test = result.metrics["test"]
    assert test["epoch"] == 2.0  # 1 warm-up + 0 joint + 1 fine-tuning epoch, not 0
    batch = collate_fn(plain.__getitems__(list(range(16))))
    with torch.no_grad():
        predicted = result.model.eval()(batch["pixel_values"]).logits.argmax(-1)
    assert test["test_accuracy"] == pytest.approx((predicted == batch["labels"]).float().mean().item())


def test_demo_card_records_the_recipe_and_the_test_split(tmp_path):
    import demo

    model = fashion_model()
    raw = load_fashion_mnist(FASHION_MNIST, limit=16)
    project_prototypes(model, fashion_mnist(model.config, 16)[2], batch_size=16)
    recipe = _recipe(tmp_path / "run", warmup_epochs=3)
    card = (demo.save_demo_model_folder(model, tmp_path / "model", raw, 0.75, recipe) / "README.md").read_text()
    assert "not recorded" not in card
    assert "| `warmup_epochs` | 3 |" in card
    assert "| test | accuracy | 0.75 |" in card


# --------------------------------------------------------------------------- class names and empty folders


def _named(names: list[str], labels: list[int]) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    raw = datasets.Dataset.from_dict(
        {"image": [PIL.Image.new("RGB", (8, 8))] * len(labels), "label": labels}, features
    )
    return from_hf_dataset(raw)


def test_train_protopool_refuses_class_names_that_disagree_with_id2label(tmp_path):
    model = fashion_model(
        num_labels=3, num_prototypes=6, num_slots_per_class=2, id2label={0: "cat", 1: "dog", 2: "eel"}
    )
    recipe = ProtoPoolRecipe(output_dir=str(tmp_path / "run"), use_cpu=True)
    good, swapped = _named(["cat", "dog", "eel"], [0, 1, 2]), _named(["dog", "cat", "eel"], [0, 1, 2])
    fix = r"Build the config from the dataset \(id2label=dict\(enumerate\(dataset\.features\['label'\]\.names\)\)\)"
    with pytest.raises(
        ValueError, match=r"`train_dataset` calls class 0 'dog' but the model's id2label\[0\] is 'cat'"
    ):
        train_protopool(model, swapped, None, good, recipe)
    with pytest.raises(ValueError, match=r"`projection_dataset` calls class 0 'dog'.*" + fix):
        train_protopool(model, good, None, swapped, recipe)
    with pytest.raises(ValueError, match=r"`eval_dataset` has 4 classes but the model has num_labels=3"):
        train_protopool(model, good, _named(["cat", "dog", "eel", "fox"], [3]), good, recipe)
    assert not (tmp_path / "run").exists()  # refused before anything was written

    # Placeholder names on either side (the config's LABEL_i, "0", "1", ... of integer labels) are not compared.
    unnamed = fashion_config(num_labels=3, num_prototypes=6, num_slots_per_class=2)
    _check_class_names(unnamed, swapped, "train_dataset")
    integers = from_hf_dataset(datasets.Dataset.from_dict({"image": ["a.jpg", "b.jpg"], "label": [0, 1]}))
    assert integers.features["label"].names == ["0", "1"]
    _check_class_names(model.config, integers, "train_dataset")  # labels 0 and 1 of the model's three classes
    _check_class_names(model.config, [{"pixel_values": None, "labels": 0}], "train_dataset")  # no names: no check


def test_cli_project_names_the_first_class_that_differs(tiny_model, tmp_path, capsys):
    model = tiny_model(num_labels=2, id2label={0: "ant", 1: "bee"})
    model.save_pretrained(tmp_path / "model")
    for name in ("ant", "wasp"):
        (tmp_path / "data" / name).mkdir(parents=True)
        PIL.Image.new("RGB", (8, 8)).save(tmp_path / "data" / name / "0.png")
    argv = ["project", str(tmp_path / "model"), "--dataset", "folder", "--data-root", str(tmp_path / "data")]
    assert cli_main([*argv, "--output-dir", str(tmp_path / "out")]) == 2
    assert "first at class 1: 'wasp' in the dataset, 'bee' in the model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("loader", "error", "match"),
    [
        (load_image_folder, ValueError, r"holds no class folders\. Expected .*/<class name>/<image files>"),
        (load_cub200, FileNotFoundError, r"images\.txt not found\. Expected layout: the official CUB_200_2011"),
        (load_stanford_cars, FileNotFoundError, r"No Stanford Cars data found in .*Expected either the devkit"),
    ],
)
def test_an_empty_dataset_folder_says_what_it_expected(tmp_path, loader, error, match):
    with pytest.raises(error, match=match):
        loader(tmp_path)


def test_a_backbone_whose_last_map_is_1x1_is_refused(tiny_model):
    # test_resnet downsamples 32x: one position, min distance = mean distance, similarity 0 (issue 12).
    with pytest.raises(ValueError, match=r"1×1 feature map from 32×32 images.*earlier `feature_stage`"):
        tiny_model(input_size=[3, 32, 32])
    model = tiny_model(input_size=[3, 64, 64])  # 2×2 trains
    model.train()(torch.randn(2, 3, 64, 64), labels=torch.tensor([0, 1])).loss.backward()
