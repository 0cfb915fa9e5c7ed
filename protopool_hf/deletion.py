"""Deletion faithfulness: does removing the regions an explanation points at remove the evidence?

For one image: its predicted class c and the boxes of the explanation's top slots, in order of contribution. Step t
removes (fills with 0 in normalised space, i.e. the dataset's mean colour, as ST-ProtoPNet's deletion AUC) the union
of the first t boxes; the curve is the probability of c after each step, step 0 being the intact image. The baseline
removes, at each step, a box of the same height and width at a uniformly random place instead (cumulatively too),
averaged over `repeats` draws. The area under a curve is the trapezoid over steps scaled to [0, 1]: a faithful
localisation gives a lower area than the random boxes (a larger `gain` = random area − slot area).
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


__all__ = ["DeletionCurve", "curve_area", "delete_boxes", "deletion_curves", "random_boxes_like"]


@dataclass
class DeletionCurve:
    """Deletion curves of one image.

    Attributes:
        slots: `(T + 1,)` probability of the predicted class after removing the first t slot boxes.
        random: `(T + 1,)` the same for random boxes of the same sizes, averaged over the draws.
    """

    slots: np.ndarray
    random: np.ndarray


def curve_area(curve: Sequence[float] | np.ndarray) -> float:
    """The trapezoid area under a curve sampled at steps 0..T, with the step axis scaled to [0, 1] (T >= 1)."""
    values = np.asarray(curve, dtype=np.float64)
    if len(values) < 2:
        return float(values[0]) if len(values) else float("nan")
    return float(((values[:-1] + values[1:]) / 2).mean())


def delete_boxes(pixel_values: torch.Tensor, boxes: Sequence[Sequence[int]]) -> torch.Tensor:
    """`(3, H_in, W_in)` normalised image -> `(T + 1, 3, H_in, W_in)`: step t has the first t boxes filled with 0."""
    steps = [pixel_values.clone()]
    for top, bottom, left, right in boxes:
        image = steps[-1].clone()
        image[:, top:bottom, left:right] = 0
        steps.append(image)
    return torch.stack(steps)


def random_boxes_like(
    boxes: Sequence[Sequence[int]], size: tuple[int, int], generator: np.random.Generator
) -> list[tuple[int, int, int, int]]:
    """Boxes of the same heights and widths as `boxes`, each at a uniformly random place inside an `(H, W)` image."""
    height, width = size
    out = []
    for top, bottom, left, right in boxes:
        h, w = bottom - top, right - left
        y, x = int(generator.integers(0, height - h + 1)), int(generator.integers(0, width - w + 1))
        out.append((y, y + h, x, x + w))
    return out


def _probabilities(model: torch.nn.Module, batch: torch.Tensor, class_id: int) -> np.ndarray:
    parameter = next(model.parameters())
    dtype = parameter.dtype if parameter.dtype.is_floating_point else torch.float32
    with torch.no_grad():
        logits = model(pixel_values=batch.to(device=parameter.device, dtype=dtype)).logits.float()
    return torch.softmax(logits, dim=-1)[:, class_id].cpu().numpy().astype(np.float64)


def deletion_curves(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    boxes: Sequence[Sequence[int]],
    class_id: int,
    *,
    repeats: int = 3,
    generator: np.random.Generator | None = None,
) -> DeletionCurve:
    """The deletion curve of one image's slot boxes and of random boxes of the same sizes.

    Args:
        model: a `ProtoPoolForImageClassification` in eval mode.
        pixel_values: `(3, H_in, W_in)` normalised image.
        boxes: `(top, bottom, left, right)` boxes in order of contribution (exclusive ends).
        class_id: the class whose probability is tracked (the prediction on the intact image).
        repeats: random draws averaged for the baseline.
        generator: numpy generator of the random boxes (default: seeded with 0).

    Returns:
        A `DeletionCurve`.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    generator = generator if generator is not None else np.random.default_rng(0)
    size = (int(pixel_values.shape[-2]), int(pixel_values.shape[-1]))
    batches = [delete_boxes(pixel_values, boxes)]
    batches += [delete_boxes(pixel_values, random_boxes_like(boxes, size, generator))[1:] for _ in range(repeats)]
    probabilities = _probabilities(model, torch.cat(batches), class_id)
    steps = len(boxes)
    slots = probabilities[: steps + 1]
    random = probabilities[steps + 1 :].reshape(repeats, steps).mean(axis=0)
    return DeletionCurve(slots=slots, random=np.concatenate([slots[:1], random]))
