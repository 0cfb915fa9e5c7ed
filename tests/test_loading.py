"""protopool_hf.loading: strict, safetensors-only loading that runs no pickled or foreign code.

A folder whose weights do not fit its config.json, that misses a tensor or is truncated, or holds only pickle-based
weights is refused with the folder, the tensors and the fix; the package's own code never unpickles unsafely; a saved
folder's code files never run; a model loads under `torch.no_grad` and `torch.inference_mode`.
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import pickle
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

import protopool_hf
from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification


@contextlib.contextmanager
def _transformers_warnings() -> Iterator[list[str]]:
    """The messages transformers logs meanwhile (its loggers do not propagate to the root logger)."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    library = logging.getLogger("transformers")
    library.addHandler(handler)
    try:
        yield messages
    finally:
        library.removeHandler(handler)


@pytest.fixture
def saved(tmp_path, tiny_model) -> tuple[ProtoPoolForImageClassification, Path]:
    """The tiny model (seed 0, eval mode) and the folder it was saved to."""
    model = tiny_model().eval()
    model.save_pretrained(tmp_path / "model")
    return model, tmp_path / "model"


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_weights_that_do_not_fit_the_config_are_refused(saved):
    """transformers 5 raises RuntimeError; the tensors and shapes are only in the load report it logs before."""
    _, folder = saved
    _edit_config(folder, num_prototypes=7)
    with _transformers_warnings() as messages, pytest.raises((RuntimeError, ValueError)) as error:
        AutoModelForImageClassification.from_pretrained(folder)
    seen = "\n".join([str(error.value), *messages])
    assert "head.prototypes" in seen and "6, 8" in seen and "7, 8" in seen


def test_weights_that_do_not_fit_the_config_name_the_tensor_and_shapes_in_the_error(saved):
    _, folder = saved
    _edit_config(folder, num_prototypes=7)
    with pytest.raises(ValueError, match=r"config\.json.*head\.prototypes: checkpoint \(6, 8\) vs config \(7, 8\)"):
        AutoModelForImageClassification.from_pretrained(folder)


def test_a_missing_tensor_is_refused_not_reinitialised(saved):
    _, folder = saved
    weights = load_file(folder / "model.safetensors")
    del weights["head.prototypes"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors \['head\.prototypes'\]"):
        AutoModelForImageClassification.from_pretrained(folder)


def test_a_truncated_safetensors_file_is_refused(saved):
    """What safetensors says today: the header is incomplete, without the file's name."""
    _, folder = saved
    _truncate(folder / "model.safetensors")
    with pytest.raises((SafetensorError, ValueError), match=r"incomplete metadata|truncated"):
        AutoModelForImageClassification.from_pretrained(folder)


def test_a_truncated_safetensors_file_names_the_folder_and_the_fix(saved):
    _, folder = saved
    _truncate(folder / "model.safetensors")
    with pytest.raises(ValueError, match=rf"{re.escape(str(folder))}.*truncated or corrupt.*again"):
        AutoModelForImageClassification.from_pretrained(folder)


class _Payload:
    """Unpickling this object creates a file: what a malicious checkpoint could do instead."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_pickle_payload_in_pytorch_model_bin_never_runs(saved, tmp_path):
    model, folder = saved
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "payload_ran"
    torch.save({**model.state_dict(), "payload": _Payload(marker)}, folder / "pytorch_model.bin")
    for loader in (ProtoPoolForImageClassification, AutoModelForImageClassification):
        for kwargs in ({}, {"use_safetensors": False}):
            with pytest.raises((pickle.UnpicklingError, OSError, ValueError)):
                loader.from_pretrained(folder, **kwargs)
    assert not marker.exists()


def test_a_folder_without_model_safetensors_is_refused(saved):
    """transformers 5 falls back to pytorch_model.bin (read with torch.load(weights_only=True)); we want safetensors."""
    model, folder = saved
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises((OSError, ValueError), match=r"model\.safetensors"):
        AutoModelForImageClassification.from_pretrained(folder)


def _unsafe_calls(source: str, filename: str) -> list[str]:
    """Calls that could unpickle arbitrary objects or run foreign code, as "file:line what", in line order."""
    problems: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "pickle", "dill", "joblib", "cloudpickle"):
            names = [alias.name for alias in node.names if "load" in alias.name or alias.name == "Unpickler"]
            problems += [(node.lineno, f"from {node.module} import {name}") for name in names]
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        flag = {k.arg: k.value.value for k in node.keywords if k.arg and isinstance(k.value, ast.Constant)}
        if name == "torch.load" and flag.get("weights_only") is not True:
            problems.append((node.lineno, "torch.load without weights_only=True"))
        if name.split(".")[0] in ("pickle", "dill", "joblib", "cloudpickle") and (
            "load" in name or "Unpickler" in name
        ):
            problems.append((node.lineno, name))
        for key, unsafe in (("trust_remote_code", True), ("weights_only", False), ("use_safetensors", False)):
            if key in flag and flag[key] is unsafe:
                problems.append((node.lineno, f"{name}({key}={unsafe})"))
        if flag.get("allow_pickle") is True:
            problems.append((node.lineno, f"{name}(allow_pickle=True)"))
    return [f"{filename}:{line} {what}" for line, what in sorted(problems)]


def test_the_package_never_unpickles_unsafely_or_trusts_remote_code():
    assert _unsafe_calls("import torch\ntorch.load(p)\nf(trust_remote_code=True)\nfrom pickle import loads", "x") == [
        "x:2 torch.load without weights_only=True",
        "x:3 f(trust_remote_code=True)",
        "x:4 from pickle import loads",
    ]
    package = Path(protopool_hf.__file__).parent
    problems = [p for file in sorted(package.glob("*.py")) for p in _unsafe_calls(file.read_text(), file.name)]
    assert problems == []


def test_a_saved_folder_loads_with_the_package_and_runs_none_of_its_code(saved, tmp_path):
    model, folder = saved
    marker = tmp_path / "folder_code_ran"
    for name in ("configuration_protopool.py", "modeling_protopool.py"):
        path = folder / name
        path.write_text(f"open({str(marker)!r}, 'w').close()\n{path.read_text()}")
    loaded = AutoModelForImageClassification.from_pretrained(folder).eval()  # no trust_remote_code
    assert (
        type(loaded) is ProtoPoolForImageClassification and type(AutoConfig.from_pretrained(folder)) is ProtoPoolConfig
    )
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    assert not marker.exists()

    # Without the package, the folder's code is the only way: transformers refuses it unless asked.
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["protopool_hf"] = None
        from transformers import AutoModelForImageClassification
        try:
            AutoModelForImageClassification.from_pretrained({str(folder)!r})
        except ValueError as error:
            print("REFUSED", "trust_remote_code=True" in str(error))
        """
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=300
    )
    assert "REFUSED True" in result.stdout, result.stderr[-3000:]
    assert not marker.exists()


def _load_and_compare(model: ProtoPoolForImageClassification, folder: Path) -> None:
    loaded = ProtoPoolForImageClassification.from_pretrained(folder).eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)


def test_a_model_loads_under_no_grad(saved):
    model, folder = saved
    with torch.no_grad():
        _load_and_compare(model, folder)


def test_a_model_loads_under_inference_mode(saved):
    model, folder = saved
    with torch.inference_mode():
        _load_and_compare(model, folder)


# --------------------------------------------------------------------------- what save_pretrained adds


def test_saved_folder_is_safetensors_with_code_auto_map_and_preprocessor(tiny_model, tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= files
    code = {"configuration_protopool.py", "modeling_protopool.py", "layers.py", "losses.py", "backbone.py"}
    assert code | {"gumbel.py", "loading.py", "preprocessing.py", "provenance.py", "torch_utils.py"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    config = json.loads((tmp_path / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForImageClassification"}
    assert config["input_size"] == [3, 160, 160] and config["image_mean"] == [0.5, 0.5, 0.5]
    assert isinstance(AutoModel.from_pretrained(tmp_path), ProtoPoolForImageClassification)


def test_remote_code_loads_in_a_fresh_process_without_the_package(tiny_model, tmp_path):
    model = tiny_model().eval()
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        np.save(tmp_path / "expected.npy", model(x).logits.numpy())
    np.save(tmp_path / "x.npy", x.numpy())
    model.save_pretrained(tmp_path / "model")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["protopool_hf"] = None  # the package is not importable in this process
        import numpy as np, torch
        from transformers import AutoModel, AutoModelForImageClassification
        try:
            import protopool_hf
        except ImportError:
            pass
        else:
            raise SystemExit("protopool_hf should not be importable here")
        folder = r"{tmp_path / "model"}"
        x = torch.from_numpy(np.load(r"{tmp_path / "x.npy"}"))
        expected = np.load(r"{tmp_path / "expected.npy"}")
        for auto in (AutoModelForImageClassification, AutoModel):
            model = auto.from_pretrained(folder, trust_remote_code=True).eval()
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            with torch.no_grad():
                np.testing.assert_allclose(model(x).logits.numpy(), expected, atol=1e-6)
        print("REMOTE-OK")
        """
    )
    env_home = tmp_path / "hf"
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(env_home), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        timeout=300,
    )
    assert "REMOTE-OK" in result.stdout, result.stderr[-3000:]
