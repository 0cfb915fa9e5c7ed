from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hub_server import HubServer


# tests/scripts holds protopool_tiny, the one definition of the suite's tiny model, which the subprocess scripts there
# import as a plain module; test files get it through the fixtures below (or import its Fashion-MNIST helpers).
sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import protopool_tiny


# ---- slow tests are opt-in: `pytest --run-slow` or RUN_SLOW=1 ----------------------------------------------------------
def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow") or os.environ.get("RUN_SLOW") == "1":
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --run-slow or RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


# ---- tiny_config / tiny_model: the suite's one tiny model (see tests/scripts/protopool_tiny.py) -----------------------
@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., protopool_tiny.ProtoPoolConfig]:
    """The builder of the tiny config: `tiny_config(**overrides)`, e.g. `tiny_config(num_labels=4, input_size=[3, 64, 64])`.

    Base: test_resnet, 3 classes, 6 prototypes, 2 slots per class, 8-dimensional prototypes (`protopool_tiny.TINY`).
    """
    return protopool_tiny.tiny_config


@pytest.fixture(scope="session")
def tiny_model() -> Callable[..., protopool_tiny.ProtoPoolForImageClassification]:
    """The builder of the tiny model: `tiny_model(seed=0, **config_overrides)`, initialised under `torch.manual_seed(seed)`
    and returned in training mode (call `.eval()` where a test needs it)."""
    return protopool_tiny.tiny_model


# ---- hub_endpoint / hub_server: a Hugging Face Hub on 127.0.0.1 (see tests/hub_server.py) ----------------------------
# Within a test that uses them, huggingface_hub and transformers are online and talk to that server only: token "dummy",
# Xet off (uploads take the git-LFS path), an empty HF_HOME / HF_HUB_CACHE under tmp_path. Everything is restored after
# the test, so the suite's HF_HUB_OFFLINE=1 still holds everywhere else. huggingface_hub reads its environment once, at
# import, so setting the variables is not enough in-process: the values it derived from them are patched too (the
# variables are also set, for subprocesses started by the test).


def _point_hf_at(endpoint: str, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _cache_manager, _http

    env = {"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}
    env |= {"HF_TOKEN": "dummy", "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub")}
    env |= {"HF_HUB_DISABLE_TELEMETRY": "1", "HF_MODULES_CACHE": str(home / "modules")}
    env |= {"NO_PROXY": ",".join(filter(None, ["127.0.0.1", os.environ.get("NO_PROXY")]))}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_ASSETS_CACHE", "HUGGINGFACE_HUB_CACHE", "no_proxy"):
        monkeypatch.delenv(name, raising=False)

    # Every constant derived from the endpoint or the cache folders at import time (URL templates, token path, ...).
    rebase = [
        (constants.HF_HUB_CACHE, str(home / "hub")),
        (constants.HF_ASSETS_CACHE, str(home / "assets")),
        (constants.HF_HOME, str(home)),
        (constants.ENDPOINT, endpoint),
    ]
    for name, value in list(vars(constants).items()):
        if name.startswith("_") or not name.isupper() or not isinstance(value, str):
            continue
        for old, new in rebase:
            if value == old or value.startswith((old + "/", old + os.sep)):
                monkeypatch.setattr(constants, name, new + value[len(old) :])
                break
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {"127.0.0.1"})
    monkeypatch.setattr(_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {_http._url_origin(endpoint)})
    monkeypatch.setattr(_cache_manager, "HF_HUB_CACHE", str(home / "hub"))
    # Objects that captured the endpoint when they were created: the module-level HfApi behind
    # `huggingface_hub.create_commit` & co, transformers' shared HfApi, HfFileSystem's instance cache.
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    if "transformers.utils.hub" in sys.modules:
        monkeypatch.setattr(sys.modules["transformers.utils.hub"], "_hf_api", None)
    _forget_clients()


def _forget_clients() -> None:
    from huggingface_hub.utils import close_session

    close_session()  # its connection pool (and proxy settings) belong to the previous endpoint
    if "huggingface_hub.hf_file_system" in sys.modules:
        sys.modules["huggingface_hub.hf_file_system"].HfFileSystem.clear_instance_cache()
    if "transformers.utils.hub" in sys.modules:  # may have been imported, and its HfApi created, during the test
        sys.modules["transformers.utils.hub"]._hf_api = None


@contextlib.contextmanager
def _loopback_hub(home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    server = HubServer().start()
    try:
        _point_hf_at(server.url, home, monkeypatch)
        yield server
    finally:
        server.stop()
        _forget_clients()


@pytest.fixture
def hub_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A fresh, empty Hub on 127.0.0.1 that huggingface_hub and transformers use for the duration of the test.

    Use it for assertions: `hub_server.repos["org/name"].commits[-1].added`, `.files`, `repo.read(path)`,
    `hub_server.log`, and `hub_server.fail_next_commit = True` to make the next commit fail.
    """
    with _loopback_hub(tmp_path / "hf_home", monkeypatch) as server:
        yield server


@pytest.fixture
def loopback_hub() -> Callable[[Path, pytest.MonkeyPatch], contextlib.AbstractContextManager[HubServer]]:
    """The context manager behind `hub_server` (`with loopback_hub(home, monkeypatch) as server:`), for the test of
    its own set-up and tear-down; the monkeypatch's undo restores what it changed."""
    return _loopback_hub


@pytest.fixture
def hub_endpoint(hub_server: HubServer) -> str:
    """The URL of the `hub_server` of this test (what HF_ENDPOINT is set to), e.g. "http://127.0.0.1:41235"."""
    return hub_server.url


# ---- end of hub_endpoint ---------------------------------------------------------------------------------------------


# ---- the projected photo model: explanation, maps, pictures and gallery tests share it (tests/photo_fixtures.py) ----
@pytest.fixture(scope="module")
def dataset():
    """The test photos as a `datasets.Dataset` (image, label); a test file may define its own `dataset` instead."""
    from photo_fixtures import photo_dataset

    return photo_dataset()


@pytest.fixture(scope="module")
def projected(dataset):
    """`photo_model()` with every used prototype's provenance set on `dataset` (a known source per prototype)."""
    from photo_fixtures import give_provenance, photo_model

    model = photo_model()
    give_provenance(model, dataset)
    return model


@pytest.fixture(scope="module")
def pictures(projected, dataset):
    """`render_prototypes(projected, dataset)`: every prototype's pictures, the four photos in one batch."""
    from protopool_hf.pictures import render_prototypes

    return render_prototypes(projected, dataset)
