"""Interpretability metrics of a ProtoPool model: `evaluate_interpretability` -> `InterpretabilityReport`.

Shape alphabet: N images, C classes, P prototypes, S slots per class, H, W feature-map size, H_in, W_in model input.

The report (definitions and sources in `docs/metrics.md` and in `FIELDS`) has four groups:

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

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch


__all__ = [
    "MASK_RULES",
    "REPORT_FILENAME",
    "BoxStats",
    "InterpretabilityReport",
    "LocalisationScores",
    "nonzero_mask",
    "structure_metrics",
]

REPORT_FILENAME = "interpretability.json"
BACKGROUND_BELOW = 0.1  # a box with less object than this is background
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


@dataclass
class BoxStats:
    """How much of a set of boxes is object (mask pixels).

    Attributes:
        count: boxes measured.
        background_share: share of the boxes with less than 10 % object pixels.
        mean_object_share: mean share of object pixels in a box.
        half_object_share: share of the boxes with at least 50 % object pixels.
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
    """

    prototype_sources: BoxStats | None = None
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
