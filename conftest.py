"""pytest set-up shared by the tests (tests/) and the docstring examples (protopool_hf/, collected as doctests)."""

import importlib.util
import os


# Everything runs offline (no Hub downloads; timm models are built with pretrained=False). Set before transformers and
# huggingface_hub are imported, since both read the environment once. `hub_endpoint` (tests/conftest.py) turns the Hub
# back on, for one test, against a loopback server.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# Modules whose docstring examples need an optional extra (pyproject.toml): collected only where it is installed, so
# `pytest` passes with the core install too. `make test` installs every extra, so there they all run.
OPTIONAL_MODULES = {
    "protopool_hf/export.py": ("onnx", "onnxscript", "onnxruntime"),  # extra `onnx`
    "protopool_hf/app.py": ("gradio",),  # extra `app`
}
collect_ignore = [
    path
    for path, modules in OPTIONAL_MODULES.items()
    if not all(importlib.util.find_spec(module) is not None for module in modules)
]
