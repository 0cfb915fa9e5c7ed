"""The example scripts' own logic: the demo's `--set` overrides, the head-only experiment protocol, and the commands
the docs quote for them."""

import re
import shlex
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import benchmark
import demo
import head_experiments


ROOT = Path(__file__).resolve().parents[1]


def test_demo_overrides_parse_json_and_name_bad_fields():
    settings = demo.apply_overrides(
        demo.DemoSettings(), ["image_size=64", "backbone_learning_rate=null", "augment_scale=[0.5, 1.0]"]
    )
    assert (settings.image_size, settings.backbone_learning_rate, settings.augment_scale) == (64, None, [0.5, 1.0])
    with pytest.raises(ValueError, match="unknown field 'image'"):
        demo.apply_overrides(demo.DemoSettings(), ["image=64"])
    with pytest.raises(ValueError, match="the value must be JSON"):
        demo.apply_overrides(demo.DemoSettings(), ["learning_rate=fast"])


def synthetic_features(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 8, 3, 3) maps where class c lights channel c at one random cell: a task a prototype head can solve."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    maps = 0.1 * torch.randn(n, 8, 3, 3, generator=generator)
    cells = torch.randint(0, 9, (n,), generator=generator)
    maps.view(n, 8, 9)[torch.arange(n), labels, cells] += 3.0
    return maps.half(), labels


@pytest.mark.slow  # about 27 CPU-seconds: 15-30 s on 2 cores
def test_head_only_protocol_learns_projects_and_fine_tunes():
    features = {"train": synthetic_features(512, 0), "test": synthetic_features(128, 1)}
    settings = head_experiments.HeadSettings(
        num_prototypes=8, num_slots_per_class=2, prototype_dim=8, epochs=10, batch_size=16, correct_connection=10.0,
        ft_epochs=2,
    )  # fmt: skip
    result = head_experiments.run_head(features, settings)
    assert result["soft"] > 0.9  # the main phase learns the task
    assert result["fine_tuned"] > 0.5  # after projection and fine-tuning still far above chance (0.25)
    assert 2 <= result["prototypes_used"] <= 8
    assert result["correct_connection"] == 10.0  # the settings are recorded with the result


# --------------------------------------------------------------------------- commands quoted in the docs
def doc_paragraphs(text: str) -> list[tuple[bool, list[str]]]:
    """Per paragraph (a fenced block or text between blank lines): whether it is a fenced block, and the commands it
    quotes, as single lines.

    A fenced block gives its lines (backslash continuations joined, comments dropped); text gives its inline code
    spans, which may wrap across lines.
    """
    paragraphs, rest = [], []
    for n, part in enumerate(re.split(r"^```[a-z]*\n", text, flags=re.M)):
        if n % 2:  # inside a fence
            lines = part.replace("\\\n", " ").splitlines()
            paragraphs.append((True, [line.split(" #")[0] for line in lines if not line.lstrip().startswith("#")]))
        else:
            rest.append(part)
    for paragraph in re.split(r"\n\s*\n", "\n\n".join(rest)):
        paragraphs.append((False, [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", paragraph)]))
    return paragraphs


def script_args(command: str, script: str) -> list[str] | None:
    """The arguments after `examples/<script>` in a command line, or None when it does not run that script."""
    if f"examples/{script}" not in command:
        return None
    words = shlex.split(command)
    for i, word in enumerate(words):
        if word.endswith(f"examples/{script}") and i and words[i - 1].endswith("python"):  # run, not named
            return [w for w in words[i + 1 :] if w != "..."]
    return None


def settings_of(args) -> dict:
    """The demo settings a parsed demo.py or `benchmark.py accuracy` command runs with (threads aside)."""
    settings = demo.DemoSettings()
    if args.train_images:
        settings.train_images = args.train_images
    return {k: v for k, v in demo.apply_overrides(settings, args.set).to_dict().items() if k != "threads"}


def makefile_demo_args() -> list[str]:
    recipe = (ROOT / "Makefile").read_text().split("\ndemo:", 1)[1]
    return script_args(next(line for line in recipe.splitlines() if "examples/demo.py" in line), "demo.py")


def test_commands_in_the_docs_run_as_written():
    """Every demo.py / benchmark.py command the docs quote parses and names real settings; a demo command to copy
    (in a fenced block) is what `make demo` runs; a `--protopool-metrics` command has the settings of the demo run it reuses (the demo
    command in the same paragraph or, without one, the defaults), or benchmark.py refuses it."""
    make_demo = makefile_demo_args()
    assert make_demo == ["--output-dir", "demo-output"]
    checked = 0
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for n, (fenced, commands) in enumerate(doc_paragraphs(path.read_text())):
            where = f"{path.name}, paragraph {n}"
            run_settings = settings_of(demo.build_parser().parse_args([]))
            for command in commands:
                if (argv := script_args(command, "demo.py")) is not None:
                    run_settings = settings_of(demo.build_parser().parse_args(argv))
                    if fenced and "--output-dir" in argv and argv[argv.index("--output-dir") + 1] == "demo-output":
                        assert argv == make_demo, f"{where}: the demo is `make demo` ({make_demo}), not {argv}"
                    checked += 1
                elif (argv := script_args(command, "benchmark.py")) is not None:
                    args = benchmark.build_parser().parse_args(argv)
                    if args.command == "accuracy":
                        settings = settings_of(args)
                        if args.protopool_metrics:
                            assert settings == run_settings, f"{where}: {command!r} reuses a run with other settings"
                    checked += 1
    assert checked >= 20


def test_demo_writes_one_enlarged_example_image_per_class_for_the_explorer(tmp_path: Path):
    from protopool_hf.data import FASHION_MNIST_LABELS, load_fashion_mnist

    test_raw = load_fashion_mnist(Path(__file__).parent / "data" / "fashion-mnist", split="test", limit=200)
    labels = dict(enumerate(FASHION_MNIST_LABELS))
    written = demo.write_example_images(tmp_path / "examples", test_raw, labels)
    present = sorted(set(test_raw["label"]))
    assert [int(path.name.split("_")[0]) for path in written] == present
    first = next(row for row in test_raw if row["label"] == present[0])
    with PIL.Image.open(written[0]) as image:
        assert image.size == (112, 112)
        assert np.array_equal(np.asarray(image)[::4, ::4], np.asarray(first["image"].convert("L")))


def test_demo_reports_both_axes_with_the_more_faithful_localisation():
    """The demo's metrics: accuracy and the interpretability headline, whose boxes come from the localisation with the
    larger deletion gain; the summary line names every target figure."""
    from protopool_tiny import fashion_model

    from protopool_hf.data import load_fashion_mnist
    from protopool_hf.projection import project_prototypes
    from protopool_hf.transforms import make_transforms

    data_dir = Path(__file__).parent / "data" / "fashion-mnist"
    model = fashion_model().eval()
    data = {"test_raw": load_fashion_mnist(data_dir, split="test", limit=8)}
    data["train_raw"] = load_fashion_mnist(data_dir, split="train", limit=40)
    project_prototypes(model, data["train_raw"].with_transform(make_transforms(model.config, train=False)))
    report = demo.measure_interpretability(model, data, max_images=4)
    head = demo.headline(report)
    content = report.to_dict()
    gains = {name: scores["deletion_gain"] for name, scores in content["localisations"].items()}
    assert head["localisation"] == max(gains, key=gains.get) == content["more_faithful_localisation"]
    boxes = content["localisations"][head["localisation"]]
    assert head["background_evidence_share"] == boxes["test_top_slots"]["background_share"]
    assert head["background_prototypes_share"] == boxes["prototype_sources"]["background_share"]
    assert head["nearest_cell_background_share"] == content["top_slot_cells_background_share"]
    assert head["classes_with_duplicate_slots"] == sum(n > 0 for n in content["duplicate_slots_per_class"])
    assert content["num_localised_images"] == 4 and content["num_images"] == 8
    line = demo.summary_line({"test_accuracy": 0.875, "interpretability": {"headline": head}})
    assert line.startswith("Test accuracy 87.50 %;") and f"({head['localisation']} boxes)" in line


def test_prototype_pairs_shares_agree_with_the_report_and_the_figure_has_one_panel_per_item(tmp_path, monkeypatch):
    """`examples/prototype_pairs.py`: the per-prototype object shares are the report's source boxes, one by one."""
    import prototype_pairs
    from protopool_tiny import fashion_model

    from protopool_hf import evaluate_interpretability
    from protopool_hf.data import load_fashion_mnist
    from protopool_hf.hub import save_model_folder
    from protopool_hf.projection import project_prototypes
    from protopool_hf.transforms import make_transforms

    data_dir = Path(__file__).parent / "data" / "fashion-mnist"
    monkeypatch.setenv("FASHION_MNIST_DIR", str(data_dir))
    train = load_fashion_mnist(data_dir, split="train", limit=40)
    model = fashion_model().eval()
    project_prototypes(model, train.with_transform(make_transforms(model.config, train=False)))
    save_model_folder(model, tmp_path / "model", dataset=train)
    shares = prototype_pairs.object_shares(str(tmp_path / "model"))
    report = evaluate_interpretability(
        model, train, masks="fashion-mnist", localisation="upsampled", max_images=1
    ).localisations["upsampled"]
    assert [share for _, share in shares] == sorted(share for _, share in shares)
    assert len(shares) == report.prototype_sources.count
    assert np.mean([share for _, share in shares]) == pytest.approx(report.prototype_sources.mean_object_share)
    assert sorted(p for p, share in shares if share < 0.1) == report.background_prototypes
    # The crop rule (view pixels brighter than a threshold): fewer object pixels as the threshold rises.
    bright = [dict(prototype_pairs.object_shares(str(tmp_path / "model"), t)) for t in (0.0, 0.15, 1.0)]
    assert all(bright[0][p] >= bright[1][p] >= bright[2][p] == 0.0 for p in bright[0])
    assert sorted(bright[0]) == sorted(p for p, _ in shares)
    first, last = shares[0][0], shares[-1][0]
    out = prototype_pairs.figure([f"{tmp_path / 'model'}:{first}:least", f"{tmp_path / 'model'}:{last}:most"])
    with PIL.Image.open(tmp_path / "model" / "prototypes" / f"prototype_{first:03d}_source.png") as source:
        assert out.height == source.height * 4 + 20  # the caption line above the pictures, drawn 4× larger
