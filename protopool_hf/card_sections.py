"""The text of each model-card section, written from a ProtoPool model (`protopool_hf.card` renders the card).

`section_values` returns the values the card template (`templates/model_card.md`) is filled with: the summary, the
prototypes and their pictures, the classes and the prototypes of their slots, the model table, the training
hyperparameters and the evaluation table.
"""

import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .configuration_protopool import ProtoPoolConfig
from .pictures import PROTOTYPES_DIR, prototype_filenames
from .provenance import read_provenance
from .torch_utils import evaluating
from .usage import slot_counts, used_prototypes


__all__ = ["section_values"]

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


def section_values(
    model: torch.nn.Module,
    *,
    repo_id: str | None,
    model_name: str,
    dataset_name: str | None,
    prototype_files: dict[int, str],
    gallery_file: str | None,
    training_args: Any | None,
    metric_rows: list[tuple[str | None, str, Any]],
) -> dict[str, str]:
    """The template's values: `{placeholder: text}` for every `{{ placeholder }}` of `templates/model_card.md`.

    Args:
        model: a `ProtoPoolForImageClassification`.
        repo_id: the Hub repo the usage snippets load from; a placeholder when `None`.
        model_name: the card's title.
        dataset_name: the dataset named in the summary, if any.
        prototype_files: `{prototype id: picture path}` the class table links to.
        gallery_file: the gallery picture, if any.
        training_args: `TrainingArguments`, a `ProtoPoolRecipe` or a mapping; `None` says none were recorded.
        metric_rows: `(split, metric, value)` rows of the evaluation table.
    """
    return _template_values(model, repo_id, model_name, dataset_name) | {
        "prototypes": _prototypes_text(model, prototype_files, gallery_file),
        "class_intro": _class_intro(model),
        "class_table": _class_table(model, prototype_files),
        "model_table": _model_table(model),
        "training": _training_text(training_args),
        "evaluation": _evaluation_text(metric_rows),
    }


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
        names = {kind: name.replace("000", "NNN", 1) for kind, name in prototype_filenames(0).items()}
        lines.append(
            f"{projected} of the {provenance.num_prototypes} prototypes were projected onto patches of training images"
            f"{source}. `{PROTOTYPES_DIR}/{names['crop']}` is prototype NNN's patch, `{names['overlay']}` its "
            f"source image with the similarity heat map and the high-activation box, `{names['source']}` the "
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
    used = used_prototypes(model)
    shared = int((slot_counts(model) > 1).sum())
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


def _feature_grid(model: torch.nn.Module) -> str:
    """`"H×W"` of the latent map for one input of the configured size (one forward of the backbone, in eval mode)."""
    _, height, width = model.config.data_config()["input_size"]
    parameter = next(model.parameters())
    with evaluating(model):
        feature_map = model.forward_features(torch.zeros(1, 3, height, width, device=parameter.device))
    return f"{feature_map.shape[-2]}×{feature_map.shape[-1]}"


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


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "es" if noun.endswith("s") else "s")


def _id_list(ids: Sequence[int], limit: int = 30) -> str:
    shown = ", ".join(str(p) for p in ids[:limit])
    return shown + (f", … ({len(ids) - limit} more)" if len(ids) > limit else "")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
