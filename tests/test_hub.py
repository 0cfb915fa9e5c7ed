"""protopool_hf.hub: the model card, model folders and one-commit pushes (through the loopback Hub of hub_server.py).

Regenerate the golden card with `PROTOPOOL_UPDATE_GOLDEN=1 pytest tests/test_hub.py -k golden` and review the diff.
"""

import copy
import errno
import functools
import io
import json
import logging
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import EvalResult, HfApi, ModelCard, hf_hub_download, list_repo_files
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.repocard_data import model_index_to_eval_results
from PIL import Image
from transformers import AutoModelForImageClassification, pipeline

from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification, hub
from protopool_hf.hub import (
    GALLERY_FILE,
    ProtoPoolModelCardData,
    backbone_hub_id,
    load_metrics,
    merge_model_cards,
    push_to_hub,
    render_model_card,
    save_model_folder,
)


GOLDEN = Path(__file__).parent / "data" / "model_card_golden.md"
REPO = "org/protopool-tiny"
DATASET = "org/birds"
CLASSES = {0: "cardinal", 1: "blue jay", 2: "house | sparrow"}  # the "|" must be escaped in the card's table
SLOTS = [[0, 1], [2, 1], [3, 5]]  # the prototype of each class slot: 1 is shared, 4 is unused
METRICS = {"eval_accuracy": 0.75, "eval_loss": 0.61, "eval_runtime": 1.5, "test_accuracy": 0.5, "epoch": 3.0}
TRAINING = {"learning_rate": 0.001, "num_train_epochs": 3, "per_device_train_batch_size": 8}
CODE = {
    "configuration_protopool.py",
    "modeling_protopool.py",
    "layers.py",
    "losses.py",
    "backbone.py",
    "preprocessing.py",
    "provenance.py",
    "torch_utils.py",
}
MODEL_FILES = {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", *CODE}
PICTURES = {0, 1, 2, 3, 5}


def tiny_model(projected: bool = True) -> ProtoPoolForImageClassification:
    """A fixed test_resnet model: known slot assignment, and (when `projected`) provenance for every used prototype."""
    return copy.deepcopy(_tiny_model(projected))


@functools.cache
def _tiny_model(projected: bool) -> ProtoPoolForImageClassification:
    torch.manual_seed(0)
    config = ProtoPoolConfig(
        backbone="test_resnet",
        num_labels=3,
        num_prototypes=6,
        num_slots_per_class=2,
        prototype_dim=8,
        id2label=CLASSES,
        label2id={name: index for index, name in CLASSES.items()},
    )
    model = ProtoPoolForImageClassification(config).eval()
    with torch.no_grad():
        logits = torch.full((3, 6, 2), -5.0)
        for class_id, prototypes in enumerate(SLOTS):
            for slot, prototype in enumerate(prototypes):
                logits[class_id, prototype, slot] = 5.0
        model.head.slot_logits.copy_(logits)
    if projected:
        model.set_projection_provenance(
            image_index=torch.tensor([0, 1, 1, 2, -1, 3]),
            row=torch.tensor([1, 2, 0, 3, -1, 4]),
            col=torch.tensor([0, 1, 2, 3, -1, 4]),
            distance=torch.tensor([0.0, 0.0, 0.0, 0.0, float("nan"), 0.0]),
            label=torch.tensor([0, 0, 1, 2, -1, 2]),
            dataset_name=DATASET,
            input_size=[3, 160, 160],
        )
        model.harden_assignment()
    return model


def png(color: tuple[int, int, int], size: tuple[int, int] = (8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_pictures(folder: Path, ids=PICTURES) -> set[str]:
    """Stand-ins for visualization.save_prototype_images: a crop per prototype and the gallery."""
    names = {f"prototypes/prototype_{p:03d}.png" for p in ids} | {GALLERY_FILE}
    for index, name in enumerate(sorted(names)):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(png((40 * index % 256, 100, 200)))
    return names


def golden_card() -> ModelCard:
    return render_model_card(
        tiny_model(),
        repo_id=REPO,
        card_data=ProtoPoolModelCardData(license="apache-2.0", tags=["birds"]),
        metrics=METRICS,
        dataset_name=DATASET,
        training_args=TRAINING,
        prototype_files=sorted(f"prototypes/prototype_{p:03d}.png" for p in PICTURES),
        gallery_file=GALLERY_FILE,
    )


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name != folder.name)


# --------------------------------------------------------------------------- the card


def test_card_matches_the_golden_file():
    card = golden_card()
    if os.environ.get("PROTOPOOL_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(card.content, encoding="utf-8")
    assert card.content == GOLDEN.read_text(encoding="utf-8"), (
        "The model card changed: if on purpose, run PROTOPOOL_UPDATE_GOLDEN=1 pytest tests/test_hub.py -k golden "
        "and review the diff of tests/data/model_card_golden.md."
    )
    # updating a card with itself changes nothing
    assert merge_model_cards(card, ModelCard(card.content)).content == card.content


def test_card_metadata_parses_back_with_huggingface_hubs_own_parser():
    card = ModelCard(golden_card().content)
    data = card.data
    assert data.library_name == "protopool-hf"
    assert data.pipeline_tag == "image-classification"
    assert data.tags == ["protopool", "prototype-network", "interpretability", "timm", "birds"]
    assert data.license == "apache-2.0" and data.datasets == [DATASET] and data.metrics == ["accuracy"]
    assert data.base_model is None  # test_resnet was not pretrained
    name, results = model_index_to_eval_results(data.to_dict()["model-index"])
    assert name == "protopool-tiny"
    assert [(r.task_type, r.dataset_type, r.dataset_split, r.metric_type, r.metric_value) for r in results] == [
        ("image-classification", DATASET, "validation", "accuracy", 0.75),
        ("image-classification", DATASET, "test", "accuracy", 0.5),
    ]
    assert [(r.dataset_split, r.metric_value) for r in data.eval_results] == [("validation", 0.75), ("test", 0.5)]


def test_card_body_shows_the_model():
    text = golden_card().text
    assert "| 2 | house \\| sparrow | [3](prototypes/prototype_003.png), [5](prototypes/prototype_005.png) |" in text
    assert "Unused: 4." in text and "1 of them by more than one slot" in text
    assert "![Prototype gallery" in text and f"]({GALLERY_FILE})" in text
    assert f'AutoModelForImageClassification.from_pretrained("{REPO}", trust_remote_code=True)' in text
    assert f'pipeline("image-classification", model="{REPO}", trust_remote_code=True)' in text
    assert "from protopool_hf import explain" in text
    assert "| validation | accuracy | 0.75 |" in text and "loss" not in text.split("## Evaluation")[1].split("##")[0]
    assert "| `learning_rate` | 0.001 |" in text
    assert "@inproceedings{rymarczyk2022interpretable" in text and "5×5 feature map" in text


def test_card_without_pictures_or_projection_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="protopool_hf.hub"):
        card = render_model_card(tiny_model(projected=False), metrics={"accuracy": 0.9})
    assert "have not been projected" in card.text
    assert "your-namespace/protopool-test-resnet" in card.text  # no repo yet: a placeholder
    assert "model-index" not in card.data.to_dict() and "| — | accuracy | 0.9 |" in card.text
    assert "dataset_name=" in caplog.text  # the metrics need a dataset to be published as eval results
    card = render_model_card(tiny_model())
    assert "5 of the 6 prototypes were projected" in card.text and "pictures were not rendered" in card.text
    assert "](prototypes/" not in card.text


def test_eval_results_given_as_card_data_fill_the_evaluation_section():
    result = EvalResult("image-classification", DATASET, DATASET, "top5_accuracy", 0.97, dataset_split="test")
    data = ProtoPoolModelCardData(model_name="mine", eval_results=[result], license="mit")
    card = render_model_card(tiny_model(), card_data=data)
    assert "| test | top5_accuracy | 0.97 |" in card.text and card.data.eval_results == [result]
    assert card.data.model_name == "mine" and card.data.license == "mit"


def test_base_model_is_the_backbones_timm_repo_only_when_pretrained_from_timm():
    def config(**kwargs):
        return ProtoPoolConfig(num_labels=2, num_prototypes=4, num_slots_per_class=1, **kwargs)

    assert backbone_hub_id(config(backbone="resnet50")) is None
    assert backbone_hub_id(config(backbone="resnet50", backbone_pretrained=True)) == "timm/resnet50.a1_in1k"
    assert backbone_hub_id(config(backbone="resnet50.tv_in1k", backbone_pretrained=True)) == "timm/resnet50.tv_in1k"
    local = {"pretrained_cfg_overlay": {"file": "/weights/inat.pth"}}
    assert backbone_hub_id(config(backbone="resnet50", backbone_pretrained=True, backbone_kwargs=local)) is None
    other = {"pretrained_cfg_overlay": {"hf_hub_id": "me/resnet50-inat"}}
    assert backbone_hub_id(config(backbone="resnet50", backbone_pretrained=True, backbone_kwargs=other)) == (
        "me/resnet50-inat"
    )


def test_updating_a_card_keeps_the_users_text_and_metadata():
    first = render_model_card(tiny_model(), repo_id=REPO, metrics={"eval_accuracy": 0.5}, dataset_name=DATASET)
    user_note = "## My notes\n\nCollected   by hand.\n\n```\nkeep   spacing\n\n\n```"
    edited = ModelCard(first.content)
    edited.data.license, edited.data.tags, edited.data["my_key"] = "mit", ["birds"], 1
    edited.text = "\n# My title\n\nIntro.\n" + first.text.replace(
        "<!-- protopool-hf:begin classes -->", user_note + "\n\n<!-- protopool-hf:begin classes -->"
    )
    edited = ModelCard(str(edited))
    assert edited.data.license == "mit"
    updated = render_model_card(
        tiny_model(), repo_id=REPO, metrics={"eval_accuracy": 0.9}, dataset_name=DATASET, existing_card=edited
    )
    text = updated.text
    assert text.startswith("\n# My title\n\nIntro.\n\n<!-- protopool-hf:begin header -->")
    assert user_note in text
    assert text.index("## Prototypes") < text.index("## My notes") < text.index("## Classes and their prototypes")
    assert "| validation | accuracy | 0.9 |" in text and "| validation | accuracy | 0.5 |" not in text
    assert updated.data.license == "mit" and updated.data.my_key == 1
    assert updated.data.tags == ["birds", "protopool", "prototype-network", "interpretability", "timm"]
    assert [r.metric_value for r in updated.data.eval_results] == [0.9]
    # nothing new for the training and evaluation sections: they keep their content, and the model-index stays
    again = render_model_card(tiny_model(), repo_id=REPO, existing_card=updated)
    assert "| validation | accuracy | 0.9 |" in again.text and [r.metric_value for r in again.data.eval_results] == [
        0.9
    ]
    assert again.content == render_model_card(tiny_model(), repo_id=REPO, existing_card=again).content


def test_a_card_without_our_sections_is_kept_below_ours_unless_transformers_generated_it():
    mine = ModelCard("---\nlicense: mit\n---\n\n# Birds\n\nMy own words.\n")
    merged = render_model_card(tiny_model(), existing_card=mine)
    assert merged.text.rstrip().endswith("# Birds\n\nMy own words.") and merged.data.license == "mit"
    assert merged.text.index("<!-- protopool-hf:end citation -->") < merged.text.index("# Birds")
    generated = ModelCard(
        "---\nlibrary_name: transformers\ntags: [generated_from_trainer]\n---\n\n<!-- This model card has been "
        "generated automatically according to the information the Trainer had access to. You should probably "
        "proofread and complete it, then remove this comment. -->\n\n# out\n\nMore information needed\n"
    )
    replaced = render_model_card(tiny_model(), existing_card=generated)
    assert "More information needed" not in replaced.text and replaced.data.library_name == "protopool-hf"
    assert "generated_from_trainer" in replaced.data.tags


def test_our_sections_missing_from_an_old_card_are_inserted_in_template_order():
    text = render_model_card(tiny_model()).text
    blocks = {name: block for name, block in hub._split_blocks(text) if name}
    old_text = "".join(  # an old card without the header and model sections, with the user's text after classes
        [blocks[name] + "\n\n" for name in ("about", "usage", "prototypes", "classes")]
        + ["## Mine\n\n"]
        + [blocks[name] + "\n\n" for name in ("training", "evaluation", "limitations", "citation")]
    )
    merged = render_model_card(tiny_model(), existing_card=ModelCard(f"---\nlicense: mit\n---\n{old_text}"))
    names = [line.split()[2] for line in merged.text.splitlines() if line.startswith("<!-- protopool-hf:begin")]
    assert names == list(hub.SECTIONS)
    order = [merged.text.index(heading) for heading in ("# protopool", "## Classes", "## Model details", "## Mine")]
    assert order == sorted(order) and merged.text.index("## Mine") < merged.text.index("## Training")


def test_load_metrics_reads_the_trainers_results(tmp_path):
    assert load_metrics(tmp_path) == {}
    state = {"log_history": [{"loss": 1.0}, {"eval_accuracy": 0.6, "epoch": 1}, {"eval_accuracy": 0.7, "epoch": 2}]}
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    assert load_metrics(tmp_path) == {"eval_accuracy": 0.7, "epoch": 2}
    (tmp_path / "all_results.json").write_text(json.dumps({"eval_accuracy": 0.8, "train_loss": 0.1}))
    (tmp_path / "test_results.json").write_text(json.dumps({"test_accuracy": 0.75}))
    assert load_metrics(tmp_path) == {"eval_accuracy": 0.8, "train_loss": 0.1, "test_accuracy": 0.75}
    (tmp_path / "eval_results.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"eval_results\.json must hold a JSON object"):
        load_metrics(tmp_path)


# --------------------------------------------------------------------------- model folders


def test_save_model_folder_writes_a_complete_folder_and_updates_it_in_place(tmp_path, caplog):
    model, folder = tiny_model(), tmp_path / "run" / "out"
    assert save_model_folder(model, folder, metrics=METRICS, dataset_name=DATASET) == folder
    assert set(snapshot(folder)) == MODEL_FILES and siblings(folder) == []
    assert AutoModelForImageClassification.from_pretrained(folder).config.id2label == CLASSES

    pictures = write_pictures(folder)  # as if drawn from the dataset
    (folder / "trainer_state.json").write_text(json.dumps({"log_history": [{"eval_accuracy": 0.8}]}))
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "optimizer.pt").write_bytes(b"state")
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"stale shard")
    save_model_folder(model, folder)
    files = snapshot(folder)
    assert set(files) == MODEL_FILES | pictures | {"trainer_state.json", "checkpoint-10/optimizer.pt"}
    assert os.stat(folder / "trainer_state.json").st_nlink == 1 and siblings(folder) == []  # the old copy is gone
    card = ModelCard.load(folder / "README.md")
    assert [r.metric_value for r in card.data.eval_results] == [0.8]  # read from trainer_state.json
    assert "[3](prototypes/prototype_003.png)" in card.text

    model.head.projection_row[0] += 1  # another projection: the old pictures would be wrong
    with caplog.at_level(logging.WARNING, logger="protopool_hf.hub"):
        save_model_folder(model, folder)
    assert "another projection" in caplog.text
    assert not (folder / "prototypes").exists() and "pictures were not rendered" in (folder / "README.md").read_text()


def test_save_model_folder_draws_the_pictures_from_the_dataset(tmp_path, monkeypatch):
    calls = []

    def fake_save_prototype_images(model, dataset, out_dir, *, gallery):
        calls.append((dataset, gallery))
        write_pictures(Path(out_dir))

    monkeypatch.setattr("protopool_hf.visualization.save_prototype_images", fake_save_prototype_images)
    folder = save_model_folder(tiny_model(), tmp_path / "out", dataset="the dataset")
    assert calls == [("the dataset", True)] and (folder / GALLERY_FILE).is_file()
    assert "](prototypes/gallery.png)" in (folder / "README.md").read_text()


def test_a_failed_save_leaves_the_old_folder_untouched(tmp_path, monkeypatch):
    folder = save_model_folder(tiny_model(), tmp_path / "out")
    write_pictures(folder)
    before = snapshot(folder)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(hub, "render_model_card", broken)
    model = tiny_model()
    with torch.no_grad():
        model.head.last_layer.weight.mul_(2)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model_folder(model, folder)
    assert snapshot(folder) == before and siblings(folder) == []


@pytest.mark.parametrize("exchange", ["renameat2", "two renames"])
def test_the_swap_replaces_the_whole_folder(tmp_path, monkeypatch, exchange):
    if exchange == "renameat2":
        if not sys.platform.startswith("linux"):
            pytest.skip("renameat2 is Linux-only")

        def no_rename(*args):
            raise AssertionError("the two-rename fallback ran: renameat2(RENAME_EXCHANGE) failed here")

        monkeypatch.setattr(os, "rename", no_rename)
    if exchange == "two renames":

        def unsupported(first, second):
            raise OSError(errno.EINVAL, "not supported by this file system")

        monkeypatch.setattr(hub, "_exchange", unsupported)
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "old.txt").write_text("old")
    staging = tmp_path / ".out.protopool-abc.new"
    staging.mkdir()
    (staging / "new.txt").write_text("new")
    hub._swap_in(staging, folder, old_exists=True)
    assert snapshot(folder) == {"new.txt": b"new"} and snapshot(staging) == {"old.txt": b"old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.protopool-abc.new", "out"]


def test_an_interrupted_two_rename_swap_is_finished_by_the_next_save(tmp_path, caplog):
    folder = tmp_path / "out"
    old, new = tmp_path / ".out.protopool-x1.old", tmp_path / ".out.protopool-x1.new"
    for path, text in ((old, "old"), (new, "new")):
        path.mkdir()
        (path / "file.txt").write_text(text)
    with caplog.at_level(logging.WARNING, logger="protopool_hf.hub"):
        hub._finish_interrupted_swap(folder)  # crashed between the renames: the new folder was complete
    assert snapshot(folder) == {"file.txt": b"new"} and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert "Finishing an interrupted save" in caplog.text

    folder.rename(old)  # crashed before the new folder was complete: restore the old one
    hub._finish_interrupted_swap(folder)
    assert snapshot(folder) == {"file.txt": b"new"} and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    save_model_folder(tiny_model(), folder)
    assert "file.txt" in snapshot(folder)  # carried over


# --------------------------------------------------------------------------- push


def expected_commit(pictures: set[str] = frozenset()) -> set[str]:
    return MODEL_FILES | set(pictures)


def test_push_a_model_then_load_it_through_the_hub(hub_server, tmp_path):
    model = tiny_model()
    info = push_to_hub(model, REPO, metrics=METRICS, dataset_name=DATASET, training_args=TRAINING)
    repo = hub_server.repos[REPO]
    assert [commit.title for commit in repo.commits] == ["initial commit", "Upload ProtoPool model"]
    assert info.oid == repo.commits[-1].oid
    assert set(repo.commits[-1].added) == expected_commit()
    assert set(list_repo_files(REPO)) == expected_commit() | {".gitattributes"}
    assert repo.commits[-1].files["model.safetensors"].lfs  # the weights took the git-LFS path, as on the Hub

    pixel_values = torch.randn(2, 3, 160, 160)
    loaded = AutoModelForImageClassification.from_pretrained(REPO, trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values).logits, model(pixel_values).logits, rtol=0, atol=0)
    classifier = pipeline("image-classification", model=REPO, trust_remote_code=True)
    predictions = classifier(Image.new("RGB", (200, 180), (90, 140, 30)), top_k=3)
    assert sorted(p["label"] for p in predictions) == sorted(CLASSES.values())

    card = ModelCard.load(REPO)
    assert card.data.library_name == "protopool-hf" and card.data.tags[:4] == list(hub.DEFAULT_TAGS)
    name, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    assert name == "protopool-tiny" and [(r.dataset_split, r.metric_value) for r in results] == [
        ("validation", 0.75),
        ("test", 0.5),
    ]
    assert f'from_pretrained("{REPO}", trust_remote_code=True)' in card.text


def test_a_fresh_process_without_protopool_hf_loads_the_pushed_repo(hub_server, tmp_path):
    model = tiny_model()
    push_to_hub(model, REPO)
    pixel_values = torch.randn(2, 3, 160, 160)
    torch.save(pixel_values, tmp_path / "inputs.pt")
    script = textwrap.dedent(
        f"""
        import importlib.util, sys
        sys.path.append({sysconfig.get_paths()["purelib"]!r})  # the venv's packages, without its .pth files
        assert importlib.util.find_spec("protopool_hf") is None, "protopool_hf must not be importable here"
        import torch
        torch.set_num_threads({torch.get_num_threads()})  # like with like: the kernels' split depends on it
        from transformers import AutoModelForImageClassification
        model = AutoModelForImageClassification.from_pretrained({REPO!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(torch.load("inputs.pt")).logits
        torch.save(logits, "logits.pt")
        print(type(model).__module__)
        """
    )
    # -I: no PYTHONPATH, user site or current folder; -S: no site-packages .pth files (the editable install's finder)
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("transformers_modules.")
    with torch.no_grad():
        expected = model(pixel_values).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=0, atol=0)


def test_push_a_trained_folder_as_it_is(hub_server, tmp_path):
    folder = save_model_folder(tiny_model(), tmp_path / "out", training_args=TRAINING)
    pictures = write_pictures(folder)
    (folder / "trainer_state.json").write_text(json.dumps({"log_history": [{"eval_accuracy": 0.8, "epoch": 3}]}))
    (folder / "training_args.bin").write_bytes(b"pickle")
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "model.safetensors").write_bytes(b"old weights")
    before = snapshot(folder)

    push_to_hub(folder, REPO, dataset_name=DATASET)
    repo = hub_server.repos[REPO]
    assert len(repo.commits) == 2 and set(repo.commits[-1].added) == expected_commit(pictures)
    for path in expected_commit(pictures) - {"README.md"}:
        assert repo.read(path) == before[path], path  # uploaded as they are
    assert snapshot(folder) == before  # the folder is not modified
    assert sum(line.startswith(f"PUT /lfs-upload/{REPO}/") for line in hub_server.log) == len(pictures) + 1
    card = ModelCard.load(REPO)
    assert "[5](prototypes/prototype_005.png)" in card.text and f"]({GALLERY_FILE})" in card.text
    assert "| `learning_rate` | 0.001 |" in card.text  # the folder card's training section is kept
    assert [r.metric_value for r in card.data.eval_results] == [0.8]  # the folder's Trainer results
    assert f'from_pretrained("{REPO}"' in card.text and "your-namespace" not in card.text
    assert (
        Path(hf_hub_download(REPO, "prototypes/prototype_005.png")).read_bytes()
        == before["prototypes/prototype_005.png"]
    )

    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"holds no config\.json"):
        push_to_hub(folder, REPO)


def test_a_repush_keeps_the_users_readme_and_drops_stale_pictures(hub_server, tmp_path):
    folder = save_model_folder(tiny_model(), tmp_path / "out")
    write_pictures(folder)
    push_to_hub(folder, REPO, metrics={"eval_accuracy": 0.5}, dataset_name=DATASET)
    remote = ModelCard.load(REPO)
    remote.data.license = "cc-by-4.0"
    user_section = "## Field notes\n\nPhotographed in   Kraków.\n"
    remote.text = remote.text.replace(
        "<!-- protopool-hf:begin prototypes -->", user_section + "\n<!-- protopool-hf:begin prototypes -->"
    )
    HfApi().upload_file(path_or_fileobj=str(remote).encode(), path_in_repo="README.md", repo_id=REPO)

    for path in (folder / "prototypes").glob("prototype_005*"):
        path.unlink()  # e.g. pruned: its picture must leave the repo too
    push_to_hub(folder, REPO, metrics={"eval_accuracy": 0.9}, dataset_name=DATASET, commit_message="Re-push")
    repo = hub_server.repos[REPO]
    assert [c.title for c in repo.commits][-1] == "Re-push" and repo.commits[-1].deleted == [
        "prototypes/prototype_005.png"
    ]
    card = ModelCard.load(REPO)
    assert user_section in card.text and card.text.index("## Field notes") < card.text.index("## Prototypes")
    assert card.data.license == "cc-by-4.0"
    assert [r.metric_value for r in card.data.eval_results] == [
        0.9
    ] and "| validation | accuracy | 0.5 |" not in card.text
    assert "prototype_005.png" not in card.text


def test_a_failed_push_leaves_the_repo_at_its_previous_revision(hub_server, tmp_path):
    folder = save_model_folder(tiny_model(), tmp_path / "out")
    write_pictures(folder)
    push_to_hub(folder, REPO)
    repo = hub_server.repos[REPO]
    head, files = repo.branches["main"], list_repo_files(REPO)
    model = tiny_model()
    with torch.no_grad():
        model.head.last_layer.weight.mul_(3)

    hub_server.fail_next_commit = True
    with pytest.raises(HfHubHTTPError, match="simulated failure of a commit"):
        push_to_hub(model, REPO, metrics={"eval_accuracy": 0.1}, dataset_name=DATASET)
    hub_server.fail_next_lfs_upload = True
    with torch.no_grad():
        model.head.last_layer.weight.mul_(3)  # new weights: the LFS objects of the failed commit do not hold them
    with pytest.raises(RuntimeError, match="Error while uploading"):
        push_to_hub(model, REPO)
    assert repo.branches["main"] == head and len(repo.commits) == 2 and list_repo_files(REPO) == files
    assert repo.read("model.safetensors") == (folder / "model.safetensors").read_bytes()


def test_a_push_based_on_an_outdated_revision_fails(hub_server, monkeypatch):
    push_to_hub(tiny_model(), REPO)
    stage = hub._stage

    def stage_while_someone_else_commits(*args, **kwargs):
        HfApi().upload_file(path_or_fileobj=b"# theirs\n", path_in_repo="README.md", repo_id=REPO)
        return stage(*args, **kwargs)

    monkeypatch.setattr(hub, "_stage", stage_while_someone_else_commits)
    with pytest.raises(HfHubHTTPError, match="412"):
        push_to_hub(tiny_model(), REPO, metrics={"eval_accuracy": 0.3})
    assert hub_server.repos[REPO].read("README.md") == b"# theirs\n"  # their change is not overwritten


def test_push_to_another_branch(hub_server, monkeypatch):
    def create_branch(self, repo_id, *, branch, exist_ok=False, **kwargs):  # the test hub has no branch API
        repo = hub_server.repos[repo_id]
        repo.branches.setdefault(branch, repo.branches["main"])

    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    push_to_hub(tiny_model(), REPO, revision="dev", private=True)
    repo = hub_server.repos[REPO]
    assert repo.private and repo.branches["main"] == repo.commits[0].oid
    assert "README.md" in repo.resolve("dev").files
