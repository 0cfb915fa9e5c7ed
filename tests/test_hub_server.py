"""The loopback Hub of tests/hub_server.py, driven by plain huggingface_hub and transformers (no protopool code)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    ModelCard,
    constants,
    hf_hub_download,
    list_repo_files,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session
from PIL import Image


REPO = "org/demo"
README = """---
library_name: demo-lib
license: apache-2.0
pipeline_tag: image-classification
tags:
- demo
model-index:
- name: demo
  results:
  - task:
      type: image-classification
    dataset:
      name: Demo birds
      type: demo/birds
    metrics:
    - type: accuracy
      value: 0.5
---
# Demo

![prototype](prototypes/a.png)
"""


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 3), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


FILES = {
    "README.md": README.encode(),
    "notes.txt": b"a small text file\n",
    "big.txt": b"0123456789abcdef\n" * 120,  # 2040 bytes of text: LFS only above the server's lfs_threshold
    "weights.dat": bytes(range(256)) * 20,  # binary (NUL bytes): LFS whatever its size
    "prototypes/a.png": _png(),
}


def _push(files: dict[str, bytes], message: str = "push", deletions: tuple[str, ...] = ()) -> str:
    operations = [CommitOperationAdd(path, content) for path, content in files.items()]
    operations += [CommitOperationDelete(path) for path in deletions]
    return HfApi().create_commit(REPO, operations, commit_message=message).oid


def test_environment_points_at_the_loopback_hub(hub_endpoint, tmp_path):
    assert hub_endpoint.startswith("http://127.0.0.1:")
    assert constants.ENDPOINT == os.environ["HF_ENDPOINT"] == hub_endpoint
    assert constants.HUGGINGFACE_CO_URL_TEMPLATE.startswith(hub_endpoint + "/")
    assert not constants.is_offline_mode()
    assert constants.HF_HUB_DISABLE_XET
    assert Path(constants.HF_HUB_CACHE).is_relative_to(tmp_path)
    assert Path(constants.HF_TOKEN_PATH).is_relative_to(tmp_path)
    assert HfApi().endpoint == hub_endpoint
    assert HfApi().whoami()["name"] == "user"


def test_push_then_pull(hub_server, hub_endpoint, tmp_path):
    hub_server.lfs_threshold = 1024
    url = HfApi().create_repo(REPO)
    assert url == f"{hub_endpoint}/{REPO}"
    HfApi().create_repo(REPO, exist_ok=True)
    with pytest.raises(HfHubHTTPError, match="409"):
        HfApi().create_repo(REPO)

    oid = _push(FILES, message="add the demo files")

    repo = hub_server.repos[REPO]
    assert [commit.title for commit in repo.commits] == ["initial commit", "add the demo files"]
    assert repo.commits[-1].oid == oid
    assert set(repo.commits[-1].added) == set(FILES)
    assert set(repo.commits[-1].files) == {*FILES, ".gitattributes"}
    lfs_paths = {path for path, file in repo.commits[-1].files.items() if file.lfs}
    assert lfs_paths == {"big.txt", "weights.dat", "prototypes/a.png"}
    assert all(repo.read(path) == content for path, content in FILES.items())
    # the binary files travelled through the git-LFS batch API and PUTs to the upload URLs, not inside the commit
    assert hub_server.log.count(f"POST /{REPO}.git/info/lfs/objects/batch") == 1
    assert sum(line.startswith(f"PUT /lfs-upload/{REPO}/") for line in hub_server.log) == 3

    for path, content in FILES.items():
        local = hf_hub_download(REPO, path)
        assert Path(local).read_bytes() == content
        assert Path(local).is_relative_to(tmp_path)
    assert Path(hf_hub_download(REPO, "weights.dat", revision=oid)).read_bytes() == FILES["weights.dat"]

    snapshot = Path(snapshot_download(REPO))
    downloaded = {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()}
    assert downloaded == set(repo.commits[-1].files)
    pictures = Path(snapshot_download(REPO, allow_patterns="prototypes/*", local_dir=tmp_path / "pictures"))
    assert (pictures / "prototypes" / "a.png").read_bytes() == FILES["prototypes/a.png"]
    assert not (pictures / "weights.dat").exists()

    assert list_repo_files(REPO) == sorted({*FILES, ".gitattributes"})
    top_level = ["prototypes", ".gitattributes", "README.md", "big.txt", "notes.txt", "weights.dat"]
    assert [entry.path for entry in HfApi().list_repo_tree(REPO)] == top_level
    assert [entry.path for entry in HfApi().list_repo_tree(REPO, "prototypes")] == ["prototypes/a.png"]
    assert [commit.title for commit in HfApi().list_repo_commits(REPO)] == ["add the demo files", "initial commit"]

    info = HfApi().model_info(REPO, files_metadata=True)
    assert info.sha == oid
    assert (info.pipeline_tag, info.library_name, info.tags) == ("image-classification", "demo-lib", ["demo"])
    sizes = {item.rfilename: (item.size, item.lfs.sha256 if item.lfs else None) for item in info.siblings}
    assert sizes["weights.dat"] == (5120, repo.commits[-1].files["weights.dat"].sha256)
    assert sizes["notes.txt"] == (len(FILES["notes.txt"]), None)

    card = ModelCard.load(REPO)
    assert card.data.library_name == "demo-lib"
    assert card.data.license == "apache-2.0"
    [result] = card.data.eval_results
    assert (result.dataset_type, result.metric_type, result.metric_value) == ("demo/birds", "accuracy", 0.5)
    assert "![prototype](prototypes/a.png)" in card.text


def test_later_commits_carry_only_what_changed(hub_server):
    HfApi().create_repo(REPO)
    _push(FILES)
    changed = {path: FILES[path] for path in ("README.md", "big.txt", "prototypes/a.png")}
    changed |= {"notes.txt": b"changed\n", "prototypes/b.png": _png()[:-1] + b"\0"}
    _push(changed, message="second", deletions=("weights.dat",))

    commit = hub_server.repos[REPO].commits[-1]
    assert commit.title == "second"
    assert set(commit.added) == {"notes.txt", "prototypes/b.png"}  # the client leaves unchanged files out
    assert commit.deleted == ["weights.dat"]
    assert "weights.dat" not in list_repo_files(REPO)
    assert Path(hf_hub_download(REPO, "notes.txt")).read_bytes() == b"changed\n"


def test_failed_pushes_leave_the_previous_revision(hub_server):
    HfApi().create_repo(REPO)
    before = _push(FILES)
    new_files = {"weights.dat": b"\0\1" * 1500, "notes.txt": b"new\n"}

    hub_server.fail_next_commit = True
    with pytest.raises(HfHubHTTPError, match="simulated failure of a commit"):
        _push(new_files, deletions=("README.md",))
    hub_server.fail_next_lfs_upload = True
    with pytest.raises(RuntimeError, match=r"Error while uploading 'weights\.dat'") as error:
        _push({"weights.dat": b"\0\2" * 1500})
    assert "simulated failure of an LFS upload" in str(error.value.__cause__)

    repo = hub_server.repos[REPO]
    assert len(repo.commits) == 2
    assert repo.branches["main"] == before
    assert HfApi().model_info(REPO).sha == before
    assert Path(hf_hub_download(REPO, "weights.dat")).read_bytes() == FILES["weights.dat"]
    assert list_repo_files(REPO) == sorted({*FILES, ".gitattributes"})


def test_a_commit_naming_a_missing_lfs_object_is_rejected_whole(hub_server, hub_endpoint):
    HfApi().create_repo(REPO)
    before = _push(FILES)
    lines = [
        '{"key": "header", "value": {"summary": "bad"}}',
        '{"key": "file", "value": {"path": "ok.txt", "content": "b2sK", "encoding": "base64"}}',
        '{"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": "' + "0" * 64 + '", "size": 3}}',
    ]
    response = get_session().post(
        f"{hub_endpoint}/api/models/{REPO}/commit/main",
        content="\n".join(lines).encode(),
        headers={"Authorization": "Bearer dummy", "Content-Type": "application/x-ndjson"},
    )
    assert response.status_code == 400
    assert "was never uploaded" in response.json()["error"]
    assert hub_server.repos[REPO].branches["main"] == before
    assert "ok.txt" not in list_repo_files(REPO)


def test_missing_things_raise_the_client_errors(hub_endpoint):
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/missing", "config.json")
    HfApi().create_repo(REPO)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "config.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, ".gitattributes", revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info("org/missing")
    assert get_session().post(f"{hub_endpoint}/api/repos/create", json={"name": "x"}).status_code == 401


def test_a_readme_with_broken_metadata_is_refused_before_upload(hub_server):
    HfApi().create_repo(REPO)
    with pytest.raises(ValueError, match=r"Invalid metadata in README\.md"):
        _push({"README.md": b"---\nlicense: [apache\n---\n# Demo\n", "weights.dat": FILES["weights.dat"]})
    assert not any("lfs" in line for line in hub_server.log)  # validated before anything was uploaded
    assert len(hub_server.repos[REPO].commits) == 1


def test_transformers_loads_a_pushed_model(hub_server, tmp_path):
    from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification

    config = ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, image_size=16, patch_size=8
    )
    torch.manual_seed(0)
    model = ViTForImageClassification(config).eval()
    model.save_pretrained(tmp_path / "saved")
    HfApi().create_repo(REPO)
    folder = tmp_path / "saved"
    operations = [CommitOperationAdd(p.relative_to(folder).as_posix(), p) for p in folder.rglob("*") if p.is_file()]
    HfApi().create_commit(REPO, operations, commit_message="tiny vit")
    assert set(hub_server.repos[REPO].commits[-1].added) == {"config.json", "model.safetensors"}
    assert hub_server.repos[REPO].commits[-1].files["model.safetensors"].lfs

    loaded = AutoModelForImageClassification.from_pretrained(REPO).eval()
    assert type(loaded) is ViTForImageClassification
    expected, actual = model.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).logits, model(pixels).logits, rtol=0, atol=0)


def hub_settings() -> dict[str, object]:
    """Everything the loopback fixture changes that later code reads: variables, derived constants, API clients."""
    from huggingface_hub import hf_api
    from transformers.utils.hub import hf_api as transformers_hf_api

    names = ("HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_TOKEN", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_DISABLE_XET")
    return {
        **{f"env {name}": os.environ.get(name) for name in names},
        **{name: getattr(constants, name) for name in ("ENDPOINT", "HUGGINGFACE_CO_URL_TEMPLATE", "HF_HUB_CACHE")},
        "HF_HUB_OFFLINE": constants.HF_HUB_OFFLINE,
        "HfApi()": HfApi().endpoint,
        "hf_api.api": hf_api.api.endpoint,
        "transformers hf_api()": transformers_hf_api().endpoint,
    }


def test_settings_are_restored_after_the_fixture(loopback_hub, tmp_path):
    before = hub_settings()
    with pytest.MonkeyPatch.context() as monkeypatch, loopback_hub(tmp_path / "hf_home", monkeypatch) as server:
        during = hub_settings()
        assert before["ENDPOINT"] != server.url
        assert during["ENDPOINT"] == during["HfApi()"] == during["transformers hf_api()"] == server.url
        assert during["hf_api.api"] == during["env HF_ENDPOINT"] == server.url
        assert during["HUGGINGFACE_CO_URL_TEMPLATE"].startswith(server.url)
        assert during["HF_HUB_OFFLINE"] is False and during["env HF_HUB_CACHE"] == str(tmp_path / "hf_home" / "hub")
    assert hub_settings() == before
    # And the suite's own settings hold: offline, the default endpoint, the clients agree with the variables.
    assert os.environ.get("HF_ENDPOINT", constants._HF_DEFAULT_ENDPOINT).rstrip("/") == constants.ENDPOINT
    assert (os.environ.get("HF_HUB_OFFLINE", "").upper() in constants.ENV_VARS_TRUE_VALUES) == constants.HF_HUB_OFFLINE
