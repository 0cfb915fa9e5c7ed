"""The explorer app: the /explain API through gradio_client, bad uploads, the tabs' contents, Hub repos, the CLI."""

import contextlib
import io
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import pytest


gr = pytest.importorskip("gradio", reason="the explorer needs the app extra: pip install 'protopool-hf[app]'")
gradio_client = pytest.importorskip("gradio_client", reason="the /explain test needs gradio_client (dev extra)")

from photo_fixtures import NAMES, PHOTOS, REPORT, projected_folder, unprojected_folder  # noqa: E402

from protopool_hf.app import build_app  # noqa: E402
from protopool_hf.cli import main  # noqa: E402
from protopool_hf.explanation import explain  # noqa: E402
from protopool_hf.explorer import BadImageError, Explorer, read_upload  # noqa: E402


@dataclass
class Served:
    url: str
    folder: Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return projected_folder(tmp_path_factory.mktemp("explorer") / "model")


@pytest.fixture(scope="module")
def raw_folder(tmp_path_factory) -> Path:
    return unprojected_folder(tmp_path_factory.mktemp("explorer") / "raw")


@contextlib.contextmanager
def serving(folder: Path) -> Iterator[Served]:
    """The explorer of a model folder, served on 127.0.0.1 until the block ends."""
    app = build_app(folder)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield Served(f"http://127.0.0.1:{port}/", folder)
    finally:
        app.close()


@pytest.fixture(scope="module")
def served(folder):
    """The explorer of the projected tiny model, served on 127.0.0.1."""
    with serving(folder) as server:
        yield server


@pytest.fixture(scope="module")
def client(served):
    return gradio_client.Client(served.url, verbose=False)


def bad_uploads(tmp_path: Path) -> dict[str, Path]:
    """A text file named like an image, a truncated PNG and a 1×1 PNG."""
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    buffer = io.BytesIO()
    PIL.Image.open(PHOTOS[0]).convert("RGB").save(buffer, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    tiny = tmp_path / "dot.png"
    PIL.Image.new("RGB", (1, 1), "red").save(tiny)
    return {"not an image": text, "truncated": truncated, "1x1": tiny}


# ---------------------------------------------------------------------------- import cost
def test_importing_the_package_and_its_cli_never_imports_gradio():
    code = "import sys, protopool_hf, protopool_hf.cli, protopool_hf.space\nprint('gradio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


# ---------------------------------------------------------------------------- the API
def test_explain_endpoint_returns_the_probabilities_and_the_picture(client, folder):
    probabilities, picture_path = client.predict(gradio_client.handle_file(str(PHOTOS[0])), api_name="/explain")
    assert list(probabilities) == sorted(probabilities, key=probabilities.get, reverse=True)
    assert set(probabilities) == set(NAMES)
    explorer = Explorer.load(folder)
    expected = explain(explorer.model, read_upload(PHOTOS[0]), top_k=5)
    for c, name in enumerate(NAMES):  # the same code path on the same image: float32 softmax, rounded alike
        assert probabilities[name] == pytest.approx(float(expected.probabilities[c]), abs=1e-6)
    with PIL.Image.open(picture_path) as picture:
        assert picture.size == expected.render(prototype_images=folder / "prototypes").size
        assert np.asarray(picture.convert("L")).std() > 10  # a drawing, not a blank


def test_the_api_lists_one_explain_endpoint_taking_an_image(client):
    info = client.view_api(print_info=False, return_format="dict")
    endpoint = info["named_endpoints"]["/explain"]
    assert [p["component"] for p in endpoint["parameters"]] == ["Image"]
    assert [r["component"] for r in endpoint["returns"]] == ["Json", "Image"]
    assert list(info["named_endpoints"]) == ["/explain"]  # the page's own events stay private
    import protopool_hf.app

    assert not Path(protopool_hf.app.__file__).with_suffix(".pyi").exists()  # gradio writes one for component classes


def test_the_api_picture_lists_five_classes_and_the_probabilities_all(tmp_path, tiny_model):
    many = tiny_model(num_labels=12, num_prototypes=14, num_slots_per_class=1, input_size=[3, 64, 64])
    many.save_pretrained(tmp_path / "many")
    app = build_app(tmp_path / "many")
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        probabilities, picture_path = client.predict(gradio_client.handle_file(str(PHOTOS[0])), api_name="/explain")
    finally:
        app.close()
    assert len(probabilities) == 12
    model = Explorer.load(tmp_path / "many").model
    five = explain(model, read_upload(PHOTOS[0]), top_k=5).render()
    with PIL.Image.open(picture_path) as picture:
        assert picture.size == five.size  # the header lists 5 classes, not 12


@pytest.mark.parametrize("kind", ["not an image", "truncated", "1x1"])
def test_a_bad_upload_is_a_message_and_the_app_keeps_running(client, tmp_path, kind):
    path = bad_uploads(tmp_path)[kind]
    with pytest.raises(gradio_client.exceptions.AppError) as error:
        client.predict(gradio_client.handle_file(str(path)), api_name="/explain")
    message = str(error.value)
    assert path.name in message and "Upload" in message
    assert "/tmp/gradio" not in message  # names the user's file, not the server's copy
    probabilities, _ = client.predict(gradio_client.handle_file(str(PHOTOS[1])), api_name="/explain")
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-5)


def test_read_upload_refuses_what_cannot_be_explained(tmp_path):
    for kind, path in bad_uploads(tmp_path).items():
        with pytest.raises(BadImageError, match=rf"{path.name}.*Upload"):
            read_upload(path)
        assert kind
    assert read_upload(PHOTOS[0]).mode == "RGB"


# ---------------------------------------------------------------------------- what the tabs show
def test_another_class_explains_why_not(folder):
    explorer = Explorer.load(folder)
    image = read_upload(PHOTOS[0])
    predicted = explorer.explain(image).explanation.predicted_class
    other = (predicted + 1) % len(NAMES)
    result = explorer.explain(image, class_id=other, top_k=2)
    assert result.explanation.class_id == other
    assert result.summary.startswith(f"**Why not {NAMES[other]}?**")
    total = sum(row.contribution for row in result.rows)
    assert total == pytest.approx(result.explanation.logit, abs=1e-4 * max(1.0, abs(result.explanation.logit)))


def test_a_never_projected_model_is_served_with_a_note_for_the_source_patches(raw_folder, tmp_path):
    explorer = Explorer.load(raw_folder)
    assert not explorer.projected
    result = explorer.explain(read_upload(PHOTOS[0]))
    pictures = explorer._prototype_pictures(result.explanation)
    assert all(isinstance(p, PIL.Image.Image) for p in pictures.values())  # the note, drawn in place of the patches
    assert result.picture.size[0] > 0
    config = build_app(raw_folder).config
    notes = [c["props"].get("value", "") for c in config["components"] if c["props"].get("elem_id") == "not-projected"]
    assert notes and "never projected" in notes[0]


def test_the_prototypes_tab_shows_source_uses_and_nearest_patches(folder):
    from protopool_hf.app import _prototype_detail

    explorer = Explorer.load(folder)
    first = explorer.slots[0][0]  # the fixture wrote nearest patches for class 0's prototypes
    picture, text, patches = _prototype_detail(explorer, first)
    # Images, not paths: gradio refuses to serve a returned path outside cwd, the temp dir and its static paths, and a
    # Hub snapshot's files are symlinks into the cache's blobs.
    source = PIL.Image.open(folder / "prototypes" / f"prototype_{first:03d}_source.png").convert("RGB")
    assert np.array_equal(np.asarray(picture), np.asarray(source))
    assert "Projected onto image" in text and f"| {NAMES[0]} | 0 |" in text
    nearest = PIL.Image.open(folder / "prototypes" / "nearest" / f"prototype_{first:03d}_1.png").convert("RGB")
    assert len(patches) == 2 and np.array_equal(np.asarray(patches[0][0]), np.asarray(nearest))
    unused = next((p for p in range(8) if not explorer.prototype_uses(p)), None)
    if unused is not None:
        assert "No class slot uses this prototype." in _prototype_detail(explorer, unused)[1]


def test_the_classes_tab_lists_every_slot(folder):
    from protopool_hf.app import _class_detail

    explorer = Explorer.load(folder)
    tiles, text = _class_detail(explorer, 2)
    assert text.count("\n| ") == 2 + 1  # the heading row and the class's 2 slots
    assert [caption.split(":")[0] for _, caption in tiles] == ["slot 0", "slot 1"]


def test_the_report_tab_shows_the_report_and_metrics_or_says_how_to_compute_them(folder, raw_folder):
    def report_text(path: Path) -> str:
        config = build_app(path).config
        return next(c["props"]["value"] for c in config["components"] if c["props"].get("elem_id") == "report")

    text = report_text(folder)
    assert "| localisations.upsampled.deletion_gain | 0.125 |" in text
    assert "| test_accuracy | 0.75 |" in text  # the Trainer's all_results.json
    assert json.loads((folder / "interpretability.json").read_text()) == REPORT
    assert "protopool-hf evaluate" in report_text(raw_folder)


def test_a_model_object_finds_the_folder_it_was_loaded_from(folder):
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(folder).train()
    explorer = Explorer.load(model)
    assert explorer.folder == folder and explorer.picture(explorer.slots[0][0]) is not None
    explorer.explain(read_upload(PHOTOS[0]))
    assert model.training  # the user's model is left in its own mode


def test_a_hub_repo_id_is_downloaded_with_its_pictures(hub_server, folder):
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo("org/tiny-explorer")
    api.upload_folder(repo_id="org/tiny-explorer", folder_path=str(folder))
    explorer = Explorer.load("org/tiny-explorer")
    assert explorer.projected and explorer.name == "org/tiny-explorer"
    assert [p.name for p in explorer.examples] == sorted(p.name for p in (folder / "examples").iterdir())
    assert explorer.picture(explorer.slots[0][0]) is not None


# ---------------------------------------------------------------------------- the command line
def test_app_command_refuses_a_file_as_model(tmp_path, capsys):
    image = tmp_path / "photo.png"
    PIL.Image.new("RGB", (20, 20)).save(image)
    assert main(["app", str(image)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file, not a model folder" in err


def test_app_command_without_gradio_says_which_extra_to_install(raw_folder, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if gradio were not installed
    monkeypatch.delitem(sys.modules, "protopool_hf.app")
    assert main(["app", str(raw_folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs gradio: pip install 'protopool-hf[app]'" in err


@pytest.mark.slow
def test_app_command_serves_the_explorer(folder):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "protopool_hf.cli", "app", str(folder), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:
                assert process.poll() is None, process.stdout.read()
                assert time.monotonic() < deadline, "the app did not start within 120 s"
                time.sleep(1)
        probabilities, _ = client.predict(gradio_client.handle_file(str(PHOTOS[2])), api_name="/explain")
        assert set(probabilities) == set(NAMES)
    finally:
        process.terminate()
        process.wait(timeout=30)


# ---------------------------------------------------------------------------- a real browser
# Headless Chromium (Debian's `chromium` and `chromium-driver`, driven by selenium) uploads an image, waits for the
# explanation, checks the picture and the class list, visits every tab and saves screenshots: into a temporary folder,
# or into $PROTOPOOL_APP_SCREENSHOTS (docs/images/app for the docs page). $PROTOPOOL_APP_MODEL serves another model folder
# in the browser (the docs' screenshots come from the demo's: after `make demo` and `protopool-hf evaluate`,
# PROTOPOOL_APP_MODEL=demo-output/model PROTOPOOL_APP_SCREENSHOTS=docs/images/app pytest tests/test_app.py -k browser).
SCREENSHOTS_ENV = "PROTOPOOL_APP_SCREENSHOTS"
MODEL_ENV = "PROTOPOOL_APP_MODEL"


@pytest.fixture(scope="module")
def browsed(served):
    """What the browser test drives: the tiny model's explorer, or the one of the folder $PROTOPOOL_APP_MODEL names."""
    import os

    if not os.environ.get(MODEL_ENV):
        yield served
        return
    with serving(Path(os.environ[MODEL_ENV])) as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (dev extra)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip(
            "no Chromium: install Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1700"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=webdriver.ChromeService(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_page_in_a_browser(browser, browsed, tmp_path):
    served = browsed
    import os

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    shots = Path(os.environ.get(SCREENSHOTS_ENV) or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    wait = WebDriverWait(browser, 60)

    def text_of(selector: str) -> str:
        return browser.find_element(By.CSS_SELECTOR, selector).text

    def upload(path: Path) -> None:
        field = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "input[type=file]")))
        field.send_keys(str(path))

    def clear_image() -> None:  # a script click: the error toast may lie over the button
        for button in browser.find_elements(
            By.CSS_SELECTOR, "#image button[aria-label='Remove Image'], #image button[aria-label='Clear']"
        ):
            browser.execute_script("arguments[0].click()", button)

    def open_tab(name: str) -> None:
        tab = browser.find_element(By.XPATH, f"//button[@role='tab' and normalize-space()='{name}']")
        tab.click()

    browser.get(served.url)
    upload(PHOTOS[0])
    wait.until(lambda _: browser.find_elements(By.CSS_SELECTOR, "#explanation img"))
    names = Explorer.load(served.folder).labels
    wait.until(lambda _: sum(name in text_of("#top-classes") for name in names) >= 2)
    assert "Why" in text_of("#summary") and "Logit" in text_of("#summary")
    picture = browser.find_element(By.CSS_SELECTOR, "#explanation img")
    assert picture.size["width"] > 100 and picture.size["height"] > 100
    browser.save_screenshot(str(shots / "explain.png"))

    open_tab("Prototypes")
    wait.until(lambda _: "Projected onto image" in text_of("#prototype-details"))
    thumbnails = browser.find_elements(By.CSS_SELECTOR, "#prototype-gallery img")
    assert len(thumbnails) >= 2, "the prototype gallery shows no pictures"
    thumbnails[1].click()  # selecting a prototype shows its details
    explorer = Explorer.load(served.folder)
    second = [p for p in sorted({p for row in explorer.slots for p in row}) if explorer.picture(p)][1]
    wait.until(lambda _: f"Prototype {second}" in text_of("#prototype-details"))
    browser.save_screenshot(str(shots / "prototypes.png"))

    open_tab("Classes")
    wait.until(lambda _: "slot" in text_of("#class-details"))
    browser.save_screenshot(str(shots / "classes.png"))

    open_tab("Report")
    wait.until(lambda _: "deletion_gain" in text_of("#report"))
    browser.save_screenshot(str(shots / "report.png"))
    open_tab("Explain")
    # A bad upload: a message in the page, and the page still explains the next image, and the examples.
    clear_image()
    wait.until(lambda _: text_of("#summary") == "")
    upload(bad_uploads(tmp_path)["not an image"])
    wait.until(lambda _: "Cannot read 'notes.png' as an image" in browser.find_element(By.TAG_NAME, "body").text)
    browser.save_screenshot(str(tmp_path / "bad-upload.png"))
    clear_image()
    upload(PHOTOS[1])
    wait.until(lambda _: "Why" in text_of("#summary"))
    clear_image()
    wait.until(lambda _: text_of("#summary") == "")
    browser.find_elements(By.CSS_SELECTOR, "#examples img")[0].click()
    wait.until(lambda _: "Why" in text_of("#summary"))

    for name in ("explain", "prototypes", "classes", "report"):  # pictures, not blank pages
        with PIL.Image.open(shots / f"{name}.png") as shot:
            assert shot.size[0] >= 1000 and np.asarray(shot.convert("L")).std() > 5
