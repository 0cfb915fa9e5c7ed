"""Model cards of ProtoPool models: their metadata, rendering from the model, and updating a card someone edited.

A card is rendered from `templates/model_card.md`, the text of each section written by `protopool_hf.card_sections`.
The sections it writes sit between `<!-- protopool-hf:begin NAME -->` and `<!-- protopool-hf:end NAME -->`; given an
existing card, `render_model_card` replaces only those, keeps everything else the user wrote, and merges the metadata
(`merge_model_cards`). `load_metrics` reads the last evaluation a Trainer left in a folder, for the card's results.
An interpretability report (`protopool_hf.metrics`, the folder's `interpretability.json`) adds the section
"Interpretability" after the evaluation and its numbers to the `model-index` (`render_model_card(interpretability=)`).
"""

import logging
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import yaml_dump

from .atomic import read_json
from .card_sections import section_values
from .configuration_protopool import ProtoPoolConfig
from .metrics import InterpretabilityReport, ReportCard, report_card
from .pictures import parse_prototype_filename


__all__ = [
    "DEFAULT_TAGS",
    "LIBRARY_NAME",
    "METRIC_FILES",
    "SECTIONS",
    "ProtoPoolModelCardData",
    "backbone_hub_id",
    "load_metrics",
    "merge_model_cards",
    "render_model_card",
]

logger = logging.getLogger(__name__)

LIBRARY_NAME = "protopool-hf"
PIPELINE_TAG = "image-classification"
DEFAULT_TAGS = ("protopool", "prototype-network", "interpretability", "timm")
TEMPLATE_PATH = Path(__file__).parent / "templates" / "model_card.md"
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
    "interpretability",
    "limitations",
    "citation",
)
_BLOCK = re.compile(r"<!-- protopool-hf:begin (?P<name>[\w-]+) -->.*?<!-- protopool-hf:end (?P=name) -->", re.DOTALL)
# Bodies of the cards transformers writes on its own; such a card is replaced, not kept as the user's text.
_GENERATED_CARD_MARKERS = (
    "This model card has been automatically generated.",  # PreTrainedModel.push_to_hub's default card
    "This model card has been generated automatically according to the information the Trainer",  # Trainer's draft
)
# The files a Trainer writes its evaluation to, read in this order (later ones win).
METRIC_FILES = ("all_results.json", "eval_results.json", "test_results.json", "metrics.json")
# The `model-index` metric types of an interpretability report (`protopool_hf.metrics.report_card`) start with this.
_REPORT_METRIC_PREFIX = "interpretability/"
_SPLITS = {"eval": "validation", "validation": "validation", "test": "test", "train": "train"}
# Numbers a Trainer logs next to its metrics that are not quality metrics.
_NOT_A_METRIC = re.compile(
    r"loss|runtime|per_second|epoch|flos|preparation_time|^(cross_entropy|cluster|separation|orthogonality|l1)$"
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
        >>> from protopool_hf.card import ProtoPoolModelCardData
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
    extra_sections: Mapping[str, str] | None = None,
    interpretability: InterpretabilityReport | Mapping[str, Any] | None = None,
) -> ModelCard:
    r"""Render the model card of a ProtoPool model from the template shipped in the package.

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
        extra_sections: more sections, `{name: markdown}` (e.g. `{"interpretability": "## Interpretability\n..."}`),
            placed after the evaluation and interpretability sections, each as a protopool-hf block NAME (letters,
            digits, `_`, `-`) that later updates replace. `None` keeps the extra sections of `existing_card`; `{}`
            drops them. To publish numbers as `model-index` eval results too, add them to `metrics`.
        interpretability: an `InterpretabilityReport` or its `to_dict()` (the content of `interpretability.json`):
            the section "Interpretability" (each metric with its one-line meaning) and, with a `dataset_name`, its
            numbers as `model-index` eval results on the split `"test"` (metric types `interpretability/...`). The
            report describes the weights it was measured on, so `None` leaves the section and those results out,
            also when `existing_card` had them.

    Returns:
        The `huggingface_hub.ModelCard`.

    Example:
        ```python
        >>> from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification
        >>> from protopool_hf.card import render_model_card
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
        rows = [
            (result.dataset_split, result.metric_type, result.metric_value)
            for result in data.eval_results
            if not _is_report_result(result)
        ]
    new_results = metrics is not None or bool(data.eval_results)
    report = report_card(interpretability) if interpretability is not None else None
    old_results = (existing.data.eval_results or []) if existing is not None else []
    replace_results = new_results or report is not None or any(_is_report_result(r) for r in old_results)
    if replace_results:
        _set_results(data, old_results if not new_results else None, report, dataset_name, model_name)
    values = {"interpretability": report.markdown.strip("\n") if report is not None else ""} | section_values(
        model,
        repo_id=repo_id,
        model_name=model_name,
        dataset_name=dataset_name,
        prototype_files=files,
        gallery_file=gallery_file,
        training_args=training_args,
        metric_rows=rows,
    )
    ours = ModelCard.from_template(data, template_path=str(TEMPLATE_PATH), **values)
    if not ours.text.endswith("\n"):  # Jinja drops the template's final newline
        ours.text += "\n"
    extra = _extra_blocks(extra_sections, existing)
    if extra:
        end = f"<!-- protopool-hf:end {'interpretability' if report is not None else 'evaluation'} -->"
        ours.text = ours.text.replace(end, end + "".join(f"\n\n{block}" for block in extra), 1)
    keep = [
        name for name, missing in (("training", training_args is None), ("evaluation", not new_results)) if missing
    ]
    if existing is None:
        return ours
    return merge_model_cards(ours, existing, keep_sections=keep, replace_results=replace_results)


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
        >>> from protopool_hf.card import merge_model_cards
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


def load_metrics(folder: str | os.PathLike) -> dict[str, Any]:
    """The last evaluation a Trainer left in its output folder, `{}` if none.

    Reads `all_results.json`, `eval_results.json`, `test_results.json` and `metrics.json` (later files win); without
    them, the last `eval_*` entry of `trainer_state.json`'s log history.
    """
    folder = Path(folder)
    metrics: dict[str, Any] = {}
    for name in METRIC_FILES:
        if (folder / name).is_file():
            metrics |= read_json(folder / name)
    if not metrics and (folder / "trainer_state.json").is_file():
        history = read_json(folder / "trainer_state.json").get("log_history") or []
        evaluations = [entry for entry in history if any(key.startswith("eval_") for key in entry)]
        metrics = dict(evaluations[-1]) if evaluations else {}
    return metrics


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


def _is_report_result(result: EvalResult) -> bool:
    return str(result.metric_type).startswith(_REPORT_METRIC_PREFIX)


def _set_results(
    data: ProtoPoolModelCardData,
    kept: list[EvalResult] | None,
    report: ReportCard | None,
    dataset_name: str | None,
    model_name: str,
) -> None:
    """Set `data.eval_results` to the quality results (`kept` when given, else its own) and the report's numbers."""
    if kept is not None:  # no new evaluation: the existing card's stays
        data.eval_results = [result for result in kept if not _is_report_result(result)] or None
        data.metrics = _unique(result.metric_type for result in data.eval_results or []) or None
    results = [result for result in data.eval_results or [] if not _is_report_result(result)]
    if report is not None and report.model_index:
        if dataset_name:
            results += [
                EvalResult(
                    task_type=PIPELINE_TAG,
                    dataset_type=dataset_name,
                    dataset_name=dataset_name,
                    dataset_split="test",
                    metric_type=entry["type"],
                    metric_name=entry["name"],
                    metric_value=entry["value"],
                )
                for entry in report.model_index
            ]
        else:
            logger.warning(
                "The card shows the interpretability report in its body only: pass dataset_name= (a Hub dataset id) "
                "to publish its numbers as model-index eval results."
            )
    data.eval_results = results or None
    if results:
        data.model_name = data.model_name or model_name


def _prototype_file_map(prototype_files: Mapping[int, str] | Sequence[str] | None) -> dict[int, str]:
    if prototype_files is None:
        return {}
    if isinstance(prototype_files, Mapping):
        return {int(p): Path(path).as_posix() for p, path in prototype_files.items()}
    if isinstance(prototype_files, str):
        raise ValueError("prototype_files must be a mapping or a list of paths, not one string.")
    found = {}
    for path in prototype_files:
        parsed = parse_prototype_filename(Path(path).name)
        if parsed is not None and parsed[1] == "crop":
            found[parsed[0]] = Path(path).as_posix()
    return dict(sorted(found.items()))


def _extra_blocks(extra_sections: Mapping[str, str] | None, existing: ModelCard | None) -> list[str]:
    """The extra sections as protopool-hf blocks; with `None`, the blocks of `existing` that are not ours."""
    if extra_sections is None:
        old = _split_blocks(existing.text) if existing is not None else []
        return [block for name, block in old if name is not None and name not in SECTIONS]
    if not isinstance(extra_sections, Mapping):
        raise ValueError(f"extra_sections must be a mapping of section name to markdown, got {extra_sections!r}.")
    blocks = []
    for name, body in extra_sections.items():
        if not isinstance(name, str) or not re.fullmatch(r"[\w-]+", name) or name in SECTIONS:
            raise ValueError(
                f"extra_sections name {name!r} must be letters, digits, '_' or '-', and not one of the card's own "
                f"sections ({', '.join(SECTIONS)}): rename it."
            )
        if not isinstance(body, str) or "<!-- protopool-hf:" in body:
            raise ValueError(f"extra_sections[{name!r}] must be markdown text without protopool-hf block markers.")
        text = body.strip("\n")
        blocks.append(f"<!-- protopool-hf:begin {name} -->\n{text}\n<!-- protopool-hf:end {name} -->")
    return blocks


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


def _unique(items: Iterator[str] | Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _architecture(config: ProtoPoolConfig) -> str:
    return config.backbone.split(".", 1)[0].replace("_", "-")


def _first(value: str | Sequence[str] | None) -> str | None:
    if isinstance(value, str) or value is None:
        return value
    return value[0] if value else None
