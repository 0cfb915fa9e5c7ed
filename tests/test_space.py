"""`protopool-hf space`: the Space folder (app.py, requirements.txt, README.md) and its app running the explorer."""

import json
import runpy
from importlib.metadata import version

import pytest
from photo_fixtures import NAMES, PHOTOS, unprojected_folder

from protopool_hf.cli import main
from protopool_hf.space import MODEL_ENV, write_space


REPO = "org/protopool-tiny"


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny model folder whose config says an older protopool-hf wrote it."""
    folder = unprojected_folder(tmp_path_factory.mktemp("space") / "model")
    config = json.loads((folder / "config.json").read_text())
    config["protopool_version"] = "0.0.7"
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_space_folder_has_the_gradio_header_and_the_model_version(tmp_path, model_folder, capsys):
    from huggingface_hub import SpaceCard

    out = tmp_path / "space"
    assert main(["space", str(model_folder), str(out), "--repo-id", REPO]) == 0
    assert "Space folder written" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "app.py", "requirements.txt"]
    data = SpaceCard.load(out / "README.md").data
    assert (data.sdk, data.app_file, data.models) == ("gradio", "app.py", [REPO])
    assert data.sdk_version == version("gradio")
    assert tuple(int(v) for v in data.python_version.split(".")) >= (3, 11)  # protopool-hf's requires-python
    assert len(data.short_description) <= 60  # the Hub's limit
    assert (out / "requirements.txt").read_text() == "protopool-hf[app]==0.0.7\n"
    assert f'"{REPO}"' in (out / "app.py").read_text()


def test_space_refuses_an_existing_folder_unless_overwrite_and_keeps_other_files(tmp_path, model_folder, capsys):
    out = tmp_path / "space"
    (out / ".git").mkdir(parents=True)
    (out / "app.py").write_text("old\n")
    assert main(["space", str(model_folder), str(out), "--repo-id", REPO]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists: pass --overwrite" in err
    assert (out / "app.py").read_text() == "old\n"
    assert main(["space", str(model_folder), str(out), "--repo-id", REPO, "--overwrite"]) == 0
    assert (out / ".git").is_dir() and "build_app" in (out / "app.py").read_text()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary files left behind


def test_a_local_folder_needs_the_repo_id_the_space_loads(tmp_path, model_folder, capsys):
    assert main(["space", str(model_folder), str(tmp_path / "space")]) == 2
    err = capsys.readouterr().err
    assert "is a local folder: pass --repo-id" in err
    assert not (tmp_path / "space").exists()


def test_a_repo_id_reads_the_version_from_the_hub(hub_server, tmp_path, model_folder):
    from huggingface_hub import HfApi

    HfApi().create_repo(REPO)
    HfApi().upload_folder(repo_id=REPO, folder_path=str(model_folder))
    out = write_space(REPO, tmp_path / "space")
    assert (out / "requirements.txt").read_text() == "protopool-hf[app]==0.0.7\n"


def test_the_space_app_runs_the_explorer_on_a_local_folder(tmp_path, model_folder, monkeypatch):
    gradio = pytest.importorskip("gradio", reason="the Space's app needs the app extra")
    client_module = pytest.importorskip("gradio_client", reason="calling the Space's app needs gradio_client")
    out = write_space(model_folder, tmp_path / "space", repo_id=REPO)
    monkeypatch.setenv(MODEL_ENV, str(model_folder))
    namespace = runpy.run_path(str(out / "app.py"))  # as `python app.py` does, without its launch()
    demo = namespace["demo"]
    assert isinstance(demo, gradio.Blocks) and namespace["MODEL"] == str(model_folder)
    demo.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    try:
        client = client_module.Client(demo.local_url, verbose=False)
        probabilities, _ = client.predict(client_module.handle_file(str(PHOTOS[3])), api_name="/explain")
        assert set(probabilities) == set(NAMES)
    finally:
        demo.close()


@pytest.mark.slow
def test_python_app_py_serves_the_explorer(tmp_path, model_folder):
    """What the Space runs: `python app.py`, on the port gradio reads from the environment (as Spaces set it)."""
    import os
    import socket
    import subprocess
    import sys
    import time

    client_module = pytest.importorskip("gradio_client", reason="calling the Space's app needs gradio_client")
    out = write_space(model_folder, tmp_path / "space", repo_id=REPO)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, MODEL_ENV: str(model_folder), "GRADIO_SERVER_PORT": str(port)}
    env |= {"GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_ANALYTICS_ENABLED": "False"}
    process = subprocess.Popen(
        [sys.executable, "app.py"], cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                client = client_module.Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:
                assert process.poll() is None, process.stdout.read()
                assert time.monotonic() < deadline, "app.py did not serve within 120 s"
                time.sleep(1)
        probabilities, _ = client.predict(client_module.handle_file(str(PHOTOS[0])), api_name="/explain")
        assert set(probabilities) == set(NAMES)
    finally:
        process.terminate()
        process.wait(timeout=30)
