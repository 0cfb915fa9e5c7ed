"""Model folders and one-commit pushes to the Hugging Face Hub for ProtoPool models.

A ProtoPool repository holds what `save_pretrained` writes (config.json, model.safetensors, preprocessor_config.json
and the modeling code, so `trust_remote_code=True` works without this package), the prototype pictures under
`prototypes/` (drawn by `protopool_hf.gallery`; a folder's `prototypes/nearest/` and `examples/` go along, for the
explorer), the report `interpretability.json` of `protopool-hf evaluate`, and the model card README.md.

A report describes the weights it was measured on: a save that changes the weights (or config.json,
preprocessor_config.json) leaves the folder's report out; a save of the same model keeps it.

* `save_model_folder` writes the whole folder next to the target and swaps it in (`protopool_hf.atomic`).
* `refresh_model_card` renders the folder's README.md again (after `protopool-hf evaluate`), touching nothing else.
* `push_to_hub` makes exactly one `HfApi.create_commit`: the repository moves from its old revision to the new one in
  one step, or not at all.

The stock `model.push_to_hub` and `Trainer(push_to_hub=True)` do not write this card nor the pictures (docs/hub.md).
"""

import filecmp
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import CommitInfo, CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard, hf_hub_download

from .atomic import link_or_copy, read_json, replace_folder, write_file
from .card import METRIC_FILES, ProtoPoolModelCardData, load_metrics, merge_model_cards, render_model_card
from .metrics import REPORT_FILENAME
from .pictures import EXAMPLES_DIR, GALLERY_FILE, NEAREST_DIR, PROTOTYPES_DIR
from .provenance import Provenance, read_provenance


__all__ = [
    "check_model_folder",
    "existing_model_files",
    "push_to_hub",
    "refresh_model_card",
    "save_model_folder",
    "save_pretrained_replacing",
]

logger = logging.getLogger(__name__)

# Files of a model folder that `push_to_hub` uploads (besides the modeling code and prototypes/*.png).
_MODEL_FILES = re.compile(
    r"config\.json|preprocessor_config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|"
    + re.escape(REPORT_FILENAME)
)
_NEAREST_PNG, _OURS = f"{PROTOTYPES_DIR}/{NEAREST_DIR}/*.png", (f"{PROTOTYPES_DIR}/", f"{EXAMPLES_DIR}/")
# Weight files a new save replaces as a set: stale ones are dropped from folders and repositories.
_WEIGHT_FILES = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")


# --------------------------------------------------------------------------- model folders


def save_model_folder(
    model: torch.nn.Module,
    folder: str | os.PathLike,
    *,
    dataset: Any | None = None,
    metrics: Mapping[str, Any] | None = None,
    dataset_name: str | None = None,
    training_args: Any | None = None,
    card_data: ProtoPoolModelCardData | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write a complete model folder (what `push_to_hub` uploads) and swap it in atomically.

    The folder gets `save_pretrained`'s files, the prototype pictures in `prototypes/` (drawn from `dataset`; without
    one, the folder's old pictures are kept while the projection they show is unchanged) and README.md (an existing one
    is updated, see `render_model_card`; `metrics=None` reads the folder's Trainer results, `load_metrics`). Other
    files already in the folder (trainer state, checkpoints, logs) are carried over as hard links. The folder's
    interpretability report (`interpretability.json`) is kept, and shown on the card, only while the model files
    (weights, config.json, preprocessor_config.json) are byte for byte the ones it was measured on.

    Everything is written to a hidden sibling folder, which then takes the target's place
    (`protopool_hf.atomic.replace_folder`): the target holds the complete old or the complete new folder, except for the
    instant between two renames; a crash there leaves both complete copies, and the next save on that target finishes
    the swap before it writes. Durability against power loss (fsync) is not attempted.

    Args:
        model: a `ProtoPoolForImageClassification`.
        folder: the target folder; created if missing.
        dataset: the dataset the prototypes were projected on, to draw their pictures
            (`protopool_hf.gallery.save_prototype_images`).
        metrics: the last evaluation (see `render_model_card`).
        dataset_name: the Hub dataset id (see `render_model_card`).
        training_args: `TrainingArguments` or a mapping, for the card's training section.
        card_data: your card metadata (licence, tags, ...).
        repo_id: the Hub repo the usage snippets of the card name.

    Returns:
        The folder.

    Example:
        ```python
        >>> import tempfile
        >>> from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification
        >>> from protopool_hf.hub import save_model_folder
        >>> config = ProtoPoolConfig(backbone="test_resnet", num_labels=2, num_prototypes=4, num_slots_per_class=1)
        >>> folder = save_model_folder(ProtoPoolForImageClassification(config), tempfile.mkdtemp() + "/tiny")
        >>> sorted(path.name for path in folder.iterdir())[:3]
        ['README.md', 'backbone.py', 'config.json']

        ```
    """
    folder = Path(folder).absolute()

    def fill(staging: Path) -> None:
        old_exists = folder.is_dir()
        model.save_pretrained(staging)
        if dataset is not None:
            _draw_pictures(model, dataset, staging)
        elif old_exists and (folder / PROTOTYPES_DIR).is_dir():
            if _same_projection(model, folder):
                shutil.copytree(folder / PROTOTYPES_DIR, staging / PROTOTYPES_DIR, copy_function=link_or_copy)
            else:
                logger.warning(
                    "%s holds pictures of another projection (the prototypes or their provenance changed): they are "
                    "left out. Pass dataset= to draw the current prototypes.",
                    folder / PROTOTYPES_DIR,
                )
        if old_exists:
            _carry_over(folder, staging, drop=_stale_report(folder, staging))
        existing = folder / "README.md" if (folder / "README.md").is_file() else None
        card = render_model_card(
            model,
            repo_id=repo_id,
            card_data=card_data,
            metrics=(load_metrics(folder) or None) if metrics is None and old_exists else metrics,
            dataset_name=dataset_name,
            training_args=training_args,
            prototype_files=_pictures_in(staging),
            gallery_file=GALLERY_FILE if (staging / GALLERY_FILE).is_file() else None,
            existing_card=existing,
            interpretability=_report_in(staging),
        )
        card.save(staging / "README.md")

    return replace_folder(folder, fill)


def existing_model_files(folder: str | os.PathLike) -> list[str]:
    """The files (and `prototypes/`) of a saved model in `folder`: config, weights, card, pictures; [] if none."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    names = ("config.json", "preprocessor_config.json", "README.md", PROTOTYPES_DIR)
    found = [name for name in names if (folder / name).exists()]
    found += sorted(path.name for path in folder.iterdir() if _WEIGHT_FILES.fullmatch(path.name))
    return found


def check_model_folder(folder: str | os.PathLike, overwrite: bool = False, argument: str = "output_dir") -> None:
    """Refuse to write a model into `folder` when it is a file, or holds a saved model and `overwrite` is False.

    Raises:
        NotADirectoryError: `folder` is a file.
        FileExistsError: `folder` holds a model (the message lists its files and says how to replace it).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{argument} {str(folder)!r} is a file: pass a folder path for the model.")
    found = existing_model_files(folder)
    if found and not overwrite:
        raise FileExistsError(
            f"{argument} {str(folder)!r} already holds a saved model ({', '.join(found)}): pass overwrite=True "
            "(--overwrite) to replace it, or choose another folder."
        )


def save_pretrained_replacing(model: torch.nn.Module, folder: str | os.PathLike) -> Path:
    """`save_pretrained` into `folder`, replacing the model saved there, if any, in one atomic swap.

    The old model's files go as a whole: weights, config, card (README.md), prototype pictures and metric files, and
    the interpretability report unless the new model files equal the old ones byte for byte; a reader sees the
    complete old folder or the complete new one, never a mix. Other files (a run's phase folders and checkpoints,
    logs) are carried over as hard links. Refusing an existing model unless asked is the caller's job
    ([`check_model_folder`]).

    Args:
        model: a `ProtoPoolForImageClassification`.
        folder: the target folder; created if missing.

    Returns:
        The folder.
    """
    folder = Path(folder).absolute()

    def fill(staging: Path) -> None:
        model.save_pretrained(staging)
        if folder.is_dir():
            _carry_over(folder, staging, drop=(*METRIC_FILES, "trainer_state.json", *_stale_report(folder, staging)))

    return replace_folder(folder, fill)


def refresh_model_card(folder: str | os.PathLike, *, model: torch.nn.Module | None = None) -> Path:
    """Render the README.md of a model folder again from what the folder holds now; no other file is touched.

    The card gets the folder's pictures and its interpretability report (the section "Interpretability" and, when
    the card names a dataset, its `model-index` results); its own text, metadata, training and evaluation sections
    stay (a folder without a card gets one, with the evaluation of its Trainer result files). The file is replaced
    atomically. `protopool-hf evaluate` calls it after writing the report into the folder.

    Args:
        folder: a model folder (config.json and weights).
        model: the model saved there, if already loaded; else it is loaded from `folder`.

    Returns:
        The path of the card.

    Example:
        ```python
        >>> import tempfile
        >>> from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification
        >>> from protopool_hf.hub import refresh_model_card
        >>> config = ProtoPoolConfig(backbone="test_resnet", num_labels=2, num_prototypes=4, num_slots_per_class=1)
        >>> ProtoPoolForImageClassification(config).save_pretrained(folder := tempfile.mkdtemp())
        >>> refresh_model_card(folder).name
        'README.md'

        ```
    """
    from .modeling_protopool import ProtoPoolForImageClassification

    folder = Path(folder)
    model = model if model is not None else ProtoPoolForImageClassification.from_pretrained(folder)
    readme = folder / "README.md"
    existing = readme if readme.is_file() else None
    card = render_model_card(
        model,
        metrics=None if existing is not None else (load_metrics(folder) or None),
        prototype_files=_pictures_in(folder),
        gallery_file=GALLERY_FILE if (folder / GALLERY_FILE).is_file() else None,
        existing_card=existing,
        interpretability=_report_in(folder),
    )
    return write_file(readme, lambda path: card.save(path))


# --------------------------------------------------------------------------- push


def push_to_hub(
    model_or_folder: torch.nn.Module | str | os.PathLike,
    repo_id: str,
    *,
    dataset: Any | None = None,
    metrics: Mapping[str, Any] | None = None,
    dataset_name: str | None = None,
    training_args: Any | None = None,
    card_data: ProtoPoolModelCardData | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload ProtoPool model",
    commit_description: str | None = None,
    token: str | bool | None = None,
    create_pr: bool = False,
) -> CommitInfo:
    """Push a ProtoPool model with its card and prototype pictures to the Hub in one commit.

    Creates the repo if needed, then makes one `HfApi.create_commit` holding config.json, model.safetensors, the
    modeling code (configuration_protopool.py, modeling_protopool.py and the files they import, so
    `AutoModelForImageClassification.from_pretrained(repo_id, trust_remote_code=True)` works without protopool-hf),
    preprocessor_config.json, README.md and `prototypes/*.png` with the gallery, and a folder's interpretability report
    (`interpretability.json`, shown in the card's section "Interpretability" and its `model-index`). Pictures, weight
    files and a report of an earlier push that the new one lacks are deleted in the same commit (a report describes
    the weights pushed with it). If any upload or the commit fails, the
    repository stays at its previous revision. The commit is based on the revision whose README was read
    (`parent_commit`), so a concurrent change of the repo makes it fail instead of being overwritten.

    A folder (from `save_model_folder` or the training recipe) is pushed as it is: its weights, code and pictures;
    its README is re-rendered for `repo_id` (usage snippets), keeping its training and evaluation sections. When the
    repo already has a README, its own text and metadata are kept and only our sections are updated.

    Args:
        model_or_folder: a `ProtoPoolForImageClassification`, or a model folder.
        repo_id: `"org/name"` (or `"name"` for your namespace).
        dataset: the projection dataset, to draw the prototype pictures (a folder's pictures are used otherwise).
        metrics: the last evaluation (see `render_model_card`); for a folder, `None` reads its Trainer results.
        dataset_name: the Hub dataset id, for the card's `datasets` and eval results.
        training_args: `TrainingArguments` or a mapping, for the card's training section.
        card_data: your card metadata (licence, tags, ...).
        private: make a new repo private (no effect on an existing one).
        revision: the branch to commit to (created from main if missing).
        commit_message: the commit title.
        commit_description: the commit description.
        token: the Hub token (default: the logged-in one).
        create_pr: open a pull request instead of committing to the branch.

    Returns:
        The `huggingface_hub.CommitInfo` of the commit.

    Raises:
        FileNotFoundError: a folder without config.json or weights.
        huggingface_hub.errors.HfHubHTTPError: the Hub refused an upload or the commit (the repo is unchanged).
    """
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    head = api.model_info(repo_id, revision=revision)
    remote_files = [sibling.rfilename for sibling in head.siblings or []]
    remote_card = None
    if "README.md" in remote_files:
        remote_card = ModelCard.load(hf_hub_download(repo_id, "README.md", revision=head.sha, token=token))
    with tempfile.TemporaryDirectory(prefix="protopool-push-") as tmp:
        staging = Path(tmp)
        model, local_card = _stage(model_or_folder, staging, dataset)
        if metrics is None and not isinstance(model_or_folder, torch.nn.Module):
            metrics = load_metrics(model_or_folder) or None
        card = render_model_card(
            model,
            repo_id=repo_id,
            card_data=card_data,
            metrics=metrics,
            dataset_name=dataset_name,
            training_args=training_args,
            prototype_files=_pictures_in(staging),
            gallery_file=GALLERY_FILE if (staging / GALLERY_FILE).is_file() else None,
            existing_card=local_card if local_card is not None else remote_card,
            interpretability=_report_in(staging),
        )
        if local_card is not None and remote_card is not None:  # the folder's card is newer; the repo's text wins
            card = merge_model_cards(card, remote_card, replace_results=True)
        card.save(staging / "README.md")
        files = sorted(path.relative_to(staging).as_posix() for path in staging.rglob("*") if path.is_file())
        operations: list[CommitOperationAdd | CommitOperationDelete] = [
            CommitOperationAdd(path_in_repo=path, path_or_fileobj=staging / path) for path in files
        ]
        operations += [
            CommitOperationDelete(path_in_repo=path)
            for path in remote_files
            if path not in files
            and (path.startswith(_OURS) or _WEIGHT_FILES.fullmatch(path) or path == REPORT_FILENAME)
        ]
        return api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message,
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
            parent_commit=head.sha,
        )


# --------------------------------------------------------------------------- helpers


def _draw_pictures(model: torch.nn.Module, dataset: Any, folder: Path) -> None:
    """Write `folder/prototypes/prototype_NNN*.png` and `folder/prototypes/gallery.png` (gallery module)."""
    from .gallery import save_prototype_images

    save_prototype_images(model, dataset, folder, gallery=True)


def _pictures_in(folder: Path) -> list[str]:
    """The pictures in `folder/prototypes/`, relative to `folder` (`render_model_card` picks the crops by name)."""
    pictures = folder / PROTOTYPES_DIR
    return sorted(path.relative_to(folder).as_posix() for path in pictures.glob("*.png")) if pictures.is_dir() else []


def _same_projection(model: torch.nn.Module, folder: Path) -> bool:
    """Whether the folder's saved prototypes and projection provenance equal the model's (its pictures still hold)."""
    from safetensors import safe_open

    weights = folder / "model.safetensors"
    if not weights.is_file():
        return False
    with safe_open(weights, framework="pt") as saved:
        keys = set(saved.keys())
        wanted = ["head.prototypes", *Provenance.state_dict_keys("head.")]
        if any(key not in keys for key in wanted):
            return False
        tensors = {key: saved.get_tensor(key) for key in wanted}
    if not torch.equal(tensors["head.prototypes"], model.head.prototypes.detach().cpu()):
        return False
    recorded = Provenance.from_state_dict(tensors, "head.")
    recorded.dataset_name = read_json(folder / "config.json").get("projection_dataset")
    return recorded.same_sources(read_provenance(model))


def _report_in(folder: Path) -> dict[str, Any] | None:
    """The interpretability report in `folder` (`interpretability.json`), None if there is none."""
    path = folder / REPORT_FILENAME
    return read_json(path) if path.is_file() else None


def _stale_report(old: Path, new: Path) -> tuple[str, ...]:
    """`(REPORT_FILENAME,)` when `old` holds a report and its model files differ from those of `new`, else `()`.

    The model files are the weights, config.json and preprocessor_config.json: the same names, byte for byte.
    """
    if not (old / REPORT_FILENAME).is_file():
        return ()

    def model_files(folder: Path) -> set[str]:
        names = {"config.json", "preprocessor_config.json"}
        return {
            p.name for p in folder.iterdir() if p.is_file() and (p.name in names or _WEIGHT_FILES.fullmatch(p.name))
        }

    names = model_files(old)
    if names == model_files(new) and all(filecmp.cmp(old / name, new / name, shallow=False) for name in names):
        return ()
    logger.warning(
        "%s describes the previous weights: it is left out of the new folder. Run protopool-hf evaluate again to "
        "measure the new model.",
        old / REPORT_FILENAME,
    )
    return (REPORT_FILENAME,)


def _carry_over(old: Path, new: Path, drop: Sequence[str] = ()) -> None:
    """Hard-link into `new` every file of `old` that `new` lacks, except stale weights, pictures, the card and `drop`.

    Nothing is written into a linked file afterwards (README.md, which is written next, is never linked), so the old
    folder stays as it was until the swap.
    """
    for path in old.rglob("*"):
        relative = path.relative_to(old)
        if path.is_dir() or (new / relative).exists() or relative.as_posix() == "README.md":
            continue
        if relative.parts[0] == PROTOTYPES_DIR or _WEIGHT_FILES.fullmatch(relative.as_posix()):
            continue
        if relative.as_posix() in drop:
            continue
        (new / relative).parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(path, new / relative)


def _stage(
    model_or_folder: torch.nn.Module | str | os.PathLike, staging: Path, dataset: Any | None
) -> tuple[torch.nn.Module, Path | None]:
    """Fill `staging` with what the commit uploads (all but README.md); return the model and the folder's card."""
    if isinstance(model_or_folder, torch.nn.Module):
        model_or_folder.save_pretrained(staging)
        if dataset is not None:
            _draw_pictures(model_or_folder, dataset, staging)
        return model_or_folder, None
    from .modeling_protopool import ProtoPoolForImageClassification

    folder = Path(model_or_folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} holds no config.json: pass a folder written by protopool_hf.save_model_folder or "
            "save_pretrained, or the model itself."
        )
    weights = [path for path in folder.iterdir() if path.is_file() and _WEIGHT_FILES.fullmatch(path.name)]
    if not any(path.name.startswith("model") and ".safetensors" in path.name for path in weights):
        raise FileNotFoundError(
            f"{folder} holds no model.safetensors: save the model with save_pretrained (safetensors) first."
        )
    for path in folder.iterdir():
        if path.is_file() and _MODEL_FILES.fullmatch(path.name):
            link_or_copy(path, staging / path.name)
    for name in _code_files(folder):
        link_or_copy(folder / name, staging / name)
    model = ProtoPoolForImageClassification.from_pretrained(folder)
    if dataset is not None:
        _draw_pictures(model, dataset, staging)
    patterns = [f"{EXAMPLES_DIR}/*"] + ([] if dataset is not None else [f"{PROTOTYPES_DIR}/*.png", _NEAREST_PNG])
    for path in sorted(path for pattern in patterns for path in folder.glob(pattern) if path.is_file()):
        (staging / path.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(path, staging / path.relative_to(folder))
    card = folder / "README.md"
    return model, card if card.is_file() else None


def _code_files(folder: Path) -> list[str]:
    """The modeling code of a saved folder: the `auto_map` modules and the files they import relatively."""
    from transformers.dynamic_module_utils import get_relative_import_files

    auto_map = read_json(folder / "config.json").get("auto_map") or {}
    names: set[str] = set()
    for reference in auto_map.values():
        for item in reference if isinstance(reference, list | tuple) else [reference]:
            if not item:
                continue
            module = folder / f"{item.split('--')[-1].rsplit('.', 1)[0]}.py"
            if not module.is_file():
                raise FileNotFoundError(
                    f"{folder}/config.json maps {item!r} to {module.name}, which is missing: save the model again "
                    "with save_pretrained (it copies the modeling code)."
                )
            names |= {module.name, *(Path(p).name for p in get_relative_import_files(module))}
    return sorted(names)
