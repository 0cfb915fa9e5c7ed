import json
import subprocess
import sys
from pathlib import Path

import pytest

from protopool_hf.cli import build_parser, main


FASHION_MNIST = Path(__file__).parent / "data" / "fashion-mnist"


def test_help_lists_every_command():
    parser = build_parser()
    help_text = parser.format_help()
    for command in ("train", "project", "explain", "push", "convert"):
        assert command in help_text


def test_help_does_not_import_torch():
    # `protopool-hf --help` must answer without the heavy libraries: the CLI module imports them per subcommand.
    code = "import sys, runpy; sys.argv = ['protopool-hf', '--help']\n"
    code += "import importlib.util, types\n"
    code += "spec = importlib.util.spec_from_file_location('cli', r'%s')\n" % (
        Path(__file__).parents[1] / "protopool_hf" / "cli.py"
    )
    code += "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
    code += "print(sorted(m for m in ('torch', 'timm', 'transformers') if m in sys.modules))\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stderr


def test_errors_are_one_line_with_status_2(tmp_path, capsys):
    assert main(["explain", str(tmp_path), str(tmp_path / "missing.png"), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "missing.png" in err
    assert err.count("\n") == 1


@pytest.mark.slow  # trains through the CLI, then explains: 23 s on a 2-core machine
def test_train_then_explain_on_fashion_mnist(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--dataset", "fashion-mnist", "--data-root", str(FASHION_MNIST), "--limit", "160"]
    args += ["--backbone", "test_resnet", "--feature-stage", "1", "--image-size", "32", "--num-prototypes", "20"]
    args += ["--num-slots", "2", "--prototype-dim", "16", "--warmup-epochs", "1", "--joint-epochs", "1"]
    args += ["--finetune-epochs", "1", "--batch-size", "32", "--cpu", "--output-dir", str(out)]
    args += ["--cluster-weight", "0.2", "--separation-weight", "0.02", "--last-layer-connection", "10"]
    args += ["--finetune-lr", "0.01", "--backbone-lr", "0.002", "--frozen-backbone-stages", "1"]
    assert main(args) == 0
    files = {path.name for path in out.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "prototypes", "preprocessor_config.json"} <= files
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"]["0"] == "T-shirt/top"
    assert (config["cluster_weight"], config["separation_weight"]) == (0.2, 0.02)
    assert config["last_layer_correct_connection"] == 10.0
    recipe = json.loads((out / "protopool_recipe.json").read_text())
    assert (recipe["finetune_learning_rate"], recipe["backbone_learning_rate"]) == (0.01, 0.002)
    assert recipe["frozen_backbone_stages"] == 1
    assert (out / "prototypes" / "gallery.png").is_file()
    printed = capsys.readouterr().out
    assert '"test_accuracy"' in printed

    from protopool_hf.data import load_fashion_mnist

    image = tmp_path / "test0.png"
    load_fashion_mnist(FASHION_MNIST, "test", limit=1)[0]["image"].save(image)
    panel = tmp_path / "why.png"
    assert main(["explain", str(out), str(image), "--out", str(panel), "--json"]) == 0
    assert panel.stat().st_size > 0
    assert '"sum_of_contributions"' in capsys.readouterr().out


@pytest.mark.parametrize("command", ["train", "project", "explain", "push", "convert"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: protopool-hf " + command in capsys.readouterr().out
