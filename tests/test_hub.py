"""protopool_hf.hub: model folders and one-commit pushes (through the loopback Hub of hub_server.py)."""

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
from card_fixtures import (
    CLASSES,
    DATASET,
    GALLERY,
    METRICS,
    MODEL_FILES,
    REPO,
    REPORT,
    TRAINING,
    card_model,
    png,
    siblings,
    snapshot,
    write_pictures,
)
from huggingface_hub import HfApi, ModelCard, hf_hub_download, list_repo_files
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.repocard_data import model_index_to_eval_results
from PIL import Image
from transformers import AutoModelForImageClassification, pipeline

from protopool_hf import hub
from protopool_hf.card import DEFAULT_TAGS, render_model_card
from protopool_hf.hub import push_to_hub, save_model_folder
from protopool_hf.metrics import REPORT_FILENAME


# --------------------------------------------------------------------------- model folders


def test_save_model_folder_writes_a_complete_folder_and_updates_it_in_place(tmp_path, caplog):
    model, folder = card_model(), tmp_path / "run" / "out"
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

    monkeypatch.setattr("protopool_hf.gallery.save_prototype_images", fake_save_prototype_images)
    folder = save_model_folder(card_model(), tmp_path / "out", dataset="the dataset")
    assert calls == [("the dataset", True)] and (folder / GALLERY).is_file()
    assert "](prototypes/gallery.png)" in (folder / "README.md").read_text()


def test_a_failed_save_leaves_the_old_folder_untouched(tmp_path, monkeypatch):
    folder = save_model_folder(card_model(), tmp_path / "out")
    write_pictures(folder)
    before = snapshot(folder)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(hub, "render_model_card", broken)
    model = card_model()
    with torch.no_grad():
        model.head.last_layer.weight.mul_(2)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model_folder(model, folder)
    assert snapshot(folder) == before and siblings(folder) == []


# --------------------------------------------------------------------------- push


def expected_commit(pictures: set[str] = frozenset()) -> set[str]:
    return MODEL_FILES | set(pictures)


def test_push_a_model_then_load_it_through_the_hub(hub_server, tmp_path):
    model = card_model()
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
    assert card.data.library_name == "protopool-hf" and card.data.tags[:4] == list(DEFAULT_TAGS)
    name, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    assert name == "protopool-tiny" and [(r.dataset_split, r.metric_value) for r in results] == [
        ("validation", 0.75),
        ("test", 0.5),
    ]
    assert f'from_pretrained("{REPO}", trust_remote_code=True)' in card.text


def test_a_fresh_process_without_protopool_hf_loads_the_pushed_repo(hub_server, tmp_path):
    model = card_model()
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
    folder = save_model_folder(card_model(), tmp_path / "out", training_args=TRAINING)
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
    assert "[5](prototypes/prototype_005.png)" in card.text and f"]({GALLERY})" in card.text
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


def test_push_carries_the_explorers_examples_and_nearest_patches_and_drops_them_once_gone(hub_server, tmp_path):
    folder = save_model_folder(card_model(), tmp_path / "out")
    write_pictures(folder)
    extras = {"examples/0_cardinal.png": png((200, 30, 30)), "prototypes/nearest/prototype_001_0.png": png((9, 9, 9))}
    for path, data in extras.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)
    push_to_hub(folder, REPO, dataset_name=DATASET)
    for path, data in extras.items():  # the Space of a pushed model offers the same examples and nearest patches
        assert hub_server.repos[REPO].read(path) == data, path
    (folder / "examples" / "0_cardinal.png").unlink()
    push_to_hub(folder, REPO, dataset_name=DATASET)
    files = set(list_repo_files(REPO))
    assert "examples/0_cardinal.png" not in files and "prototypes/nearest/prototype_001_0.png" in files


def test_a_repush_keeps_the_users_readme_and_drops_stale_pictures(hub_server, tmp_path):
    folder = save_model_folder(card_model(), tmp_path / "out")
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
    folder = save_model_folder(card_model(), tmp_path / "out")
    write_pictures(folder)
    push_to_hub(folder, REPO)
    repo = hub_server.repos[REPO]
    head, files = repo.branches["main"], list_repo_files(REPO)
    model = card_model()
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
    push_to_hub(card_model(), REPO)
    stage = hub._stage

    def stage_while_someone_else_commits(*args, **kwargs):
        HfApi().upload_file(path_or_fileobj=b"# theirs\n", path_in_repo="README.md", repo_id=REPO)
        return stage(*args, **kwargs)

    monkeypatch.setattr(hub, "_stage", stage_while_someone_else_commits)
    with pytest.raises(HfHubHTTPError, match="412"):
        push_to_hub(card_model(), REPO, metrics={"eval_accuracy": 0.3})
    assert hub_server.repos[REPO].read("README.md") == b"# theirs\n"  # their change is not overwritten


def test_push_to_another_branch(hub_server, monkeypatch):
    def create_branch(self, repo_id, *, branch, exist_ok=False, **kwargs):  # the test hub has no branch API
        repo = hub_server.repos[repo_id]
        repo.branches.setdefault(branch, repo.branches["main"])

    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    push_to_hub(card_model(), REPO, revision="dev", private=True)
    repo = hub_server.repos[REPO]
    assert repo.private and repo.branches["main"] == repo.commits[0].oid
    assert "README.md" in repo.resolve("dev").files


def test_a_resave_keeps_the_extra_sections_of_the_folders_card(tmp_path):
    folder = save_model_folder(card_model(), tmp_path / "out")
    report = "## Interpretability\n\nconsistency 0.8"
    card = render_model_card(card_model(), existing_card=folder / "README.md", extra_sections={"report": report})
    card.save(folder / "README.md")
    save_model_folder(card_model(), folder, metrics={"eval_accuracy": 0.5})
    assert report in (folder / "README.md").read_text()


# --------------------------------------------------------------------------- the interpretability report


def test_a_resave_of_the_same_model_keeps_the_report_and_new_weights_drop_it(tmp_path, caplog):
    model = card_model()
    folder = save_model_folder(model, tmp_path / "out", metrics=METRICS, dataset_name=DATASET)
    (folder / REPORT_FILENAME).write_text(json.dumps(REPORT))  # as protopool-hf evaluate writes it
    save_model_folder(model, folder)
    assert json.loads((folder / REPORT_FILENAME).read_text()) == REPORT
    card = ModelCard.load(folder / "README.md")
    assert "| background evidence | 0.25 |" in card.text
    types = [r.metric_type for r in card.data.eval_results]
    assert "interpretability/upsampled/test_top_slots.background_share" in types and types.count("accuracy") == 2

    with torch.no_grad():
        model.head.last_layer.weight.mul_(2)  # new weights: the report no longer describes them
    with caplog.at_level(logging.WARNING, logger="protopool_hf.hub"):
        save_model_folder(model, folder)
    assert "describes the previous weights" in caplog.text and siblings(folder) == []
    assert not (folder / REPORT_FILENAME).exists()
    card = ModelCard.load(folder / "README.md")
    assert "## Interpretability" not in card.text
    assert [r.metric_type for r in card.data.eval_results] == ["accuracy", "accuracy"]


def test_save_pretrained_replacing_keeps_the_report_of_unchanged_weights_only(tmp_path):
    model = card_model()
    folder = hub.save_pretrained_replacing(model, tmp_path / "out")
    (folder / REPORT_FILENAME).write_text(json.dumps(REPORT))
    hub.save_pretrained_replacing(model, folder)
    assert (folder / REPORT_FILENAME).is_file()
    model.config.id2label = {**CLASSES, 0: "northern cardinal"}  # another config.json: a report may depend on it
    hub.save_pretrained_replacing(model, folder)
    assert not (folder / REPORT_FILENAME).exists() and siblings(folder) == []


def test_push_carries_the_folders_report_and_a_model_push_removes_it(hub_server, tmp_path):
    folder = save_model_folder(card_model(), tmp_path / "out", metrics=METRICS, dataset_name=DATASET)
    (folder / REPORT_FILENAME).write_text(json.dumps(REPORT))  # evaluated after the save: its card lacks the section
    assert "## Interpretability" not in (folder / "README.md").read_text()

    push_to_hub(folder, REPO)
    repo = hub_server.repos[REPO]
    assert set(repo.commits[-1].added) == expected_commit() | {REPORT_FILENAME}
    assert json.loads(repo.read(REPORT_FILENAME)) == REPORT
    card = ModelCard.load(REPO)
    assert "## Interpretability" in card.text and "| deletion AUC | 0.3 |" in card.text
    _, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    shares = [r for r in results if r.metric_type == "interpretability/prototypes_used_share"]
    assert [(r.dataset_name, r.dataset_split, r.metric_value) for r in shares] == [(DATASET, "test", 5 / 6)]
    assert (folder / "README.md").read_text().count("## Interpretability") == 0  # the folder is not modified

    model = card_model()
    with torch.no_grad():
        model.head.last_layer.weight.mul_(2)
    push_to_hub(model, REPO)  # new weights without a report: the old report leaves the repo and the card
    assert REPORT_FILENAME in repo.commits[-1].deleted
    card = ModelCard.load(REPO)
    assert "## Interpretability" not in card.text
    assert not any(r.metric_type.startswith("interpretability/") for r in card.data.eval_results or [])
