"""Model cards, model folders and one-commit pushes to the Hugging Face Hub for ProtoPool models.

ProtoPool: Rymarczyk et al., "Interpretable Image Classification with Differentiable Prototypes Assignment",
ECCV 2022 (https://arxiv.org/abs/2112.02902).

A ProtoPool repository holds what `save_pretrained` writes (config.json, model.safetensors, preprocessor_config.json
and the modeling code, so `trust_remote_code=True` works without this package), the prototype pictures under
`prototypes/` (drawn by `protopool_hf.visualization` from the projection provenance) and a README.md rendered from
`templates/model_card.md`.

* `render_model_card` fills the template from the model. The sections it writes sit between
  `<!-- protopool-hf:begin NAME -->` and `<!-- protopool-hf:end NAME -->`; given an existing card, it replaces only
  those, keeps everything else the user wrote, and merges the metadata.
* `save_model_folder` writes the whole folder next to the target and swaps it in atomically.
* `push_to_hub` makes exactly one `HfApi.create_commit`: the repository moves from its old revision to the new one in
  one step, or not at all.

The stock `model.push_to_hub` and `Trainer(push_to_hub=True)` do not write this card nor the pictures (docs/hub.md).
"""

import ctypes
import errno
import glob
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import (
    CommitInfo,
    CommitOperationAdd,
    CommitOperationDelete,
    EvalResult,
    HfApi,
    ModelCard,
    ModelCardData,
    hf_hub_download,
)
from huggingface_hub.utils import yaml_dump

from .configuration_protopool import ProtoPoolConfig
from .provenance import Provenance, read_provenance
from .torch_utils import evaluating


__all__ = [
    "DEFAULT_TAGS",
    "LIBRARY_NAME",
    "ProtoPoolModelCardData",
    "backbone_hub_id",
    "check_model_folder",
    "existing_model_files",
    "load_metrics",
    "merge_model_cards",
    "push_to_hub",
    "render_model_card",
    "save_model_folder",
    "save_pretrained_replacing",
]

logger = logging.getLogger(__name__)

LIBRARY_NAME = "protopool-hf"
PIPELINE_TAG = "image-classification"
DEFAULT_TAGS = ("protopool", "prototype-network", "interpretability", "timm")
TEMPLATE_PATH = Path(__file__).parent / "templates" / "model_card.md"
# The names `protopool_hf.visualization` writes (PROTOTYPES_DIR, GALLERY_FILENAME, prototype_filenames).
PROTOTYPES_DIR = "prototypes"
GALLERY_FILE = f"{PROTOTYPES_DIR}/gallery.png"
_CROP_NAME = re.compile(r"prototype_(\d+)\.png")
# Our sections, in template order.
SECTIONS = (
    "header",
    "about",
    "usage",
    "prototypes",
    "classes",
    "model",
    "training",
    "evaluation",
    "limitations",
    "citation",
)
_BLOCK = re.compile(r"<!-- protopool-hf:begin (?P<name>[\w-]+) -->.*?<!-- protopool-hf:end (?P=name) -->", re.DOTALL)
# Bodies of the cards transformers writes on its own; such a card is replaced, not kept as the user's text.
_GENERATED_CARD_MARKERS = (
    "This model card has been automatically generated.",  # PreTrainedModel.push_to_hub's default card
    "This model card has been generated automatically according to the information the Trainer",  # Trainer's draft
)
# Files of a model folder that `push_to_hub` uploads (besides the modeling code and prototypes/*.png).
_MODEL_FILES = re.compile(
    r"config\.json|preprocessor_config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"
)
# Weight files a new save replaces as a set: stale ones are dropped from folders and repositories.
_WEIGHT_FILES = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")
_METRIC_FILES = ("all_results.json", "eval_results.json", "test_results.json", "metrics.json")
_SPLITS = {"eval": "validation", "validation": "validation", "test": "test", "train": "train"}
# Numbers a Trainer logs next to its metrics that are not quality metrics.
_NOT_A_METRIC = re.compile(
    r"loss|runtime|per_second|epoch|flos|preparation_time|^(cross_entropy|cluster|separation|orthogonality|l1)$"
)
_TRAINING_ARGS = (
    "learning_rate",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "max_steps",
    "optim",
    "weight_decay",
    "lr_scheduler_type",
    "warmup_ratio",
    "warmup_steps",
    "max_grad_norm",
    "seed",
    "bf16",
    "fp16",
)


class ProtoPoolModelCardData(ModelCardData):
    """The metadata (YAML block) of a ProtoPool model card: what you set first, what is filled from the model after.

    `library_name`, `pipeline_tag` and the tags `protopool`, `prototype-network`, `interpretability` and `timm` are
    always set. `render_model_card` fills the fields left `None`: `base_model` from the backbone (timm's Hub repo of
    its pretrained weights), `datasets`, `eval_results` and `metrics` from the evaluation, `model_name` from the repo.

    Args:
        license: the licence of the weights, e.g. `"apache-2.0"` (a Hub licence id).
        language: the language(s) of the data, if any.
        tags: extra tags, added after the default ones.
        datasets: Hub dataset ids the model was trained on.
        model_name: the name in the card title and in `model-index`; defaults to the repo name.
        base_model: the model this one was fine-tuned from; defaults to the backbone's pretrained weights.
        eval_results: `huggingface_hub.EvalResult`s; filled from the `metrics` given to `render_model_card`.
        metrics: metric ids (e.g. `["accuracy"]`); filled likewise.
        **kwargs: any other metadata field (written to the YAML block as is).

    Example:
        ```python
        >>> from protopool_hf.hub import ProtoPoolModelCardData
        >>> data = ProtoPoolModelCardData(license="apache-2.0", tags=["birds"])
        >>> data.library_name, data.tags
        ('protopool-hf', ['protopool', 'prototype-network', 'interpretability', 'timm', 'birds'])

        ```
    """

    def __init__(
        self,
        *,
        license: str | None = None,
        language: str | list[str] | None = None,
        tags: Sequence[str] | None = None,
        datasets: str | list[str] | None = None,
        model_name: str | None = None,
        base_model: str | list[str] | None = None,
        eval_results: list[EvalResult] | None = None,
        metrics: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("library_name", LIBRARY_NAME)
        kwargs.setdefault("pipeline_tag", PIPELINE_TAG)
        super().__init__(
            license=license,
            language=language,
            tags=_unique([*DEFAULT_TAGS, *(tags or [])]),
            datasets=datasets,
            model_name=model_name,
            base_model=base_model,
            eval_results=eval_results,
            metrics=metrics,
            **kwargs,
        )


# --------------------------------------------------------------------------- the card


def render_model_card(
    model: torch.nn.Module,
    *,
    repo_id: str | None = None,
    card_data: ProtoPoolModelCardData | None = None,
    metrics: Mapping[str, Any] | None = None,
    dataset_name: str | None = None,
    training_args: Any | None = None,
    prototype_files: Mapping[int, str] | Sequence[str] | None = None,
    gallery_file: str | None = None,
    existing_card: ModelCard | str | os.PathLike | None = None,
) -> ModelCard:
    """Render the model card of a ProtoPool model from the template shipped in the package.

    Args:
        model: a `ProtoPoolForImageClassification`.
        repo_id: the Hub repo (`"org/name"`) the usage snippets load from; a placeholder when `None`.
        card_data: your metadata (licence, tags, ...); fields left `None` are filled from the model.
        metrics: the last evaluation, e.g. `{"eval_accuracy": 0.81, "test_accuracy": 0.79}` (a Trainer's
            `evaluate()` output or its `*_results.json`). The prefix names the split (`eval` -> validation);
            losses, runtimes and epochs are left out. `None` keeps the evaluation of `existing_card`.
        dataset_name: the Hub dataset id of the training / evaluation data; needed to publish the metrics as
            `model-index` eval results. Defaults to the first of the `datasets` of `card_data` or `existing_card`.
        training_args: a `transformers.TrainingArguments`, a `ProtoPoolRecipe` or a mapping of hyperparameters.
            `None` keeps the training section of `existing_card`.
        prototype_files: the prototypes' pictures, relative to the repo root: `{prototype id: path}`, or paths named
            `prototypes/prototype_{id:03d}.png` (other names are ignored). The class table links to them.
        gallery_file: the gallery picture relative to the repo root (e.g. `"prototypes/gallery.png"`).
        existing_card: a card (or its path) to update: its own text and metadata are kept, our sections replaced.

    Returns:
        The `huggingface_hub.ModelCard`.

    Example:
        ```python
        >>> from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification
        >>> from protopool_hf.hub import render_model_card
        >>> config = ProtoPoolConfig(backbone="test_resnet", num_labels=2, num_prototypes=4, num_slots_per_class=1)
        >>> card = render_model_card(ProtoPoolForImageClassification(config), repo_id="org/tiny")
        >>> card.data.library_name, card.data.pipeline_tag
        ('protopool-hf', 'image-classification')

        ```
    """
    config: ProtoPoolConfig = model.config
    existing = _as_card(existing_card)
    files = _prototype_file_map(prototype_files)
    data = ProtoPoolModelCardData(**(card_data.to_dict() if card_data is not None else {}))
    if dataset_name is None:  # the dataset the card already names
        dataset_name = _first(data.datasets) or (_first(existing.data.datasets) if existing is not None else None)
    model_name = data.model_name or (repo_id.split("/")[-1] if repo_id else f"protopool-{_architecture(config)}")
    if data.base_model is None:
        data.base_model = backbone_hub_id(config)
    if data.datasets is None and dataset_name:
        data.datasets = [dataset_name]
    rows = _metric_rows(metrics) if metrics is not None else []
    if rows and data.eval_results is None:
        if dataset_name:
            data.eval_results = [
                EvalResult(
                    task_type=PIPELINE_TAG,
                    dataset_type=dataset_name,
                    dataset_name=dataset_name,
                    dataset_split=split,
                    metric_type=name,
                    metric_value=value,
                )
                for split, name, value in rows
            ]
            data.metrics = _unique(name for _, name, _ in rows)
            data.model_name = model_name
        else:
            logger.warning(
                "The card lists the metrics in its body only: pass dataset_name= (a Hub dataset id) to publish them "
                "as model-index eval results."
            )
    if not rows and data.eval_results:  # results given as card_data.eval_results
        rows = [(result.dataset_split, result.metric_type, result.metric_value) for result in data.eval_results]
    values = _template_values(model, repo_id, model_name, dataset_name)
    values |= {
        "prototypes": _prototypes_text(model, files, gallery_file),
        "class_intro": _class_intro(model),
        "class_table": _class_table(model, files),
        "model_table": _model_table(model),
        "training": _training_text(training_args),
        "evaluation": _evaluation_text(rows),
    }
    ours = ModelCard.from_template(data, template_path=str(TEMPLATE_PATH), **values)
    if not ours.text.endswith("\n"):  # Jinja drops the template's final newline
        ours.text += "\n"
    new_results = metrics is not None or bool(data.eval_results)
    keep = [
        name for name, missing in (("training", training_args is None), ("evaluation", not new_results)) if missing
    ]
    if existing is None:
        return ours
    return merge_model_cards(ours, existing, keep_sections=keep, replace_results=new_results)


def merge_model_cards(
    ours: ModelCard,
    existing: ModelCard,
    *,
    keep_sections: Sequence[str] = (),
    replace_results: bool = True,
) -> ModelCard:
    r"""Update `existing` with the protopool-hf sections and metadata of `ours`; keep everything else of `existing`.

    * Each `<!-- protopool-hf:begin NAME -->` block of `existing` is replaced by the block of `ours` with that name
      (blocks named in `keep_sections` stay as they were; blocks `ours` no longer has are dropped). Blocks missing
      from `existing` are inserted after the block that precedes them in the template.
    * A card without our blocks keeps its text below ours, unless transformers generated it (its default card, the
      Trainer's draft): that is replaced.
    * Metadata: the keys of `ours` win, the tags are united, other keys of `existing` stay. With
      `replace_results=False`, the `model-index` and `metrics` of `existing` stay too.

    Args:
        ours: a card from `render_model_card`.
        existing: the card to update.
        keep_sections: names of our sections whose old content to keep, when `existing` has them.
        replace_results: whether the eval results of `ours` replace those of `existing`.

    Returns:
        The merged card.

    Example:
        ```python
        >>> from huggingface_hub import ModelCard
        >>> from protopool_hf.hub import merge_model_cards
        >>> ours = ModelCard("---\ntags: [protopool]\n---\n<!-- protopool-hf:begin header -->\n# new\n"
        ...                  "<!-- protopool-hf:end header -->\n")
        >>> mine = ModelCard("---\nlicense: mit\n---\n## My notes\n\nHello.\n")
        >>> merged = merge_model_cards(ours, mine)
        >>> merged.data.license, merged.text.index("# new") < merged.text.index("## My notes")
        ('mit', True)

        ```
    """
    new_blocks = {match["name"]: match[0] for match in _BLOCK.finditer(ours.text)}
    old = existing.text
    segments = _split_blocks(old)
    if not any(name for name, _ in segments):
        user_text = old if not any(marker in old for marker in _GENERATED_CARD_MARKERS) else ""
        segments = [*new_blocks.items(), (None, user_text)]
    else:
        merged: list[tuple[str | None, str]] = []
        for name, text in segments:
            if name is None:
                merged.append((None, text))
            elif name in new_blocks and all(name != placed for placed, _ in merged):
                merged.append((name, text if name in keep_sections else new_blocks[name]))
        for position, name in enumerate(new_blocks):
            if any(name == placed for placed, _ in merged):
                continue
            before = [other for other in list(new_blocks)[:position] if any(other == p for p, _ in merged)]
            if before:
                index = max(i for i, (placed, _) in enumerate(merged) if placed == before[-1]) + 1
            else:
                index = min(i for i, (placed, _) in enumerate(merged) if placed is not None)
            merged.insert(index, (name, new_blocks[name]))
        segments = merged
    metadata, new_metadata = existing.data.to_dict(), ours.data.to_dict()
    for key in ("model-index", "metrics"):
        if replace_results and key not in new_metadata:
            metadata.pop(key, None)
    for key, value in new_metadata.items():
        metadata[key] = _unique([*(metadata.get("tags") or []), *value]) if key == "tags" else value
    return ModelCard(f"---\n{yaml_dump(metadata, sort_keys=False).strip()}\n---\n{_join(segments)}")


def backbone_hub_id(config: ProtoPoolConfig) -> str | None:
    """The Hub repo of the backbone's start weights (`"timm/resnet50.a1_in1k"`), or None.

    None when the backbone was not pretrained, or its weights came from elsewhere (a local file or URL through
    `backbone_kwargs`, as the CUB preset's iNaturalist ResNet-50 does). Read from `config.start_weights_source()`,
    which a saved config records.
    """
    source = config.start_weights_source()
    return source.removeprefix("hf-hub:") if source and source.startswith("hf-hub:") else None


def _start_weights_text(config: ProtoPoolConfig) -> str:
    """The card's words for where the backbone's start weights came from (`config.start_weights_source()`)."""
    source = config.start_weights_source()
    kind, _, value = (source or "").partition(":")
    if source is None:
        return "trained from scratch"
    if kind == "hf-hub":
        return f"[{value}](https://huggingface.co/{value})"
    if kind == "url":
        return f"<{value}>"
    if kind == "file":
        return f"pretrained, from a local file `{_escape(value)}` (not part of this repository)"
    if kind == "timm":
        return f"timm's pretrained `{_escape(value)}`"
    return "pretrained, from a state dict given in `backbone_kwargs`"


def load_metrics(folder: str | os.PathLike) -> dict[str, Any]:
    """The last evaluation a Trainer left in its output folder, `{}` if none.

    Reads `all_results.json`, `eval_results.json`, `test_results.json` and `metrics.json` (later files win); without
    them, the last `eval_*` entry of `trainer_state.json`'s log history.
    """
    folder = Path(folder)
    metrics: dict[str, Any] = {}
    for name in _METRIC_FILES:
        if (folder / name).is_file():
            metrics |= _read_json(folder / name)
    if not metrics and (folder / "trainer_state.json").is_file():
        history = _read_json(folder / "trainer_state.json").get("log_history") or []
        evaluations = [entry for entry in history if any(key.startswith("eval_") for key in entry)]
        metrics = dict(evaluations[-1]) if evaluations else {}
    return metrics


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
    files already in the folder (trainer state, checkpoints, logs) are carried over as hard links.

    Everything is written to a sibling folder, which then takes the target's place in one `renameat2(RENAME_EXCHANGE)`
    (Linux), so a reader sees either the complete old or the complete new folder. Where the exchange is unsupported,
    two renames are used (target -> `.NAME.protopool-XXXX.old`, new -> target); a crash between them leaves no target
    and both complete copies, and the next `save_model_folder` on that target finishes the swap (or restores the old
    copy) before it writes. Durability against power loss (fsync) is not attempted.

    Args:
        model: a `ProtoPoolForImageClassification`.
        folder: the target folder; created if missing.
        dataset: the dataset the prototypes were projected on, to draw their pictures
            (`protopool_hf.visualization.save_prototype_images`).
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
    _finish_interrupted_swap(folder)
    old_exists = folder.is_dir()
    if folder.exists() and not old_exists:
        raise NotADirectoryError(f"{folder} exists and is not a folder: pass a folder path for the model.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.protopool-", suffix=".new", dir=folder.parent))
    try:
        model.save_pretrained(staging)
        if dataset is not None:
            _draw_pictures(model, dataset, staging)
        elif old_exists and (folder / PROTOTYPES_DIR).is_dir():
            if _same_projection(model, folder):
                shutil.copytree(folder / PROTOTYPES_DIR, staging / PROTOTYPES_DIR, copy_function=_link_or_copy)
            else:
                logger.warning(
                    "%s holds pictures of another projection (the prototypes or their provenance changed): they are "
                    "left out. Pass dataset= to draw the current prototypes.",
                    folder / PROTOTYPES_DIR,
                )
        if old_exists:
            _carry_over(folder, staging)
        if metrics is None and old_exists:
            metrics = load_metrics(folder) or None
        existing = folder / "README.md" if (folder / "README.md").is_file() else None
        card = render_model_card(
            model,
            repo_id=repo_id,
            card_data=card_data,
            metrics=metrics,
            dataset_name=dataset_name,
            training_args=training_args,
            prototype_files=_pictures_in(staging),
            gallery_file=GALLERY_FILE if (staging / GALLERY_FILE).is_file() else None,
            existing_card=existing,
        )
        card.save(staging / "README.md")
        _swap_in(staging, folder, old_exists)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return folder


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

    The old model's files go as a whole: weights, config, card (README.md), prototype pictures and metric files; a
    reader sees the complete old folder or the complete new one, never a mix. Other files (a run's phase folders and
    checkpoints, logs) are carried over as hard links. Refusing an existing model unless asked is the caller's job
    ([`check_model_folder`]).

    Args:
        model: a `ProtoPoolForImageClassification`.
        folder: the target folder; created if missing.

    Returns:
        The folder.
    """
    folder = Path(folder).absolute()
    _finish_interrupted_swap(folder)
    old_exists = folder.is_dir()
    if folder.exists() and not old_exists:
        raise NotADirectoryError(f"{folder} exists and is not a folder: pass a folder path for the model.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.protopool-", suffix=".new", dir=folder.parent))
    try:
        model.save_pretrained(staging)
        if old_exists:
            _carry_over(folder, staging, drop=(*_METRIC_FILES, "trainer_state.json"))
        _swap_in(staging, folder, old_exists)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return folder


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
    preprocessor_config.json, README.md and `prototypes/*.png` with the gallery. Pictures and weight files of an
    earlier push that the new one lacks are deleted in the same commit. If any upload or the commit fails, the
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
            if path not in files and (path.startswith(f"{PROTOTYPES_DIR}/") or _WEIGHT_FILES.fullmatch(path))
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


# --------------------------------------------------------------------------- helpers: card


def _template_values(
    model: torch.nn.Module, repo_id: str | None, model_name: str, dataset_name: str | None
) -> dict[str, str]:
    config: ProtoPoolConfig = model.config
    classes, prototypes, slots = config.num_labels, config.num_prototypes, config.num_slots_per_class
    trained_on = f" Trained on `{dataset_name}`." if dataset_name else ""
    return {
        "model_name": model_name,
        "repo_id": repo_id or f"your-namespace/{model_name}",
        "summary": (
            f"An interpretable ProtoPool image classifier on a timm `{config.backbone}` backbone: "
            f"{_count(prototypes, 'prototype')} shared by {_count(classes, 'class')}, {_count(slots, 'slot')} per "
            f"class.{trained_on}"
        ),
        "num_prototypes": str(prototypes),
        "num_classes": str(classes),
        "num_slots": str(slots),
        "feature_grid": _feature_grid(model),
    }


def _prototypes_text(model: torch.nn.Module, files: dict[int, str], gallery_file: str | None) -> str:
    provenance = read_provenance(model)
    projected = len(provenance.projected_ids)
    source = f" of `{provenance.dataset_name}`" if provenance.dataset_name else ""
    if projected == 0:
        return (
            "The prototypes have not been projected onto training images yet, so they cannot be shown as pictures. "
            "Project them (`protopool_hf.project_prototypes`) and save the model folder with the dataset to add them."
        )
    lines = []
    if gallery_file:
        lines += [
            f"![Prototype gallery: each prototype with its id and the classes that use it]({gallery_file})",
            "",
        ]
    if files:
        lines.append(
            f"{projected} of the {provenance.num_prototypes} prototypes were projected onto patches of training images"
            f"{source}. `prototypes/prototype_NNN.png` is prototype NNN's patch, `prototype_NNN_overlay.png` its "
            "source image with the similarity heat map and the high-activation box, `prototype_NNN_source.png` the "
            "source image with the box."
        )
    else:
        lines.append(
            f"{projected} of the {provenance.num_prototypes} prototypes were projected onto patches of training images"
            f"{source}, but their pictures were not rendered: pass the dataset to `protopool_hf.save_model_folder` "
            "or `protopool_hf.push_to_hub` to add them."
        )
    return "\n".join(lines)


def _class_intro(model: torch.nn.Module) -> str:
    config = model.config
    slots = model.class_to_prototypes()  # (C, S)
    used = sorted({int(p) for p in slots.flatten().tolist()})
    counts = torch.bincount(slots.flatten(), minlength=config.num_prototypes)
    shared = int((counts > 1).sum())
    form = "hardened (one-hot)" if model.is_assignment_hard else "soft; the table shows each slot's argmax"
    text = (
        f"Each class has {_count(config.num_slots_per_class, 'slot')}, and each slot picks one prototype of the pool "
        f"(assignment: {form}). {len(used)} of the {config.num_prototypes} prototypes are used, {shared} of them by "
        "more than one slot."
    )
    unused = [p for p in range(config.num_prototypes) if p not in set(used)]
    if unused:
        text += f" Unused: {_id_list(unused)}."
    return text


def _class_table(model: torch.nn.Module, files: dict[int, str]) -> str:
    config = model.config
    lines = ["| Class id | Class | Prototypes (one per slot) |", "|---:|---|---|"]
    for class_id, prototypes in enumerate(model.class_to_prototypes().tolist()):
        name = _escape(str(config.id2label.get(class_id, class_id)))
        links = ", ".join(f"[{p}]({files[p]})" if p in files else str(p) for p in prototypes)
        lines.append(f"| {class_id} | {name} | {links} |")
    return "\n".join(lines)


def _model_table(model: torch.nn.Module) -> str:
    config: ProtoPoolConfig = model.config
    data = config.data_config()
    rows = [
        ("Backbone (timm)", f"`{config.backbone}`"),
        ("Backbone start weights", _start_weights_text(config)),
        ("Feature stage", "last" if config.feature_stage is None else str(config.feature_stage)),
        ("Input size", "×".join(str(v) for v in data["input_size"])),
        ("Normalisation mean / std", f"{_numbers(data['mean'])} / {_numbers(data['std'])}"),
        ("Resize", f"{data['interpolation']}, crop_pct {_number(data['crop_pct'])}"),
        ("Classes (C)", str(config.num_labels)),
        ("Prototypes (P)", str(config.num_prototypes)),
        ("Slots per class (S)", str(config.num_slots_per_class)),
        ("Prototype dim (D)", str(config.prototype_dim)),
        ("Similarity ε", _number(config.similarity_epsilon)),
        ("Gumbel-softmax τ", _number(config.gumbel_tau)),
        (
            "Assignment scale s",
            f"{_number(model.gumbel_scale)} (schedule to {_number(config.gumbel_scale_max)} over "
            f"{config.gumbel_scale_epochs} epochs)",
        ),
        ("Assignment hardened", "yes" if model.is_assignment_hard else "no"),
        (
            "Loss weights",
            f"cluster {_number(config.cluster_weight)}, separation {_number(config.separation_weight)}, "
            f"orthogonality {_number(config.orthogonality_weight)}, L1 {_number(config.l1_weight)}",
        ),
    ]
    return _table(("Model", "Value"), rows)


def _training_text(training_args: Any | None) -> str:
    from transformers import TrainingArguments

    if training_args is None:
        return "The training hyperparameters were not recorded with this card."
    if isinstance(training_args, TrainingArguments):
        raw = training_args.to_dict()
        items = [(key, raw[key]) for key in _TRAINING_ARGS if raw.get(key) not in (None, -1, False, "")]
    elif isinstance(training_args, Mapping):
        items = list(training_args.items())
    elif hasattr(training_args, "to_dict"):  # a ProtoPoolRecipe: every hyperparameter of the run
        items = list(training_args.to_dict().items())
    else:
        raise ValueError(
            f"training_args must be a transformers.TrainingArguments or a mapping, got {type(training_args).__name__}."
        )
    rows = [(f"`{key}`", _escape(_value(value))) for key, value in items]
    return _table(("Training hyperparameter", "Value"), rows)


def _evaluation_text(rows: list[tuple[str | None, str, Any]]) -> str:
    if not rows:
        return "No evaluation results were recorded with this card."
    return _table(("Split", "Metric", "Value"), [(split or "—", name, _number(value)) for split, name, value in rows])


def _metric_rows(metrics: Mapping[str, Any]) -> list[tuple[str | None, str, Any]]:
    """`(split, metric, value)` for every real-valued quality metric, in the order given."""
    if not isinstance(metrics, Mapping):
        raise ValueError(f"metrics must be a mapping of metric name to value, got {type(metrics).__name__}.")
    rows = []
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            continue
        prefix, _, rest = str(key).partition("_")
        split, name = (_SPLITS[prefix], rest) if prefix in _SPLITS and rest else (None, str(key))
        if not _NOT_A_METRIC.search(name):
            rows.append((split, name, value))
    return rows


def _feature_grid(model: torch.nn.Module) -> str:
    """`"H×W"` of the latent map for one input of the configured size (one forward of the backbone, in eval mode)."""
    _, height, width = model.config.data_config()["input_size"]
    parameter = next(model.parameters())
    with evaluating(model):
        feature_map = model.feature_map(torch.zeros(1, 3, height, width, device=parameter.device))
    return f"{feature_map.shape[-2]}×{feature_map.shape[-1]}"


def _prototype_file_map(prototype_files: Mapping[int, str] | Sequence[str] | None) -> dict[int, str]:
    if prototype_files is None:
        return {}
    if isinstance(prototype_files, Mapping):
        return {int(p): Path(path).as_posix() for p, path in prototype_files.items()}
    if isinstance(prototype_files, str):
        raise ValueError("prototype_files must be a mapping or a list of paths, not one string.")
    found = {}
    for path in prototype_files:
        match = _CROP_NAME.fullmatch(Path(path).name)
        if match:
            found[int(match[1])] = Path(path).as_posix()
    return dict(sorted(found.items()))


def _split_blocks(text: str) -> list[tuple[str | None, str]]:
    """`text` as `(section name, block)` for our blocks and `(None, text)` for the user's text between them."""
    segments, start = [], 0
    for match in _BLOCK.finditer(text):
        segments.append((None, text[start : match.start()]))
        segments.append((match["name"], match[0]))
        start = match.end()
    segments.append((None, text[start:]))
    return [(name, part) for name, part in segments if name is not None or part]


def _join(segments: list[tuple[str | None, str]]) -> str:
    """Join the segments with one blank line between them; inside each, the user's text is kept as it was."""
    parts = [part.strip("\n") for name, part in segments if name is not None or part.strip()]
    return "\n" + "\n\n".join(parts) + "\n"


def _as_card(card: ModelCard | str | os.PathLike | None) -> ModelCard | None:
    if card is None or isinstance(card, ModelCard):
        return card
    path = Path(card)
    if not path.is_file():
        raise FileNotFoundError(f"existing_card {path} is not a file: pass a README.md path or a ModelCard.")
    return ModelCard.load(path)


# --------------------------------------------------------------------------- helpers: folders


def _draw_pictures(model: torch.nn.Module, dataset: Any, folder: Path) -> None:
    """Write `folder/prototypes/prototype_NNN*.png` and `folder/prototypes/gallery.png` (visualization module)."""
    from .visualization import save_prototype_images

    save_prototype_images(model, dataset, folder, gallery=True)


def _pictures_in(folder: Path) -> dict[int, str]:
    pictures = folder / PROTOTYPES_DIR
    if not pictures.is_dir():
        return {}
    return _prototype_file_map([path.relative_to(folder).as_posix() for path in pictures.glob("prototype_*.png")])


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
    recorded.dataset_name = _read_json(folder / "config.json").get("projection_dataset")
    return recorded.same_sources(read_provenance(model))


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
        _link_or_copy(path, new / relative)


def _link_or_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    if os.path.islink(source):
        os.symlink(os.readlink(source), target)
        return
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _swap_in(staging: Path, folder: Path, old_exists: bool) -> None:
    """Put `staging` at `folder`; the old content, if any, ends up at `staging`'s path (for deletion)."""
    if not old_exists:
        os.rename(staging, folder)
        return
    try:
        _exchange(staging, folder)
        return
    except OSError as error:
        if error.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    backup = staging.with_suffix(".old")
    os.rename(folder, backup)
    os.rename(staging, folder)  # a crash before this line is repaired by _finish_interrupted_swap
    os.rename(backup, staging)


def _exchange(first: Path, second: Path) -> None:
    """Swap two paths atomically with Linux's `renameat2(..., RENAME_EXCHANGE)`; OSError(ENOSYS) elsewhere."""
    if not sys.platform.startswith("linux"):
        raise OSError(errno.ENOSYS, "renameat2 is Linux-only")
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:  # glibc < 2.28, musl
        raise OSError(errno.ENOSYS, "this C library has no renameat2")
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(first), None, str(second))


def _finish_interrupted_swap(folder: Path) -> None:
    """Repair a two-rename swap cut short: no `folder`, its old copy at `.NAME.protopool-XXXX.old`."""
    if folder.exists():
        return
    for backup in sorted(folder.parent.glob(f".{glob.escape(folder.name)}.protopool-*.old")):
        new = backup.with_suffix(".new")
        if new.is_dir():  # the new folder was complete before the first rename: finish the swap
            logger.warning("Finishing an interrupted save of %s: moving %s into place.", folder, new)
            os.rename(new, folder)
            shutil.rmtree(backup)
        else:
            logger.warning("Restoring %s from %s, left by an interrupted save.", folder, backup)
            os.rename(backup, folder)
        return


# --------------------------------------------------------------------------- helpers: push


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
            _link_or_copy(path, staging / path.name)
    for name in _code_files(folder):
        _link_or_copy(folder / name, staging / name)
    model = ProtoPoolForImageClassification.from_pretrained(folder)
    if dataset is not None:
        _draw_pictures(model, dataset, staging)
    elif (folder / PROTOTYPES_DIR).is_dir():
        (staging / PROTOTYPES_DIR).mkdir()
        for path in sorted((folder / PROTOTYPES_DIR).glob("*.png")):
            _link_or_copy(path, staging / PROTOTYPES_DIR / path.name)
    card = folder / "README.md"
    return model, card if card.is_file() else None


def _code_files(folder: Path) -> list[str]:
    """The modeling code of a saved folder: the `auto_map` modules and the files they import relatively."""
    from transformers.dynamic_module_utils import get_relative_import_files

    auto_map = _read_json(folder / "config.json").get("auto_map") or {}
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


# --------------------------------------------------------------------------- helpers: formatting


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}): fix or delete it.") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}.")
    return data


def _unique(items: Iterator[str] | Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _architecture(config: ProtoPoolConfig) -> str:
    return config.backbone.split(".", 1)[0].replace("_", "-")


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _numbers(values: Sequence[float]) -> str:
    return "(" + ", ".join(_number(float(v)) for v in values) + ")"


def _value(value: Any) -> str:
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, str | int | bool) or value is None:
        return str(value)
    return json.dumps(value, sort_keys=True, default=str)


def _first(value: str | Sequence[str] | None) -> str | None:
    if isinstance(value, str) or value is None:
        return value
    return value[0] if value else None


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "es" if noun.endswith("s") else "s")


def _id_list(ids: Sequence[int], limit: int = 30) -> str:
    shown = ", ".join(str(p) for p in ids[:limit])
    return shown + (f", … ({len(ids) - limit} more)" if len(ids) > limit else "")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
