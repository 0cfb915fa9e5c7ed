"""Interpretability metrics of a ProtoPool model: `evaluate_interpretability` -> `InterpretabilityReport`.

Shape alphabet: N images, C classes, P prototypes, S slots per class, H, W feature-map size, H_in, W_in model input.

The report (definitions and sources in `docs/metrics.md` and in the dataclasses' docstrings) has four groups:

- **structure** (the model alone, and one forward pass over the evaluation images): prototypes used, duplicate
  slots, classes per prototype, explanation size;
- **object masks**: how much of the boxes the explanations show is object: the projected prototypes' source boxes
  and the top slots' boxes on the evaluation images, plus the nearest latent cell of the top slots;
- **parts**: consistency and stability (Huang et al., ICCV 2023), purity (Nauta et al., CVPR 2023), see `parts`;
- **deletion**: faithfulness of the boxes against random boxes of the same sizes, see `deletion`.

The box-based metrics are computed under each localisation of `localisation` (`"upsampled"`, the latent map the
pictures draw, and `"gradient"`, SmoothGrad of the prototype's similarity), see `localisation`.

ProtoPool slots map to the pool by `model.class_to_prototypes()` (the argmax over the pool of the slot logits, no
Gumbel noise); slots of one class that share a prototype count once wherever a list of prototypes is ranked.
"""

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from .losses import BACKGROUND_BELOW  # a box with less object than this is background


__all__ = [
    "MASK_RULES",
    "REPORT_FILENAME",
    "BoxStats",
    "InterpretabilityReport",
    "LocalisationScores",
    "ReportCard",
    "load_masks",
    "mask_reader",
    "nonzero_mask",
    "report_card",
    "structure_metrics",
]

REPORT_FILENAME = "interpretability.json"
MOSTLY_OBJECT = 0.5
PERCENTILE = 95  # the pictures' high-activation box
REFERENCE_SIZE = 224  # the input size of the references' pixel parameters (scaled to the model's input)
CONSISTENCY_HALF_SIZE = 36
CONSISTENCY_THRESHOLD = 0.8
STABILITY_NOISE = (0.2, 0.25)  # std, clip: added to the normalised input
PURITY_PATCH = 32
PURITY_TOP_K = 10


def nonzero_mask(image: PIL.Image.Image) -> np.ndarray:
    """The object mask "raw pixel > 0" (Fashion-MNIST's objects lie on an exact 0 background): `(H, W)` bool."""
    array = np.asarray(image)
    return (array.reshape(*array.shape[:2], -1) > 0).any(axis=-1)


MASK_RULES: dict[str, Callable[[PIL.Image.Image], np.ndarray]] = {"fashion-mnist": nonzero_mask}

Masks = Sequence[np.ndarray] | Callable[[PIL.Image.Image], np.ndarray] | str


def load_masks(path: str | os.PathLike, flag: str = "") -> list[np.ndarray]:
    """Object masks from a `.npy` array, or the only (or `masks`) array of a `.npz` file, of booleans `(N, H, W)`.

    Args:
        path: the file.
        flag: how error messages name the file's option (e.g. `"--masks "`).

    Returns:
        One `(H, W)` boolean mask per image.
    """
    path = Path(path)
    name = f"{flag}{str(path)!r}"
    if path.suffix not in (".npy", ".npz"):
        raise ValueError(f"{name}: pass a .npy or .npz file of booleans (N, H, W), or a rule {sorted(MASK_RULES)}.")
    if not path.is_file():
        raise FileNotFoundError(f"{name} does not exist: check the path.")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"{name} could not be read as a numpy file: {error}.") from error
    if path.suffix == ".npz":
        with loaded:
            names = list(loaded.files)
            if "masks" not in names and len(names) != 1:
                raise ValueError(f"{name} holds arrays {names}: name the masks array `masks`.")
            loaded = loaded["masks" if "masks" in names else names[0]]
    if loaded.ndim != 3 or loaded.dtype != bool:
        raise ValueError(
            f"{name} holds a {loaded.dtype} array of shape {loaded.shape}: save booleans of shape (N, H, W), one "
            "mask per evaluated image, e.g. np.save(path, masks.astype(bool))."
        )
    return list(loaded)


def mask_reader(masks: Masks | None, source: str) -> Callable[[int, PIL.Image.Image], np.ndarray] | None:
    """`masks` (a rule name, a function or one array per row) -> `reader(row, image)` returning the checked mask.

    Raises:
        ValueError: an unknown rule; the reader raises on a mask whose shape is not the image's, naming `source`.
    """
    if masks is None:
        return None
    if isinstance(masks, str):
        if masks not in MASK_RULES:
            raise ValueError(f"Unknown mask rule {masks!r}: use one of {sorted(MASK_RULES)}, or pass boolean arrays.")
        rule = MASK_RULES[masks]
        return lambda row, image: rule(image)
    if callable(masks):
        return lambda row, image: _checked_mask(masks(image), row, image, f"The mask function's output for {source}")
    return lambda row, image: _checked_mask(masks[row], row, image, source)


def _checked_mask(mask: Any, row: int, image: PIL.Image.Image, source: str) -> np.ndarray:
    array = np.asarray(mask)
    if array.shape != (image.height, image.width):
        raise ValueError(
            f"{source}[{row}] has shape {array.shape}, but the image at row {row} is {image.height}x{image.width} "
            "(H x W): give one boolean mask per image, the size of the image as the dataset decodes it."
        )
    return array.astype(bool)


@dataclass
class BoxStats:
    """How much of a set of boxes is object (mask pixels).

    Attributes:
        count: boxes measured.
        background_share: share of the boxes with less than 10 % object pixels.
        mean_object_share: mean share of object pixels in a box.
        half_object_share: share of the boxes with at least 50 % object pixels.

    Example:
        ```python
        >>> from protopool_hf.metrics import BoxStats
        >>> BoxStats.of([0.0, 0.05, 0.6, 1.0])  # the object shares of four boxes
        BoxStats(count=4, background_share=0.5, mean_object_share=0.4125, half_object_share=0.5)

        ```
    """

    count: int
    background_share: float | None
    mean_object_share: float | None
    half_object_share: float | None

    @classmethod
    def of(cls, shares: Sequence[float]) -> "BoxStats":
        """The statistics of the object shares of some boxes (all None without boxes)."""
        if not shares:
            return cls(0, None, None, None)
        array = np.asarray(shares, dtype=np.float64)
        return cls(
            len(array),
            float((array < BACKGROUND_BELOW).mean()),
            float(array.mean()),
            float((array >= MOSTLY_OBJECT).mean()),
        )


@dataclass
class LocalisationScores:
    """The box-based metrics under one localisation (None: not measured, e.g. no masks or parts given).

    Attributes:
        prototype_sources: `BoxStats` of the used, projected prototypes' boxes on their source images.
        background_prototypes: the ids of those prototypes whose source box is background (under 10 % object).
        test_top_slots: `BoxStats` of the top slots' boxes on the evaluation images.
        consistency: Huang et al.'s consistency, % of (class, prototype) pairs hitting one part in >= 80 % of the
            class's images (box ±36 px at 224, scaled, around the map's peak).
        stability: Huang et al.'s stability, % of images whose part hits survive noise (std 0.2, clipped ±0.25).
        purity_mean: PIP-Net's purity (best part's presence in the 32 px patch at 224, scaled, over the top-10
            images), mean over used prototypes.
        purity_std: its standard deviation.
        purity_part_related_share: share of used prototypes with purity > 0.5.
        deletion_auc: area under the predicted class's probability as the top slots' boxes are removed.
        random_deletion_auc: the same for random boxes of the same sizes.
        deletion_gain: random_deletion_auc − deletion_auc (> 0: the boxes hold more evidence than random ones).
        deletion_curve: the mean curve, step 0 the intact image.
        random_deletion_curve: the mean random curve.

    Example:
        ```python
        >>> from protopool_hf.metrics import BoxStats, LocalisationScores
        >>> scores = LocalisationScores(test_top_slots=BoxStats.of([0.9, 1.0]), deletion_auc=0.3, random_deletion_auc=0.5)
        >>> scores.test_top_slots.mean_object_share, scores.consistency  # None: not measured (no parts given)
        (0.95, None)

        ```
    """

    prototype_sources: BoxStats | None = None
    background_prototypes: list[int] | None = None
    test_top_slots: BoxStats | None = None
    consistency: float | None = None
    stability: float | None = None
    purity_mean: float | None = None
    purity_std: float | None = None
    purity_part_related_share: float | None = None
    deletion_auc: float | None = None
    random_deletion_auc: float | None = None
    deletion_gain: float | None = None
    deletion_curve: list[float] | None = None
    random_deletion_curve: list[float] | None = None


@dataclass
class InterpretabilityReport:
    """What `evaluate_interpretability` measured; `to_dict()` is JSON-safe (None where not measured).

    Attributes:
        num_images: evaluation images of the forward pass (structure metrics, accuracy).
        num_localised_images: the first images the box-based metrics used (`max_images`).
        accuracy: top-1 accuracy on the evaluation images (None without labels).
        num_prototypes: P.
        prototypes_used: prototypes at least one class slot uses (argmax of the slot logits).
        prototypes_used_share: prototypes_used / P.
        duplicate_slots: class slots whose prototype another slot of the same class also uses, in total.
        duplicate_slots_per_class: the same per class.
        classes_per_prototype_mean: mean number of classes using a used prototype.
        classes_per_prototype_max: the largest such number.
        explanation_size_mean: mean over images of the fewest slots whose positive contributions to the winning
            logit reach 90 % of all positive contributions to it.
        explanation_size_median: its median.
        top_slot_cells_background_share: over the first images, the predicted class's top slots (distinct
            prototypes, up to `top_slots`): share whose nearest latent cell covers under 10 % object pixels
            (independent of the localisation).
        top_slot_cells_mean_object_share: mean object share of those cells.
        localisations: `LocalisationScores` per localisation name.
        more_faithful_localisation: the localisation with the larger deletion gain.
        settings: the parameters used (thresholds, sizes in pixels of the model input, seeds, annotation sources).

    Example:
        ```python
        >>> import datasets, numpy as np, PIL.Image
        >>> from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification, evaluate_interpretability
        >>> config = ProtoPoolConfig(
        ...     backbone="test_resnet", num_labels=2, num_prototypes=4, num_slots_per_class=2, input_size=[3, 64, 64]
        ... )
        >>> rng = np.random.default_rng(0)
        >>> images = [PIL.Image.fromarray(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)) for _ in range(4)]
        >>> ds = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 0, 1]})
        >>> report = evaluate_interpretability(ProtoPoolForImageClassification(config).eval(), ds, localisation="upsampled")
        >>> report.num_images, report.num_prototypes, report.to_dict()["localisations"]["upsampled"]["consistency"]
        (4, 4, None)

        ```
    """

    num_images: int
    num_localised_images: int
    accuracy: float | None
    num_prototypes: int
    prototypes_used: int
    prototypes_used_share: float
    duplicate_slots: int
    duplicate_slots_per_class: list[int]
    classes_per_prototype_mean: float
    classes_per_prototype_max: int
    explanation_size_mean: float | None
    explanation_size_median: float | None
    top_slot_cells_background_share: float | None = None
    top_slot_cells_mean_object_share: float | None = None
    localisations: dict[str, LocalisationScores] = field(default_factory=dict)
    more_faithful_localisation: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (NaN and infinities become None)."""
        return _json_safe(asdict(self))

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write `to_dict()` as JSON: to a temporary file next to `path`, then renamed onto it (never half-written).

        Args:
            path: the file, or a folder (e.g. the model folder) to write `interpretability.json` into.
            overwrite: replace an existing file (default: refuse).

        Returns:
            The path written.
        """
        path = Path(path)
        if path.is_dir():
            path = path / REPORT_FILENAME
        if path.exists() and not overwrite:
            raise FileExistsError(f"{str(path)!r} already exists: pass overwrite=True (--overwrite) to replace it.")
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            temporary.write_text(text, encoding="utf-8")
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        return path


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------- structure


def structure_metrics(class_to_prototypes: torch.Tensor | np.ndarray, num_prototypes: int) -> dict[str, Any]:
    """Prototypes used, duplicate slots and classes per prototype of a `(C, S)` slot -> prototype map."""
    slots = np.asarray(class_to_prototypes, dtype=np.int64)
    used = sorted({int(p) for p in slots.flatten()})
    duplicates = []
    for row in slots:
        _, counts = np.unique(row, return_counts=True)
        duplicates.append(int(counts[counts > 1].sum()))
    classes = [len({c for c in range(len(slots)) if p in slots[c]}) for p in used]
    return {
        "num_prototypes": int(num_prototypes),
        "prototypes_used": len(used),
        "prototypes_used_share": len(used) / num_prototypes,
        "duplicate_slots": int(sum(duplicates)),
        "duplicate_slots_per_class": duplicates,
        "classes_per_prototype_mean": float(np.mean(classes)),
        "classes_per_prototype_max": int(max(classes)),
    }


def explanation_size(contributions: np.ndarray, share: float = 0.9) -> int:
    """The fewest slots whose largest positive contributions reach `share` of all positive contributions (0 if none)."""
    positive = np.sort(np.clip(np.asarray(contributions, dtype=np.float64), 0, None))[::-1]
    total = positive.sum()
    if total <= 0:
        return 0
    return int(np.searchsorted(np.cumsum(positive), share * total * (1 - 1e-12)) + 1)


def top_prototypes(slot_contributions: np.ndarray, slot_prototypes: np.ndarray, k: int) -> list[int]:
    """The distinct prototypes of a class's slots, by decreasing contribution, at most `k` (`(S,)` inputs)."""
    order = np.argsort(-np.asarray(slot_contributions), kind="stable")
    return list(dict.fromkeys(int(slot_prototypes[s]) for s in order))[:k]


# --------------------------------------------------------------------------- the model card

# (report key, name, one-line meaning); box-based keys are read under every localisation.
_CARD_ROWS = (
    ("accuracy", "accuracy", "top-1 accuracy on the evaluated images"),
    ("prototypes_used_share", "prototypes used", "share of the pool that some class slot uses"),
    ("duplicate_slots", "duplicate slots", "class slots whose prototype another slot of the same class also uses"),
    ("classes_per_prototype_mean", "classes per prototype", "mean number of classes sharing a used prototype"),
    ("explanation_size_mean", "explanation size", "slots carrying 90 % of the winning logit (mean over images)"),
    (
        "top_slot_cells_background_share",
        "background top-slot cells",
        "share of the top slots' nearest latent cells with under 10 % object pixels",
    ),
)
_LOCALISED_ROWS = (
    (
        "prototype_sources.background_share",
        "background prototypes",
        "share of used prototypes whose source box has under 10 % object pixels (lower is better)",
    ),
    (
        "test_top_slots.background_share",
        "background evidence",
        "share of the top slots' boxes on test images with under 10 % object pixels (lower is better)",
    ),
    ("test_top_slots.mean_object_share", "object share of evidence", "mean share of object pixels in those boxes"),
    ("consistency", "consistency (%)", "prototypes hitting the same part in >= 80 % of their class's images"),
    ("stability", "stability (%)", "images whose part hits survive input noise"),
    ("purity_mean", "purity", "best part's presence in a prototype's top-10 patches (mean)"),
    ("deletion_auc", "deletion AUC", "probability left as the top slots' boxes are removed (lower is more faithful)"),
    ("random_deletion_auc", "random deletion AUC", "the same for random boxes of the same sizes"),
)


@dataclass
class ReportCard:
    """The report as a model card shows it.

    Attributes:
        markdown: a section body: a table of the metrics with their one-line meanings.
        model_index: the numeric entries for `model-index` eval results: `{"type", "name", "value"}` each, to pass
            as `huggingface_hub.EvalResult(metric_type=..., metric_name=..., metric_value=...)`.

    Example:
        ```python
        >>> from protopool_hf.metrics import report_card
        >>> card = report_card({"num_images": 4, "num_localised_images": 4, "accuracy": 0.5, "prototypes_used_share": 0.75})
        >>> card.markdown.splitlines()[2:4], [entry["type"] for entry in card.model_index]
        (['| metric | value | meaning |', '|---|---|---|'], ['interpretability/accuracy', 'interpretability/prototypes_used_share'])

        ```
    """

    markdown: str
    model_index: list[dict[str, Any]]


def _lookup(content: Mapping[str, Any], key: str) -> Any:
    for part in key.split("."):
        if not isinstance(content, Mapping):
            return None
        content = content.get(part)
    return content


def _format(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "–"
    return str(value) if isinstance(value, int) else f"{value:.3g}"


def report_card(report: "InterpretabilityReport | Mapping[str, Any]") -> ReportCard:
    """Render an interpretability report (or its `to_dict()`, e.g. read from `interpretability.json`) for a card.

    Returns:
        A `ReportCard`: the markdown table (metrics not measured are left out) and the `model-index` entries.
    """
    content = report.to_dict() if isinstance(report, InterpretabilityReport) else dict(report)
    localisations = list((content.get("localisations") or {}).keys())
    lines = [
        f"Measured on {content.get('num_images')} images ({content.get('num_localised_images')} for the box-based "
        "metrics) with `protopool_hf.evaluate_interpretability`; definitions in the protopool-hf metrics docs.",
        "",
        "| metric | value | meaning |",
        "|---|---|---|",
    ]
    entries = []
    for key, name, meaning in _CARD_ROWS:
        value = content.get(key)
        if value is not None:
            lines.append(f"| {name} | {_format(value)} | {meaning} |")
            entries.append({"type": f"interpretability/{key}", "name": name, "value": value})
    rows = []
    for key, name, meaning in _LOCALISED_ROWS:
        values = [_lookup(content["localisations"][m], key) for m in localisations]
        if all(v is None for v in values):
            continue
        rows.append(f"| {name} | " + " | ".join(_format(v) for v in values) + f" | {meaning} |")
        for method, value in zip(localisations, values, strict=True):
            if isinstance(value, int | float) and not isinstance(value, bool):
                entries.append(
                    {"type": f"interpretability/{method}/{key}", "name": f"{name} ({method})", "value": value}
                )
    if rows:
        header = ["metric", *(f"{m} boxes" for m in localisations), "meaning"]
        lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header), *rows]
    if content.get("more_faithful_localisation"):
        lines += [
            "",
            f"The deletion check finds the **{content['more_faithful_localisation']}** localisation more faithful.",
        ]
    return ReportCard("\n".join(lines) + "\n", entries)
