"""A Hugging Face Space folder that runs the explorer (`protopool_hf.app`) on a model of the Hub, by repo id.

`write_space(model, out_dir, repo_id=...)` writes three files:

- `app.py`: builds the explorer on the repo id (`PROTOPOOL_MODEL=path` points it at a local folder instead) and
  launches it; Spaces run `python app.py`;
- `requirements.txt`: `protopool-hf[app]` at the version that wrote the model (`config.protopool_version`);
- `README.md`: the Space's card, whose YAML header says `sdk: gradio`, `sdk_version`, `app_file: app.py`,
  `python_version` and links the model (`models: [repo id]`).

Push the folder as a Space (`hf upload my-org/protopool-explorer OUT_DIR . --repo-type space`) and it serves the
explorer. Writing the folder needs neither torch nor gradio.
"""

import json
import os
import shutil
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from .cli_messages import check_model_source, model_load_error


__all__ = ["MODEL_ENV", "space_files", "write_space"]

MODEL_ENV = "PROTOPOOL_MODEL"

_APP = '''"""The ProtoPool explorer of {repo_id}: why the model decided, "this looks like that".

A Hugging Face Space written by `protopool-hf space`. Run it locally with `python app.py`;
`{env}=path/to/model python app.py` explores a local model folder instead of the Hub repo.
"""

import os

from protopool_hf.app import build_app


MODEL = os.environ.get("{env}", "{repo_id}")

demo = build_app(MODEL)

if __name__ == "__main__":
    demo.launch()
'''

_README = """---
title: {title}
emoji: 🔍
colorFrom: indigo
colorTo: yellow
sdk: gradio
sdk_version: {sdk_version}
python_version: "{python_version}"
app_file: app.py
models:
  - {repo_id}
tags:
  - protopool
  - interpretability
short_description: {short_description}
pinned: false
---

# ProtoPool explorer: {repo_id}

See why [{repo_id}](https://huggingface.co/{repo_id}) classifies an image the way it does: upload an image to get
its top classes and the "this looks like that" rows (where each prototype fired on your image, the training patch it
was taken from, and similarity × weight = its share of the logit), then browse the prototypes, the classes and the
interpretability report.

Written by `protopool-hf space` (protopool-hf {protopool_version}). Locally: `pip install -r requirements.txt`, then
`python app.py`.
"""


def space_files(repo_id: str, protopool_version: str, gradio_version: str) -> dict[str, str]:
    """The Space's files, `{file name: text}`, for the model `repo_id`.

    Args:
        repo_id: the model's Hub repo id (`namespace/name`), which the Space loads.
        protopool_version: the protopool-hf version to install (the one that wrote the model).
        gradio_version: the Space's `sdk_version`.
    """
    name = repo_id.split("/")[-1]
    short = f"Why {name} decided: this looks like that"
    return {
        "app.py": _APP.format(repo_id=repo_id, env=MODEL_ENV),
        "requirements.txt": f"protopool-hf[app]=={protopool_version}\n",
        "README.md": _README.format(
            title=json.dumps(name if "protopool" in name.lower() else f"ProtoPool {name}"),
            sdk_version=gradio_version,
            python_version=f"{sys.version_info.major}.{sys.version_info.minor}",
            repo_id=repo_id,
            short_description=json.dumps(short if len(short) <= 60 else short[:57] + "..."),
            protopool_version=protopool_version,
        ),
    }


def write_space(
    model: str | os.PathLike, out_dir: str | os.PathLike, *, repo_id: str | None = None, overwrite: bool = False
) -> Path:
    """Write a Space folder that runs the explorer on a Hub model.

    Args:
        model: the model's Hub repo id, or its local folder (then `repo_id` names the repo it was pushed to).
        out_dir: the Space folder to write; refused if it exists, unless `overwrite`.
        repo_id: the Hub repo the Space loads; defaults to `model` when that is a repo id.
        overwrite: write into an existing `out_dir`, replacing its `app.py`, `requirements.txt` and `README.md`
            (each atomically) and keeping its other files (a Space clone's `.git`).

    Returns:
        The folder.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"OUT_DIR {str(out_dir)!r} already exists: pass --overwrite to replace it.")
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"OUT_DIR {str(out_dir)!r} is a file: choose a folder path.")
    source = os.fspath(model)
    check_model_source(source)
    local = Path(source).expanduser().is_dir()
    if repo_id is None:
        if local:
            raise ValueError(
                f"MODEL {source!r} is a local folder: pass --repo-id NAMESPACE/NAME, the Hub repo the Space will "
                "load (push the folder there first: protopool-hf push)."
            )
        repo_id = source
    config = _read_config(source, local)
    protopool_version = config.get("protopool_version")
    if not protopool_version:
        from .configuration_protopool import __version__ as protopool_version
    try:
        gradio_version = version("gradio")
    except PackageNotFoundError:
        raise ImportError(
            "The Space's sdk_version is the installed gradio's, and gradio is not installed: "
            "pip install 'protopool-hf[app]'."
        ) from None
    files = space_files(repo_id, protopool_version, gradio_version)
    parent = out_dir.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    if out_dir.is_dir():  # --overwrite: replace our files one by one (each atomically), keep the others (.git, ...)
        for name, text in files.items():
            _write_atomically(out_dir / name, text)
        return out_dir
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".new", dir=parent))
    try:
        for name, text in files.items():
            (staging / name).write_text(text, encoding="utf-8")
        os.rename(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out_dir


def _read_config(source: str, local: bool) -> dict[str, Any]:
    if local:
        path = Path(source).expanduser() / "config.json"
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(source, "config.json"))
        except OSError as error:
            raise model_load_error(source, error) from error
    return json.loads(path.read_text())


def _write_atomically(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
