"""Reliability: bad input fails clearly, loading runs no pickled or foreign code, and training is deterministic.

docs/reliability.md lists every bad input with what the user sees and the test that covers it. Cases already tested
in test_data.py, test_configuration.py, test_convert.py and test_modeling.py are not repeated here; a killed save is
tested in test_atomic.py.
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import pickle
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForImageClassification

import protopool_hf
from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification
from protopool_hf.cli import main as cli_main
from protopool_hf.convert import to_original_state_dict
from protopool_hf.data import from_hf_dataset, load_cub200, load_image_folder, load_stanford_cars
from protopool_hf.images import UnreadableImageError, decode_image
from protopool_hf.recipe import ProtoPoolRecipe
from protopool_hf.training import _check_class_names, train_protopool
from protopool_hf.transforms import collate_fn, make_transforms


sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from protopool_tiny import fashion_mnist, tiny_config, tiny_model


TINY = {"backbone": "test_resnet", "num_labels": 3, "num_prototypes": 6, "num_slots_per_class": 2, "prototype_dim": 8}
SMALL = {
    "input_size": (3, 32, 32),
    "mean": (0.5,) * 3,
    "std": (0.5,) * 3,
    "interpolation": "bilinear",
    "crop_pct": 0.875,
}


def _save(path: Path, image: PIL.Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def _eval_colour(pixel_values: torch.Tensor) -> torch.Tensor:
    """Back from the SMALL / tiny_config normalisation (mean 0.5, std 0.5) to 0..255 per channel."""
    return (pixel_values.mean(dim=(-2, -1)) * 0.5 + 0.5) * 255


# --------------------------------------------------------------------------- images


def test_every_image_mode_goes_through_the_loader_the_transform_and_the_model(tmp_path):
    palette = PIL.Image.new("P", (24, 20), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    files = {  # file: (image, save options, the RGB colour it must become)
        "bilevel.png": (PIL.Image.new("1", (24, 20), 1), {}, (255, 255, 255)),
        "cmyk.jpg": (PIL.Image.new("CMYK", (24, 20), (0, 255, 0, 0)), {"quality": 95}, (255, 0, 255)),
        "deep16.png": (PIL.Image.fromarray(np.full((20, 24), 32896, np.uint16)), {}, (128, 128, 128)),
        "greyscale.jpg": (PIL.Image.new("L", (24, 20), 90), {"quality": 95}, (90, 90, 90)),
        "grey_alpha.png": (PIL.Image.new("LA", (24, 20), (40, 255)), {}, (40, 40, 40)),
        "palette.png": (palette, {}, (255, 0, 0)),
        "palette_transparent.png": (palette, {"transparency": 0}, (255, 255, 255)),
        "rgba_transparent.png": (PIL.Image.new("RGBA", (24, 20), (0, 0, 0, 0)), {}, (255, 255, 255)),
    }
    for name, (image, options, _) in files.items():
        _save(tmp_path / "modes" / name, image, **options)
    ds = load_image_folder(tmp_path)
    assert [Path(v["path"]).name for v in ds.with_format(None)["image"]] == sorted(files)
    config = tiny_config()
    plain = ds.with_transform(make_transforms(config, train=False))[: len(files)]
    augmented = collate_fn(ds.with_transform(make_transforms(config, train=True)).__getitems__(range(len(files))))
    for batch in (plain, augmented):
        assert batch["pixel_values"].shape == (len(files), 3, 32, 32)
        assert torch.isfinite(batch["pixel_values"]).all()
    expected = torch.tensor([colour for _, _, colour in (files[name] for name in sorted(files))], dtype=torch.float32)
    torch.testing.assert_close(_eval_colour(plain["pixel_values"]), expected, atol=3, rtol=0)  # JPEG: +-3
    model = tiny_model().eval()
    with torch.no_grad():
        assert torch.isfinite(model(plain["pixel_values"]).logits).all()


@pytest.mark.parametrize("augmentation", ["timm", "official"])
def test_images_smaller_than_the_crop_are_scaled_up(augmentation):
    sizes = [(1, 1), (3, 2), (31, 7)]
    raw = datasets.Dataset.from_dict(
        {"image": [PIL.Image.new("RGB", size, (255, 0, 0)) for size in sizes], "label": [0, 1, 2]}
    )
    ds = from_hf_dataset(raw.cast_column("image", datasets.Image()))
    for train in (True, False):
        batch = ds.with_transform(make_transforms(SMALL, train=train, augmentation=augmentation))[:3]
        assert batch["pixel_values"].shape == (3, 3, 32, 32) and torch.isfinite(batch["pixel_values"]).all()
        if not train:
            torch.testing.assert_close(_eval_colour(batch["pixel_values"]), torch.tensor([[255.0, 0, 0]] * 3))


def test_a_large_photo_is_read_and_a_decompression_bomb_is_refused(tmp_path, monkeypatch):
    big = _save(tmp_path / "big.jpg", PIL.Image.new("RGB", (8000, 6000), (10, 200, 30)), quality=50)
    transform = make_transforms(SMALL, train=False)
    batch = transform({"image": [str(big)], "label": [0], "index": [0]})
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
    torch.testing.assert_close(_eval_colour(batch["pixel_values"]), torch.tensor([[10.0, 200, 30]]), atol=3, rtol=0)

    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 8000 * 6000 // 4)  # the photo is now > 2x PIL's limit
    pattern = rf"Cannot read image {re.escape(str(big))}: .*decompression bomb.*raise PIL\.Image\.MAX_IMAGE_PIXELS"
    with pytest.raises(UnreadableImageError, match=pattern + r".*skip_bad_images=True"):
        transform({"image": [str(big)], "label": [0], "index": [0]})
    small = _save(tmp_path / "small.png", PIL.Image.new("RGB", (30, 20)))
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 400)  # between 1x and 2x the limit: a warning, then read
    with pytest.warns(PIL.Image.DecompressionBombWarning):
        assert decode_image(str(small)).size == (30, 20)


def test_unreadable_files_name_the_file_and_the_way_out(tmp_path):
    _save(tmp_path / "cls" / "good.png", PIL.Image.new("RGB", (8, 8)))
    empty = tmp_path / "cls" / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "cls" / "notes.jpg"
    text.write_text("this is not an image\n")
    ds = load_image_folder(tmp_path)  # lazy: listing the files reads none of them
    for index, path in ((0, empty), (2, text)):
        with pytest.raises(UnreadableImageError, match=rf"{re.escape(str(path))}.*skip_bad_images=True"):
            ds.with_transform(make_transforms(SMALL, train=True))[index]
    skipping = ds.with_transform(make_transforms(SMALL, train=True, skip_bad_images=True))
    with pytest.warns(UserWarning, match="Skipping an unreadable image"):
        rows = skipping.__getitems__([0, 1, 2])
    assert [int(row["index"]) for row in rows] == [1]


# --------------------------------------------------------------------------- labels


def _named(names: list[str], labels: list[int]) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    raw = datasets.Dataset.from_dict(
        {"image": [PIL.Image.new("RGB", (8, 8))] * len(labels), "label": labels}, features
    )
    return from_hf_dataset(raw)


def test_train_protopool_refuses_class_names_that_disagree_with_id2label(tmp_path):
    model = tiny_model(num_labels=3, num_prototypes=6, num_slots_per_class=2, id2label={0: "cat", 1: "dog", 2: "eel"})
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
    unnamed = tiny_config(num_labels=3, num_prototypes=6, num_slots_per_class=2)
    _check_class_names(unnamed, swapped, "train_dataset")
    integers = from_hf_dataset(datasets.Dataset.from_dict({"image": ["a.jpg", "b.jpg"], "label": [0, 1]}))
    assert integers.features["label"].names == ["0", "1"]
    _check_class_names(model.config, integers, "train_dataset")  # labels 0 and 1 of the model's three classes
    _check_class_names(model.config, [{"pixel_values": None, "labels": 0}], "train_dataset")  # no names: no check


def test_cli_project_names_the_first_class_that_differs(tmp_path, capsys):
    model = ProtoPoolForImageClassification(
        ProtoPoolConfig(**{**TINY, "num_labels": 2}, id2label={0: "ant", 1: "bee"})
    )
    model.save_pretrained(tmp_path / "model")
    for name in ("ant", "wasp"):
        _save(tmp_path / "data" / name / "0.png", PIL.Image.new("RGB", (8, 8)))
    argv = ["project", str(tmp_path / "model"), "--dataset", "folder", "--data-root", str(tmp_path / "data")]
    assert cli_main([*argv, "--output-dir", str(tmp_path / "out")]) == 2
    assert "first at class 1: 'wasp' in the dataset, 'bee' in the model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- config


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
def test_wrong_types_and_sizes_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        ProtoPoolConfig(**{**TINY, field: value})


# --------------------------------------------------------------------------- checkpoints


@contextlib.contextmanager
def _transformers_warnings() -> Iterator[list[str]]:
    """The messages transformers logs meanwhile (its loggers do not propagate to the root logger)."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    library = logging.getLogger("transformers")
    library.addHandler(handler)
    try:
        yield messages
    finally:
        library.removeHandler(handler)


@pytest.fixture
def saved(tmp_path) -> tuple[ProtoPoolForImageClassification, Path]:
    torch.manual_seed(0)
    model = ProtoPoolForImageClassification(ProtoPoolConfig(**TINY)).eval()
    model.save_pretrained(tmp_path / "model")
    return model, tmp_path / "model"


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_weights_that_do_not_fit_the_config_are_refused(saved):
    """transformers 5 raises RuntimeError; the tensors and shapes are only in the load report it logs before."""
    _, folder = saved
    _edit_config(folder, num_prototypes=7)
    with _transformers_warnings() as messages, pytest.raises((RuntimeError, ValueError)) as error:
        AutoModelForImageClassification.from_pretrained(folder)
    seen = "\n".join([str(error.value), *messages])
    assert "head.prototypes" in seen and "6, 8" in seen and "7, 8" in seen


def test_weights_that_do_not_fit_the_config_name_the_tensor_and_shapes_in_the_error(saved):
    _, folder = saved
    _edit_config(folder, num_prototypes=7)
    with pytest.raises(ValueError, match=r"config\.json.*head\.prototypes: checkpoint \(6, 8\) vs config \(7, 8\)"):
        AutoModelForImageClassification.from_pretrained(folder)


def test_a_missing_tensor_is_refused_not_reinitialised(saved):
    _, folder = saved
    weights = load_file(folder / "model.safetensors")
    del weights["head.prototypes"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors \['head\.prototypes'\]"):
        AutoModelForImageClassification.from_pretrained(folder)


def test_a_truncated_safetensors_file_is_refused(saved):
    """What safetensors says today: the header is incomplete, without the file's name."""
    _, folder = saved
    _truncate(folder / "model.safetensors")
    with pytest.raises((SafetensorError, ValueError), match=r"incomplete metadata|truncated"):
        AutoModelForImageClassification.from_pretrained(folder)


def test_a_truncated_safetensors_file_names_the_folder_and_the_fix(saved):
    _, folder = saved
    _truncate(folder / "model.safetensors")
    with pytest.raises(ValueError, match=rf"{re.escape(str(folder))}.*truncated or corrupt.*again"):
        AutoModelForImageClassification.from_pretrained(folder)


def test_a_bad_official_checkpoint_leaves_no_output_folder(saved, tmp_path):
    model, _ = saved
    state = to_original_state_dict(model)
    del state["proto_presence"]
    path = tmp_path / "best_model.pth"
    torch.save({"model_state_dict": state}, path)
    with pytest.raises(ValueError, match=r"missing keys \['proto_presence'\]"):
        cli_main(["--debug", "convert", str(path), str(tmp_path / "out"), "--backbone", "test_resnet"])
    torch.save({"model_state_dict": to_original_state_dict(model)}, path)
    _truncate(path)
    with pytest.raises(ValueError, match=rf"Could not read '{re.escape(str(path))}' as a PyTorch checkpoint"):
        cli_main(["--debug", "convert", str(path), str(tmp_path / "out"), "--backbone", "test_resnet"])
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- datasets


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


# --------------------------------------------------------------------------- safe loading


class _Payload:
    """Unpickling this object creates a file: what a malicious checkpoint could do instead."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_pickle_payload_in_pytorch_model_bin_never_runs(saved, tmp_path):
    model, folder = saved
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "payload_ran"
    torch.save({**model.state_dict(), "payload": _Payload(marker)}, folder / "pytorch_model.bin")
    for loader in (ProtoPoolForImageClassification, AutoModelForImageClassification):
        for kwargs in ({}, {"use_safetensors": False}):
            with pytest.raises((pickle.UnpicklingError, OSError, ValueError)):
                loader.from_pretrained(folder, **kwargs)
    assert not marker.exists()


def test_a_folder_without_model_safetensors_is_refused(saved):
    """transformers 5 falls back to pytorch_model.bin (read with torch.load(weights_only=True)); we want safetensors."""
    model, folder = saved
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises((OSError, ValueError), match=r"model\.safetensors"):
        AutoModelForImageClassification.from_pretrained(folder)


def _unsafe_calls(source: str, filename: str) -> list[str]:
    """Calls that could unpickle arbitrary objects or run foreign code, as "file:line what", in line order."""
    problems: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "pickle", "dill", "joblib", "cloudpickle"):
            names = [alias.name for alias in node.names if "load" in alias.name or alias.name == "Unpickler"]
            problems += [(node.lineno, f"from {node.module} import {name}") for name in names]
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        flag = {k.arg: k.value.value for k in node.keywords if k.arg and isinstance(k.value, ast.Constant)}
        if name == "torch.load" and flag.get("weights_only") is not True:
            problems.append((node.lineno, "torch.load without weights_only=True"))
        if name.split(".")[0] in ("pickle", "dill", "joblib", "cloudpickle") and (
            "load" in name or "Unpickler" in name
        ):
            problems.append((node.lineno, name))
        for key, unsafe in (("trust_remote_code", True), ("weights_only", False), ("use_safetensors", False)):
            if key in flag and flag[key] is unsafe:
                problems.append((node.lineno, f"{name}({key}={unsafe})"))
        if flag.get("allow_pickle") is True:
            problems.append((node.lineno, f"{name}(allow_pickle=True)"))
    return [f"{filename}:{line} {what}" for line, what in sorted(problems)]


def test_the_package_never_unpickles_unsafely_or_trusts_remote_code():
    assert _unsafe_calls("import torch\ntorch.load(p)\nf(trust_remote_code=True)\nfrom pickle import loads", "x") == [
        "x:2 torch.load without weights_only=True",
        "x:3 f(trust_remote_code=True)",
        "x:4 from pickle import loads",
    ]
    package = Path(protopool_hf.__file__).parent
    problems = [p for file in sorted(package.glob("*.py")) for p in _unsafe_calls(file.read_text(), file.name)]
    assert problems == []


def test_a_saved_folder_loads_with_the_package_and_runs_none_of_its_code(saved, tmp_path):
    model, folder = saved
    marker = tmp_path / "folder_code_ran"
    for name in ("configuration_protopool.py", "modeling_protopool.py"):
        path = folder / name
        path.write_text(f"open({str(marker)!r}, 'w').close()\n{path.read_text()}")
    loaded = AutoModelForImageClassification.from_pretrained(folder).eval()  # no trust_remote_code
    assert (
        type(loaded) is ProtoPoolForImageClassification and type(AutoConfig.from_pretrained(folder)) is ProtoPoolConfig
    )
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    assert not marker.exists()

    # Without the package, the folder's code is the only way: transformers refuses it unless asked.
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["protopool_hf"] = None
        from transformers import AutoModelForImageClassification
        try:
            AutoModelForImageClassification.from_pretrained({str(folder)!r})
        except ValueError as error:
            print("REFUSED", "trust_remote_code=True" in str(error))
        """
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=300
    )
    assert "REFUSED True" in result.stdout, result.stderr[-3000:]
    assert not marker.exists()


# --------------------------------------------------------------------------- found while testing (backbone.py)


def _load_and_compare(model: ProtoPoolForImageClassification, folder: Path) -> None:
    loaded = ProtoPoolForImageClassification.from_pretrained(folder).eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)


def test_a_model_loads_under_no_grad(saved):
    model, folder = saved
    with torch.no_grad():
        _load_and_compare(model, folder)


def test_a_model_loads_under_inference_mode(saved):
    model, folder = saved
    with torch.inference_mode():
        _load_and_compare(model, folder)


def test_a_backbone_whose_last_map_is_1x1_is_refused():
    # test_resnet downsamples 32x: one position, min distance = mean distance, similarity 0 (issue 12).
    with pytest.raises(ValueError, match=r"1×1 feature map from 32×32 images.*earlier `feature_stage`"):
        ProtoPoolForImageClassification(ProtoPoolConfig(**TINY, input_size=[3, 32, 32]))
    model = ProtoPoolForImageClassification(ProtoPoolConfig(**TINY, input_size=[3, 64, 64]))  # 2×2 trains
    model.train()(torch.randn(2, 3, 64, 64), labels=torch.tensor([0, 1])).loss.backward()


# --------------------------------------------------------------------------- determinism


@pytest.mark.filterwarnings("ignore:Prototypes .* are used by class slots")  # 16 images do not cover every class
def test_two_cpu_runs_with_the_same_seed_give_identical_weights(tmp_path):
    config = tiny_config()
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
        result = train_protopool(tiny_model(seed=0), train, None, plain, recipe)
        weights.append({k: v.detach().clone() for k, v in result.model.state_dict().items()})
    assert weights[0].keys() == weights[1].keys()
    for name, value in weights[0].items():  # exactly equal; NaN marks prototypes the projection did not move
        torch.testing.assert_close(weights[1][name], value, rtol=0, atol=0, equal_nan=True, msg=name)
    initial = tiny_model(seed=0).state_dict()
    assert not torch.equal(weights[0]["head.add_on.0.weight"], initial["head.add_on.0.weight"])  # it did train
