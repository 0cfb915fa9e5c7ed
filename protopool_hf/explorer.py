"""What the explorer app shows, without gradio: a loaded model, its folder's pictures and reports, as plain values.

`Explorer.load(model_or_path)` takes a model, a model folder or a Hub repo id (downloaded with `snapshot_download`, so
the repo's `prototypes/` pictures, `examples/` images and reports come with it). The folder layout it reads:

```
config.json, model.safetensors, ...    the model (save_pretrained)
prototypes/prototype_007.png           a prototype's crop (save_prototype_images), with _overlay / _source pictures
prototypes/nearest/prototype_007_1.png its nearest training patches, nearest first (`save_nearest_patches`)
examples/*.png|jpg|...                 a few images to try (the Explain tab lists them)
interpretability.json                  the interpretability report (`protopool-hf evaluate`)
all_results.json, metrics.json, ...    accuracy and other metrics (`card.load_metrics`)
```

`protopool_hf.app` draws these values with gradio. Shape alphabet: C classes, P prototypes, S slots per class.
"""

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
import PIL.ImageDraw
import torch

from .card import load_metrics
from .cli_messages import check_model_source, model_load_error, quiet_transformers_loading
from .data import IMAGE_EXTENSIONS
from .drawing import draw_box
from .explanation import Explanation, explain
from .images import UnreadableImageError, decode_image
from .metrics import REPORT_FILENAME
from .pictures import EXAMPLES_DIR, NEAREST_DIR, PROTOTYPES_DIR, nearest_patches, prototype_filenames
from .provenance import read_provenance
from .usage import prototype_classes


__all__ = [
    "EXAMPLES_DIR",
    "MIN_IMAGE_SIDE",
    "NEAREST_DIR",
    "BadImageError",
    "Explorer",
    "nearest_patch_files",
    "read_upload",
    "save_nearest_patches",
]

MIN_IMAGE_SIDE = 8
_NOTE = (110, 110, 110)


class BadImageError(ValueError):
    """An upload that cannot be explained (not an image, truncated, too small); the message says what to do.

    Example:
        ```python
        >>> from protopool_hf.explorer import BadImageError, read_upload
        >>> try:
        ...     read_upload(None)
        ... except BadImageError as error:
        ...     print(error)
        No image: upload a picture (PNG, JPEG, WebP, ...) or pick an example.

        ```
    """


def read_upload(path: str | os.PathLike | None) -> PIL.Image.Image:
    """Decode an uploaded file to RGB, or raise `BadImageError` with one line saying what is wrong and what to do."""
    if path is None:
        raise BadImageError("No image: upload a picture (PNG, JPEG, WebP, ...) or pick an example.")
    name = Path(path).name
    try:
        image = decode_image(os.fspath(path))
    except UnreadableImageError as error:
        cause = str(error.__cause__ or error).replace(os.fspath(path), name)
        raise BadImageError(
            f"Cannot read {name!r} as an image: it is no image file, or a truncated one ({cause}). "
            "Upload a complete PNG, JPEG or WebP picture."
        ) from error
    if min(image.size) < MIN_IMAGE_SIDE:
        raise BadImageError(
            f"{name!r} is {image.width}×{image.height} pixels: too small to show where a prototype fires. "
            f"Upload an image at least {MIN_IMAGE_SIDE} pixels on each side."
        )
    return image


def nearest_patch_files(folder: str | os.PathLike, prototype_id: int) -> list[Path]:
    """The nearest-patch pictures of a prototype in a model folder (`prototypes/nearest/prototype_007_<k>.png`)."""
    stem = Path(prototype_filenames(prototype_id)["crop"]).stem
    found = Path(folder) / PROTOTYPES_DIR / NEAREST_DIR
    files = [path for path in found.glob(f"{stem}_*.png") if path.stem.rsplit("_", 1)[1].isdigit()]
    return sorted(files, key=lambda path: int(path.stem.rsplit("_", 1)[1]))


def save_nearest_patches(
    model: torch.nn.Module,
    dataset: Any,
    folder: str | os.PathLike,
    prototype_ids: Sequence[int] | None = None,
    k: int = 5,
) -> dict[int, list[Path]]:
    """Write each prototype's `k` nearest training patches (source image with box) for the explorer to show.

    Every image of `dataset` goes through the model once per prototype (`pictures.nearest_patches`): pass a few
    hundred training images, not the whole set.

    Args:
        model: a `ProtoPoolForImageClassification`.
        dataset: training images (as for `pictures.render_prototypes`).
        folder: the model folder; the pictures go to `prototypes/nearest/`.
        prototype_ids: which prototypes; `None`: every prototype a class slot uses.
        k: patches per prototype.

    Returns:
        `{prototype id: [paths, nearest first]}`.
    """
    if prototype_ids is None:
        prototype_ids = sorted({int(p) for p in model.class_to_prototypes().flatten().tolist()})
    out = Path(folder) / PROTOTYPES_DIR / NEAREST_DIR
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for p in prototype_ids:
        stem = Path(prototype_filenames(p)["crop"]).stem
        paths = []
        for rank, patch in enumerate(nearest_patches(model, dataset, p, k), start=1):
            path = out / f"{stem}_{rank}.png"
            draw_box(patch.image, patch.box).save(path, format="PNG")
            paths.append(path)
        written[int(p)] = paths
    return written


@dataclass
class SlotRow:
    """One row of the "this looks like that" table."""

    owner: str
    slot: int
    prototype_id: int
    similarity: float
    weight: float
    contribution: float


@dataclass
class ExplainResult:
    """What the Explain tab shows for one image and one class."""

    explanation: Explanation
    probabilities: dict[str, float]
    picture: PIL.Image.Image
    rows: list[SlotRow]
    summary: str


@dataclass
class Explorer:
    """A model with what its folder holds, ready to be explored.

    Attributes:
        model: the model (one loaded here is in eval mode; `explain` runs a given one in eval mode for each call).
        folder: the local model folder (a Hub repo's download), or None for a model given as an object without one.
        name: how the app names the model (the path or repo id).

    Example:
        ```python
        >>> import PIL.Image
        >>> from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification
        >>> from protopool_hf.explorer import Explorer
        >>> config = ProtoPoolConfig(backbone="test_resnet", num_labels=2, num_prototypes=4, num_slots_per_class=2)
        >>> explorer = Explorer.load(ProtoPoolForImageClassification(config))
        >>> explorer.labels, explorer.projected, len(explorer.slots[0])
        (['LABEL_0', 'LABEL_1'], False, 2)
        >>> result = explorer.explain(PIL.Image.new("RGB", (80, 60), (200, 30, 30)))
        >>> sorted(result.probabilities) == explorer.labels and abs(sum(result.probabilities.values()) - 1) < 1e-5
        True

        ```
    """

    model: torch.nn.Module
    folder: Path | None
    name: str
    _placeholders: dict[int, PIL.Image.Image] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, model_or_path: Any) -> "Explorer":
        """An `Explorer` for a model object, a model folder or a Hub repo id."""
        if isinstance(model_or_path, torch.nn.Module):
            name = getattr(model_or_path.config, "_name_or_path", "") or ""
            folder = Path(name) if name and (Path(name) / "config.json").is_file() else None
            return cls(model_or_path, folder, name or type(model_or_path).__name__)  # explain() runs it in eval mode
        source = os.fspath(model_or_path)
        check_model_source(source)
        folder = Path(source).expanduser()
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            try:
                folder = Path(snapshot_download(source))
            except OSError as error:
                raise model_load_error(source, error) from error
        from transformers import AutoModelForImageClassification

        try:
            with quiet_transformers_loading():
                model = AutoModelForImageClassification.from_pretrained(folder)
        except OSError as error:
            raise model_load_error(source, error) from error
        return cls(model.eval(), folder, source)

    # ------------------------------------------------------------------ model facts
    @property
    def config(self) -> Any:
        """The model's config."""
        return self.model.config

    @property
    def labels(self) -> list[str]:
        """Class names, in class order (unique: a repeated name gets its id)."""
        names = [str(self.config.id2label.get(c, c)) for c in range(self.config.num_labels)]
        return [f"{n} ({c})" if names.count(n) > 1 else n for c, n in enumerate(names)]

    @property
    def projected(self) -> bool:
        """Whether the prototypes were projected onto training patches (so they have source pictures)."""
        return bool(read_provenance(self.model).projected_ids)

    @property
    def slots(self) -> list[list[int]]:
        """`[class][slot] -> prototype id` (argmax of the slot assignment)."""
        return self.model.class_to_prototypes().cpu().tolist()

    @property
    def examples(self) -> list[Path]:
        """The images of the folder's `examples/`, sorted by name."""
        if self.folder is None or not (self.folder / EXAMPLES_DIR).is_dir():
            return []
        return sorted(p for p in (self.folder / EXAMPLES_DIR).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)

    def picture(self, prototype_id: int, kind: str = "crop") -> Path | None:
        """The folder's picture of a prototype (`"crop"`, `"overlay"` or `"source"`), None if it has none."""
        if self.folder is None:
            return None
        path = self.folder / PROTOTYPES_DIR / prototype_filenames(prototype_id)[kind]
        return path if path.is_file() else None

    def nearest(self, prototype_id: int) -> list[Path]:
        """The folder's nearest training patches of a prototype, nearest first."""
        return [] if self.folder is None else nearest_patch_files(self.folder, prototype_id)

    def prototype_label(self, prototype_id: int) -> str:
        """`"prototype 7: Coat, Shirt"` (the classes whose slots use it)."""
        classes = prototype_classes(self.model)[prototype_id]
        names = ", ".join(self.labels[c] for c in classes[:4]) + (" ..." if len(classes) > 4 else "")
        return f"prototype {prototype_id}: {names or 'no class uses it'}"

    # ------------------------------------------------------------------ explain
    def explain(self, image: PIL.Image.Image, class_id: int | None = None, top_k: int = 5) -> ExplainResult:
        """Explain an image: probabilities, the "this looks like that" picture, the slot rows and a summary line."""
        top_k = max(1, min(int(top_k), self.config.num_labels))
        explanation = explain(self.model, image, top_k=top_k, class_id=class_id)
        labels = self.labels
        order = sorted(range(len(labels)), key=lambda c: -float(explanation.probabilities[c]))
        probabilities = {labels[c]: float(explanation.probabilities[c]) for c in order}
        picture = explanation.render(prototype_images=self._prototype_pictures(explanation))
        rows = [
            SlotRow(labels[s.class_id], s.slot, s.prototype_id, s.similarity, s.weight, s.contribution)
            for s in explanation.slots
        ]
        return ExplainResult(explanation, probabilities, picture, rows, self._summary(explanation))

    def _summary(self, explanation: Explanation) -> str:
        labels = self.labels
        total = math.fsum(s.contribution for s in explanation.slots)
        chosen, predicted = labels[explanation.class_id], labels[explanation.predicted_class]
        probability = float(explanation.probabilities[explanation.class_id])
        if explanation.class_id == explanation.predicted_class:
            head = f"**Why {chosen}?** It is the predicted class ({probability:.1%})."
        else:
            gap = float(explanation.logits[explanation.predicted_class]) - explanation.logit
            head = (
                f"**Why not {chosen}?** Its probability is {probability:.1%}; its logit is {gap:.3f} below "
                f"the predicted {predicted}'s."
            )
        return (
            f"{head} Logit {explanation.logit:.3f} = the sum of {len(explanation.slots)} slots' "
            f"similarity × weight ({total:.3f})."
        )

    def _prototype_pictures(self, explanation: Explanation) -> Any:
        """The folder's `prototypes/` when it has pictures, else a note in place of each prototype's source patch."""
        ids = {s.prototype_id for s in explanation.slots}
        if self.folder is not None and all(self.picture(p) is not None for p in ids):
            return self.folder / PROTOTYPES_DIR
        if not self._placeholders:
            reason = ("prototype never", "projected: no", "source patch") if not self.projected else None
            self._placeholders = {
                p: _note_picture(reason or ("no picture of", "this prototype", "in the folder"))
                for p in range(self.config.num_prototypes)
            }
        pictures: dict[int, Any] = dict(self._placeholders)
        for p in ids:
            found = self.picture(p, "overlay") or self.picture(p, "source") or self.picture(p)
            if found is not None:
                pictures[p] = found
        return pictures

    # ------------------------------------------------------------------ prototypes, classes
    def prototype_uses(self, prototype_id: int) -> list[tuple[int, int, float]]:
        """`[(class id, slot, last-layer weight of the slot to its class)]` of the slots using a prototype."""
        weights = self.model.head.last_layer.weight.detach().float().cpu()
        num_slots = self.config.num_slots_per_class
        return [
            (c, s, float(weights[c, c * num_slots + s]))
            for c, row in enumerate(self.slots)
            for s, p in enumerate(row)
            if p == prototype_id
        ]

    def provenance(self, prototype_id: int) -> str:
        """Where the projection took the prototype from, in words (or why it has no source)."""
        source = read_provenance(self.model)
        index = int(source.image_index[prototype_id])
        if index < 0:
            if not source.projected_ids:
                return "The model was never projected: this prototype is a learned vector with no source image."
            return "No class slot used this prototype at projection time: it has no source image."
        label = int(source.label[prototype_id])
        where = f"row {int(source.row[prototype_id])}, column {int(source.col[prototype_id])}"
        dataset = source.dataset_name or "the projection dataset"
        name = self.labels[label] if 0 <= label < len(self.labels) else str(label)
        return (
            f"Projected onto image {index} of {dataset} (class {name}), feature-map {where}, squared distance "
            f"{float(source.distance[prototype_id]):.4g}."
        )

    # ------------------------------------------------------------------ report
    def reports(self) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """The folder's interpretability report (None if absent) and its metrics (`{}` if none)."""
        if self.folder is None:
            return None, {}
        report_path = self.folder / REPORT_FILENAME
        report = json.loads(report_path.read_text()) if report_path.is_file() else None
        return report, load_metrics(self.folder)


def _note_picture(lines: Sequence[str], size: int = 176) -> PIL.Image.Image:
    """A grey square with a short note, drawn where a prototype picture would be."""
    picture = PIL.Image.new("RGB", (size, size), (236, 236, 236))
    draw = PIL.ImageDraw.Draw(picture)
    for k, line in enumerate(lines):
        draw.text((12, size // 2 - 24 + 16 * k), line, fill=_NOTE)
    return picture


def flatten_report(report: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """`[(dotted key, value)]` of a report's scalar fields (lists and None are left out), numbers to 4 digits."""
    rows = []
    for key, value in report.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += flatten_report(value, f"{name}.")
        elif isinstance(value, bool | str):
            rows.append((name, str(value)))
        elif isinstance(value, int | float):
            rows.append((name, f"{value:.4g}" if isinstance(value, float) else str(value)))
    return rows
