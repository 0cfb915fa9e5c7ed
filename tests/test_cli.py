import ast
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
from protopool_tiny import TINY

import protopool_hf
from protopool_hf.cli import build_parser, main
from protopool_hf.cli_commands import COMMANDS
from protopool_hf.cli_messages import CLI_WORDING, MASK_RULE_NAMES, cli_log_wording, cli_wording


FASHION_MNIST = Path(__file__).parent / "data" / "fashion-mnist"


def _run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tiny_model) -> Path:
    import torch

    folder = tmp_path_factory.mktemp("cli") / "model"
    model = tiny_model(input_size=[3, 64, 64])
    with torch.no_grad():  # off-class connections too, as after fine-tuning: every slot weighs on every class
        model.head.last_layer.weight.uniform_(0.1, 1.0)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    import PIL.Image

    path = tmp_path_factory.mktemp("images") / "image.png"
    PIL.Image.new("RGB", (40, 30), (200, 30, 60)).save(path)
    return path


def _one_line_error(capsys, *, containing: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert containing in err, err
    assert "Traceback" not in err
    return err


# ---------------------------------------------------------------------------- import cost, Auto registration
def test_import_protopool_hf_imports_neither_torch_nor_transformers():
    loaded = _run_python(
        "import sys, protopool_hf\nprint(sorted(m for m in ('torch', 'timm', 'transformers') if m in sys.modules))"
    )
    assert loaded == "[]"


@pytest.mark.parametrize("transformers_first", [True, False])
def test_auto_classes_know_protopool_after_import_in_either_order(transformers_first):
    imports = ["from transformers import AutoConfig, AutoModelForImageClassification", "import protopool_hf"]
    code = "\n".join(imports if transformers_first else imports[::-1])
    code += f"""
config = AutoConfig.for_model("protopool", **{TINY!r})
model = AutoModelForImageClassification.from_config(config)
print(type(config).__name__, type(model).__name__)
"""
    assert _run_python(code) == "ProtoPoolConfig ProtoPoolForImageClassification"


def test_a_model_saved_after_importing_only_its_module_carries_its_code(tmp_path):
    # save_pretrained copies the code files only when the class knows its auto class: registered on module import.
    code = f"""
from protopool_hf.configuration_protopool import ProtoPoolConfig
from protopool_hf.modeling_protopool import ProtoPoolForImageClassification
ProtoPoolForImageClassification(ProtoPoolConfig(**{TINY!r})).save_pretrained({str(tmp_path)!r})
"""
    _run_python(code)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageClassification"].endswith("ProtoPoolForImageClassification")
    assert (tmp_path / "modeling_protopool.py").is_file()


def test_the_lazy_export_table_matches_the_type_checking_imports_and_resolves():
    tree = ast.parse(Path(protopool_hf.__file__).read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    typed = {alias.name: node.module for node in block.body for alias in node.names}
    assert typed == protopool_hf._EXPORTS
    assert protopool_hf.__all__ == sorted(protopool_hf._EXPORTS)
    for name in protopool_hf.__all__:
        assert getattr(protopool_hf, name) is not None


def test_the_package_exports_what_a_user_needs_and_the_rest_lives_in_its_module():
    assert set(protopool_hf.__all__) == {
        *("ProtoPoolConfig", "ProtoPoolForImageClassification", "ProtoPoolOutput", "__version__"),
        *("ProtoPoolTrainer", "GumbelScheduleCallback", "WarmupCallback", "ProjectionCallback"),
        *("ProtoPoolRecipe", "train_protopool", "project_prototypes", "explain", "evaluate_interpretability"),
        *("push_to_hub", "convert_original_checkpoint", "export_onnx"),
    }
    with pytest.raises(AttributeError, match="has no attribute 'save_model_folder'"):
        _ = protopool_hf.save_model_folder
    from protopool_hf.hub import save_model_folder

    assert callable(save_model_folder)


@pytest.mark.parametrize(
    "command", [None, "train", "project", "explain", "evaluate", "push", "convert", "export", "app", "space"]
)
def test_help_imports_no_torch(command):
    argv = ["--help"] if command is None else [command, "--help"]
    code = f"""
import sys
from protopool_hf.cli import main
try:
    main({argv!r})
except SystemExit as exit:
    assert exit.code == 0, exit.code
print(sorted(m for m in ('torch', 'timm', 'transformers') if m in sys.modules))
"""
    assert _run_python(code).splitlines()[-1] == "[]"


def test_the_parser_loads_the_commands_module_only_when_a_command_runs():
    code = """
import sys
import protopool_hf.cli
print("protopool_hf.cli_commands" in sys.modules)
"""
    assert _run_python(code) == "False"


@pytest.mark.parametrize("module", ["convert.py", "cli_commands.py", "cli_messages.py"])
def test_no_module_below_the_parser_imports_it(module):
    # Imports go one way: the parser (cli.py) imports the commands and the messages, never the reverse.
    tree = ast.parse((Path(protopool_hf.__file__).parent / module).read_text())
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not modules & {"cli", "protopool_hf.cli"}


def test_the_mask_rules_the_parser_names_are_the_metrics_rules():
    from protopool_hf.metrics import MASK_RULES

    assert sorted(MASK_RULE_NAMES) == sorted(MASK_RULES)


def test_help_lists_every_command():
    parser = build_parser()
    help_text = parser.format_help()
    for command in ("train", "project", "explain", "evaluate", "push", "convert"):
        assert command in help_text


def test_train_size_and_loss_flags_are_named_after_the_config_fields(capsys):
    from protopool_hf import ProtoPoolConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    flags = set(re.findall(r"--[a-z][a-z-]+", capsys.readouterr().out))
    config = ProtoPoolConfig(**TINY)
    for field in (
        "num_prototypes", "num_slots_per_class", "prototype_dim", "feature_stage", "cluster_weight",
        "separation_weight", "last_layer_correct_connection", "background_weight",
    ):  # fmt: skip
        assert hasattr(config, field) and "--" + field.replace("_", "-") in flags, field
    assert "--num-slots" not in flags and "--last-layer-connection" not in flags


@pytest.mark.parametrize("flag", [["--background-weight", "1"], ["--restrict-projection"]])
def test_object_options_without_object_masks_are_refused_before_any_work(tmp_path, capsys, flag):
    out = tmp_path / "run"
    args = ["train", "--dataset", "fashion-mnist", "--data-root", str(FASHION_MNIST), "--output-dir", str(out)]
    assert main([*args, *flag]) == 2
    _one_line_error(capsys, containing=f"{flag[0]} needs the object pixels: pass --object-mask nonzero")
    assert not out.exists()


def test_errors_are_one_line_with_status_2(tmp_path, model_folder, capsys):
    assert main(["explain", str(model_folder), str(tmp_path / "missing.png"), "--out", str(tmp_path / "x.png")]) == 2
    _one_line_error(capsys, containing=f"IMAGE '{tmp_path / 'missing.png'}' does not exist")


@pytest.mark.slow  # trains through the CLI, then explains: 23 s on a 2-core machine
def test_train_then_explain_on_fashion_mnist(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--dataset", "fashion-mnist", "--data-root", str(FASHION_MNIST), "--limit", "160"]
    args += ["--backbone", "test_resnet", "--feature-stage", "1", "--image-size", "32", "--num-prototypes", "20"]
    args += ["--num-slots-per-class", "2", "--prototype-dim", "16", "--warmup-epochs", "1", "--joint-epochs", "1"]
    args += ["--finetune-epochs", "1", "--batch-size", "32", "--cpu", "--output-dir", str(out)]
    args += ["--cluster-weight", "0.2", "--separation-weight", "0.02", "--last-layer-correct-connection", "10"]
    args += ["--finetune-lr", "0.01", "--backbone-lr", "0.002", "--frozen-backbone-stages", "1"]
    args += ["--dataset-name", "zalando-datasets/fashion_mnist"]
    args += ["--object-mask", "nonzero", "--background-weight", "1", "--restrict-projection"]
    out.mkdir()  # an older model in the folder: refused, then replaced with --overwrite
    (out / "README.md").write_text("the card of an older model")
    assert main(args) == 2
    _one_line_error(
        capsys, containing=f"--output-dir '{out}' already holds a saved model (README.md): pass --overwrite"
    )
    assert main([*args, "--overwrite"]) == 0
    files = {path.name for path in out.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "prototypes", "preprocessor_config.json"} <= files
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"]["0"] == "T-shirt/top"
    assert (config["cluster_weight"], config["separation_weight"]) == (0.2, 0.02)
    assert config["last_layer_correct_connection"] == 10.0
    recipe = json.loads((out / "protopool_recipe.json").read_text())
    assert (recipe["finetune_learning_rate"], recipe["backbone_learning_rate"]) == (0.01, 0.002)
    assert recipe["frozen_backbone_stages"] == 1
    assert config["background_weight"] == 1.0 and recipe["projection_restrict_to_objects"] is True
    assert (out / "prototypes" / "gallery.png").is_file()
    printed = capsys.readouterr().out
    assert '"test_accuracy"' in printed
    card = (out / "README.md").read_text()
    assert "older model" not in card and "dataset:\n      name: zalando-datasets/fashion_mnist" in card

    from protopool_hf.data import load_fashion_mnist

    image = tmp_path / "test0.png"
    load_fashion_mnist(FASHION_MNIST, "test", limit=1)[0]["image"].save(image)
    panel = tmp_path / "why.png"
    assert main(["explain", str(out), str(image), "--out", str(panel), "--json"]) == 0
    assert panel.stat().st_size > 0
    assert '"sum_of_contributions"' in capsys.readouterr().out


@pytest.mark.parametrize(
    "command", ["train", "project", "explain", "evaluate", "push", "convert", "export", "app", "space"]
)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: protopool-hf " + command in capsys.readouterr().out


# ---------------------------------------------------------------------------- bad command-line input
def test_a_model_folder_without_config_json_is_named(tmp_path, image_file, capsys):
    (tmp_path / "model").mkdir()
    assert main(["explain", str(tmp_path / "model"), str(image_file), "--out", str(tmp_path / "x.png")]) == 2
    _one_line_error(capsys, containing=f"MODEL folder '{tmp_path / 'model'}' holds no config.json")
    assert not (tmp_path / "x.png").exists()


def test_a_picture_passed_as_model_is_named(tmp_path, image_file, capsys):
    assert main(["explain", str(image_file), str(image_file), "--out", str(tmp_path / "x.png")]) == 2
    _one_line_error(capsys, containing=f"MODEL '{image_file}' is a file, not a model folder")


@pytest.mark.parametrize("model", ["./no-such-model", "no-such-model", "no-org/no-such-model"])
def test_a_missing_model_path_says_no_such_folder(model, tmp_path, image_file, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    assert main(["explain", model, str(image_file), "--out", "x.png"]) == 2
    err = _one_line_error(capsys, containing=f"MODEL '{model}': no such folder")
    assert "Repo id must use" not in err and "couldn't connect" not in err


def test_a_folder_named_like_an_image_is_named(tmp_path, model_folder, capsys):
    (tmp_path / "x.jpg").mkdir()
    assert main(["explain", str(model_folder), str(tmp_path / "x.jpg"), "--out", str(tmp_path / "o.png")]) == 2
    _one_line_error(capsys, containing=f"IMAGE '{tmp_path / 'x.jpg'}' is a folder, not an image file")


def test_an_output_under_a_file_is_refused_before_any_work(tmp_path, model_folder, image_file, capsys):
    (tmp_path / "afile").write_text("not a folder")
    assert main(["explain", str(model_folder), str(image_file), "--out", str(tmp_path / "afile" / "x.png")]) == 2
    _one_line_error(capsys, containing=f"'{tmp_path / 'afile'}' is a file, not a folder")
    assert (tmp_path / "afile").read_text() == "not a folder"


@pytest.mark.parametrize("limit", ["0", "-5", "ten"])
def test_limit_below_one_is_refused_by_the_parser(limit, tmp_path, capsys):
    argv = ["train", "--dataset", "fashion-mnist", "--data-root", str(FASHION_MNIST), "--limit", limit]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    _one_line_error(capsys, containing="argument --limit:")
    assert not (tmp_path / "out").exists()


def test_a_tampered_config_gives_one_line_without_the_load_report(tmp_path, model_folder, image_file, capfd):
    folder = tmp_path / "tampered"
    folder.mkdir()
    for path in model_folder.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_prototypes": 7}))
    assert main(["explain", str(folder), str(image_file), "--out", str(tmp_path / "o.png")]) == 2
    err = capfd.readouterr().err  # transformers' handler writes to the real stderr
    assert err.count("\n") == 1, err
    assert "do not match its config.json" in err and "LOAD REPORT" not in err


def test_debug_shows_the_traceback(tmp_path, image_file):
    (tmp_path / "model").mkdir()
    argv = ["explain", str(tmp_path / "model"), str(image_file), "--out", str(tmp_path / "x.png")]
    for debug_argv in (["--debug", *argv], [*argv, "--debug"]):
        with pytest.raises(FileNotFoundError, match=r"holds no config\.json"):
            main(debug_argv)


def test_an_unexpected_exception_is_one_line_naming_its_type(monkeypatch, tmp_path, capsys):
    def broken(args):
        raise KeyError(101)

    monkeypatch.setitem(COMMANDS, "push", broken)
    assert main(["push", str(tmp_path), "me/model"]) == 2
    _one_line_error(capsys, containing="KeyError: missing key 101 (run again with --debug for the traceback)")


# ---------------------------------------------------------------------------- messages in the CLI's flags
def test_library_advice_is_reworded_into_cli_flags():
    for advice, flag in CLI_WORDING.items():
        assert flag in cli_wording(f"x: {advice} y")
    text = cli_wording("Replace the file, or skip unreadable images with make_transforms(..., skip_bad_images=True).")
    assert text.endswith("skip unreadable images with --skip-bad-images.")


def test_log_records_of_the_package_are_reworded_while_a_command_runs(caplog):
    logger = logging.getLogger("protopool_hf.card")
    with caplog.at_level(logging.WARNING, logger="protopool_hf"), cli_log_wording():
        logger.warning("The card lists the metrics in its body only: pass dataset_name= (a Hub dataset id)")
        logging.getLogger("other").warning("pass dataset_name= stays")
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0].endswith("pass --dataset-name (a Hub dataset id)")
    assert messages[1] == "pass dataset_name= stays"


def test_a_missing_fashion_mnist_folder_names_data_root(tmp_path, capsys):
    argv = ["train", "--dataset", "fashion-mnist", "--data-root", str(tmp_path), "--output-dir", str(tmp_path / "o")]
    assert main(argv) == 2
    err = _one_line_error(capsys, containing="pass --data-root a folder")
    assert "root=" not in err


def test_a_previous_run_names_resume_from_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "warmup" / "checkpoint-1").mkdir(parents=True)
    argv = ["train", "--dataset", "fashion-mnist", "--data-root", str(FASHION_MNIST), "--limit", "100"]
    argv += ["--backbone", "test_resnet", "--image-size", "64", "--num-prototypes", "20", "--num-slots-per-class", "2"]
    argv += ["--prototype-dim", "8", "--cpu", "--output-dir", str(out)]
    assert main(argv) == 2
    err = _one_line_error(capsys, containing="pass --resume-from-checkpoint to continue it")
    assert "resume_from_checkpoint=True" not in err and "output_dir." not in err


def _folder_dataset(root: Path, bad: bool) -> Path:
    import PIL.Image

    for k, name in enumerate(("cat", "dog", "eel")):
        (root / name).mkdir(parents=True)
        for i in range(2):
            PIL.Image.new("RGB", (24, 24), (80 * k, 40 * i, 90)).save(root / name / f"{i}.png")
    if bad:
        (root / "dog" / "2.png").write_text("not an image")
    return root


def test_skip_bad_images_lets_project_skip_an_unreadable_file(tmp_path, model_folder, capsys):
    import datasets

    names = datasets.ClassLabel(names=["cat", "dog", "eel"]).names
    config = json.loads((model_folder / "config.json").read_text())
    assert [config["id2label"][str(i)] for i in range(3)] != names  # the tiny model has LABEL_i names
    folder = tmp_path / "model"
    folder.mkdir()
    for path in model_folder.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    config["id2label"] = dict(enumerate(names))
    config["label2id"] = {name: i for i, name in enumerate(names)}
    (folder / "config.json").write_text(json.dumps(config))
    root = _folder_dataset(tmp_path / "data", bad=True)
    argv = ["project", str(folder), "--dataset", "folder", "--data-root", str(root), "--batch-size", "4"]
    assert main([*argv, "--output-dir", str(tmp_path / "out")]) == 2
    err = _one_line_error(capsys, containing="skip unreadable images with --skip-bad-images")
    assert "2.png" in err and not (tmp_path / "out").exists()
    with pytest.warns(UserWarning, match=r"Skipping an unreadable image: .*2\.png") as caught:
        assert main([*argv, "--output-dir", str(tmp_path / "out"), "--skip-bad-images"]) == 0
    # the pictures are drawn from the dataset the projection recorded, under the same name
    assert not [w for w in caught if "were projected on" in str(w.message)]
    assert (tmp_path / "out" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------- nothing overwritten unless asked
def test_project_refuses_a_folder_with_files_unless_overwrite(tmp_path, model_folder, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("another model")
    argv = ["project", str(model_folder), "--dataset", "folder", "--data-root", str(tmp_path / "nowhere")]
    assert main([*argv, "--output-dir", str(out)]) == 2
    _one_line_error(
        capsys, containing=f"--output-dir '{out}' already holds a saved model (README.md): pass --overwrite to"
    )
    assert main([*argv, "--output-dir", str(out), "--overwrite"]) == 2  # now it gets as far as the dataset
    _one_line_error(capsys, containing="nowhere")
    assert [path.name for path in out.iterdir()] == ["README.md"]


def test_convert_refuses_a_folder_with_files_unless_overwrite(tmp_path, capsys):
    checkpoint = tmp_path / "best_model.pth"
    checkpoint.write_text("not a checkpoint")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert main(["convert", str(checkpoint), str(out)]) == 2
    _one_line_error(
        capsys, containing=f"OUTPUT_DIR '{out}' already holds a saved model (config.json): pass --overwrite to"
    )
    assert main(["convert", str(checkpoint), str(out), "--overwrite"]) == 2  # now it reads the checkpoint
    _one_line_error(capsys, containing=str(checkpoint))
    assert (out / "config.json").read_text() == "{}"


# ---------------------------------------------------------------------------- small things
def test_explain_json_lists_the_slots_of_the_top_k_classes_only(tmp_path, model_folder, image_file, capsys):
    argv = ["explain", str(model_folder), str(image_file), "--out", str(tmp_path / "o.png"), "--json"]
    assert main([*argv, "--top-k", "1"]) == 0
    printed = capsys.readouterr().out
    content = json.loads(printed[printed.index("{") : printed.rindex("}") + 1])
    owners = {row["class_id"] for row in content["top_classes"]} | {content["class_id"]}
    assert len(content["top_classes"]) == 1 and owners == {content["class_id"]}
    assert {slot["class_id"] for slot in content["slots"]} <= owners
    assert content["slots_left_out"] == 2 * TINY["num_slots_per_class"]  # the two other classes' slots
    assert len(content["slots"]) == TINY["num_slots_per_class"]


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        ("convert", ["(default: resnet50)", "(default: 10000.0)"]),
        ("train", ["(default: 9)", "(default: 80)", "(default: timm)", "(default: 0.1)"]),
        ("project", ["(default: 64)"]),
        ("explain", ["(default: 3)"]),
        ("push", ["(default: Upload ProtoPool model)"]),
    ],
)
def test_help_shows_the_defaults(command, shown, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in shown:
        assert default in text
    assert "(default: None)" not in text and "(default: False)" not in text
