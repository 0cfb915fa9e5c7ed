"""`protopool-hf evaluate` on a tiny saved model and Fashion-MNIST's test slice; the report on the card and the Hub."""

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard

from protopool_hf import ProtoPoolForImageClassification, push_to_hub
from protopool_hf.cli import main
from protopool_hf.data import FASHION_MNIST_LABELS, load_fashion_mnist
from protopool_hf.hub import save_model_folder
from protopool_hf.metrics import REPORT_FILENAME, InterpretabilityReport, load_masks, report_card


FASHION_MNIST = Path(__file__).parent / "data" / "fashion-mnist"
FAST = ["--limit", "6", "--max-images", "2", "--localisation", "upsampled"]


def save_tiny_model(folder: Path, tiny_model: Callable[..., ProtoPoolForImageClassification]) -> Path:
    """The tiny model for the 10 Fashion-MNIST classes at 32 px, with provenance, saved in `folder`."""
    model = tiny_model(
        num_labels=10,
        num_prototypes=12,
        input_size=[3, 32, 32],
        crop_pct=1.0,
        feature_stage=2,
        id2label=dict(enumerate(FASHION_MNIST_LABELS)),
    ).eval()
    config = model.config
    # Provenance as a projection on the training split's first images leaves it: prototype p on image p, cell (1, 2).
    count = config.num_prototypes
    index, row, col = torch.arange(count), torch.ones(count, dtype=torch.long), torch.full((count,), 2)
    model.set_projection_provenance(index, row, col, torch.zeros(count), torch.zeros(count, dtype=torch.long))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tiny_model) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("evaluate") / "model", tiny_model)


def test_evaluate_writes_the_report_into_the_model_folder(model_folder, capsys):
    assert (
        main(["evaluate", str(model_folder), "--dataset", "fashion-mnist", "--data-root", str(FASHION_MNIST), *FAST])
        == 0
    )
    out = capsys.readouterr().out
    report = json.loads((model_folder / REPORT_FILENAME).read_text())
    assert report["num_images"] == 6 and report["num_localised_images"] == 2
    scores = report["localisations"]["upsampled"]
    # Fashion-MNIST's masks default to the rule "raw pixel > 0": the boxes and the sources are measured.
    assert scores["test_top_slots"]["count"] > 0 and 0 <= scores["test_top_slots"]["mean_object_share"] <= 1
    assert scores["prototype_sources"]["count"] == len(
        {*ProtoPoolForImageClassification.from_pretrained(model_folder).class_to_prototypes().flatten().tolist()}
    )
    assert report["settings"]["masks"] == "fashion-mnist"
    assert "| background evidence |" in out and f"written to {model_folder / REPORT_FILENAME}" in out
    assert not [p for p in model_folder.iterdir() if p.name.startswith(".")]  # no temporary file left

    # A second run refuses to overwrite the report, before any work.
    argv = ["evaluate", str(model_folder), "--dataset", "fashion-mnist", "--data-root", str(FASHION_MNIST), *FAST]
    assert main(argv) == 2
    assert "already exists: pass --overwrite to replace it" in capsys.readouterr().err


def _files(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


def test_evaluate_refreshes_the_card_of_the_model_folder(tiny_model, tmp_path, capsys):
    # A folder as train writes it, whose card names a dataset and holds the user's own notes, and a picture.
    folder = save_tiny_model(tmp_path / "model", tiny_model)
    model = ProtoPoolForImageClassification.from_pretrained(folder)
    save_model_folder(model, folder, dataset_name="zalando-datasets/fashion_mnist")
    (folder / "README.md").write_text((folder / "README.md").read_text() + "\n## My notes\n\nTrained on a laptop.\n")
    (folder / "prototypes").mkdir()
    (folder / "prototypes" / "prototype_000.png").write_bytes(b"not touched")
    before = _files(folder)
    assert "## Interpretability" not in before["README.md"][0].decode()

    argv = ["evaluate", str(folder), "--dataset", "fashion-mnist", "--data-root", str(FASHION_MNIST), *FAST]
    assert main(argv) == 0
    assert f"Model card updated: {folder / 'README.md'}" in capsys.readouterr().out
    report = json.loads((folder / REPORT_FILENAME).read_text())
    card = ModelCard.load(folder / "README.md")
    assert report_card(report).markdown.strip() in card.text
    assert "## My notes\n\nTrained on a laptop." in card.text
    results = {r.metric_type: r for r in card.data.eval_results}
    share = results["interpretability/prototypes_used_share"]
    assert (
        share.metric_value == report["prototypes_used_share"]
        and share.dataset_name == "zalando-datasets/fashion_mnist"
    )
    after = _files(folder)
    assert set(after) == {*before, REPORT_FILENAME}  # no temporary file left
    assert {name: after[name] for name in before if name != "README.md"} == {
        name: value for name, value in before.items() if name != "README.md"
    }  # weights, config and pictures neither rewritten nor touched


def test_evaluate_with_out_elsewhere_leaves_the_card_alone(tiny_model, tmp_path, capsys):
    folder = save_tiny_model(tmp_path / "model", tiny_model)
    save_model_folder(ProtoPoolForImageClassification.from_pretrained(folder), folder)
    before = _files(folder)
    argv = ["evaluate", str(folder), "--dataset", "fashion-mnist", "--data-root", str(FASHION_MNIST), *FAST]
    assert main([*argv, "--out", str(tmp_path / "report.json")]) == 0
    assert "Model card updated" not in capsys.readouterr().out
    assert _files(folder) == before and (tmp_path / "report.json").is_file()


def test_evaluate_with_masks_from_a_file_and_out(model_folder, tmp_path, capsys):
    images = load_fashion_mnist(FASHION_MNIST, "test", limit=6)
    masks = np.stack([np.ones(image.size[::-1], bool) for image in images["image"]])
    np.savez(tmp_path / "masks.npz", masks=masks)
    out = tmp_path / "report.json"
    argv = ["evaluate", str(model_folder), "--dataset", "fashion-mnist", "--data-root", str(FASHION_MNIST), *FAST]
    assert main([*argv, "--masks", str(tmp_path / "masks.npz"), "--out", str(out)]) == 0
    scores = json.loads(out.read_text())["localisations"]["upsampled"]
    assert scores["test_top_slots"]["background_share"] == 0.0 and scores["test_top_slots"]["mean_object_share"] == 1
    assert scores["prototype_sources"] is None  # file masks cover the evaluated split only


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--masks", "masks.txt"], "pass a .npy or .npz file of booleans"),
        (["--masks", "missing.npy"], "missing.npy' does not exist"),
        (["--masks", "ints.npy"], "holds a int64 array of shape (2, 3, 3): save booleans"),
        (["--parts", "missing.json"], "--parts 'missing.json' does not exist"),
        (["--out", "."], "is a folder: pass a file name"),
    ],
)
def test_evaluate_bad_arguments_are_one_line(model_folder, tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "ints.npy", np.zeros((2, 3, 3), dtype=np.int64))
    argv = ["evaluate", str(model_folder), "--dataset", "fashion-mnist", "--data-root", str(FASHION_MNIST), *extra]
    assert main([*argv, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_evaluate_of_a_hub_id_needs_out(capsys):
    assert main(["evaluate", "someone/some-model", "--dataset", "fashion-mnist"]) == 2
    assert "is no local folder: pass --out FILE" in capsys.readouterr().err


def test_load_masks_reads_npy(tmp_path):
    np.save(tmp_path / "m.npy", np.zeros((3, 4, 5), bool))
    masks = load_masks(tmp_path / "m.npy")
    assert len(masks) == 3 and masks[0].shape == (4, 5)


def test_report_card_table_and_model_index(model_folder):
    content = json.loads((model_folder / REPORT_FILENAME).read_text())
    card = report_card(content)
    assert "| metric | value | meaning |" in card.markdown
    assert "| metric | upsampled boxes | meaning |" in card.markdown
    assert "| consistency" not in card.markdown  # not measured: no parts
    entries = {entry["type"]: entry for entry in card.model_index}
    assert entries["interpretability/prototypes_used_share"]["value"] == content["prototypes_used_share"]
    key = "interpretability/upsampled/test_top_slots.background_share"
    assert entries[key]["value"] == content["localisations"]["upsampled"]["test_top_slots"]["background_share"]
    assert all(isinstance(entry["value"], int | float) for entry in card.model_index)
    assert isinstance(InterpretabilityReport, type)


def test_push_carries_the_report(model_folder, hub_server):
    # After `protopool-hf evaluate` (the first test wrote the report), `protopool-hf push` uploads it and the card
    # shows it; with a dataset id, its numbers go to the model-index too.
    repo_id = "me/evaluated"
    report = json.loads((model_folder / REPORT_FILENAME).read_text())
    assert main(["push", str(model_folder), repo_id]) == 0
    commit = hub_server.repos[repo_id].commits[-1]
    assert REPORT_FILENAME in commit.added and json.loads(hub_server.repos[repo_id].read(REPORT_FILENAME)) == report
    assert report_card(report).markdown.strip() in ModelCard.load(repo_id).text

    push_to_hub(model_folder, repo_id, dataset_name="zalando-datasets/fashion_mnist")
    results = {r.metric_type: r.metric_value for r in ModelCard.load(repo_id).data.eval_results}
    assert results["interpretability/prototypes_used_share"] == report["prototypes_used_share"]
