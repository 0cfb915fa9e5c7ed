"""Local explanations: why a ProtoPool model gave an image its class ("this looks like that").

Shape alphabet: C classes, P prototypes, S slots per class, H, W feature-map size, H_in, W_in model input.

A ProtoPool logit is a sum over slots: `logit_c = Σ_j W[c, j] · sim_j`, with j = c'·S + s running over every class
slot, `sim_j` the slot's focal similarity on the image and W the last layer. `explain` lists, for one class, every
slot with a nonzero weight (the class's own S slots, and after last-layer fine-tuning any other class's slot), its
prototype, similarity, weight and contribution `W[c, j] · sim_j`, and where in the image the slot fired; the
contributions add up to the logit. `Explanation.render` draws the top slots beside the prototypes' own pictures.
"""

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

from .drawing import (
    ACCENT,
    BACKGROUND,
    MUTED,
    NEGATIVE,
    PANEL,
    POSITIVE,
    TEXT,
    class_name,
    draw_box,
    fit_image,
    fit_text,
    heatmap_overlay,
    line_height,
    load_font,
    wrap_text,
)
from .layers import log_similarity
from .maps import high_activation_box, model_device, model_view, preprocess, upsample_map
from .pictures import collect_prototype_pictures, render_prototypes
from .sources import _prototype_sources
from .torch_utils import evaluating


__all__ = ["Explanation", "SlotContribution", "explain"]

#: Shown in the panel where a prototype has no picture: what a library user and a CLI user can do.
NO_PICTURE_NOTE = (
    "no picture: run protopool-hf project (it draws them in the model folder), or pass dataset= or prototype_images="
)


@dataclass
class SlotContribution:
    """One slot's share of a class logit.

    Attributes:
        class_id: the class owning the slot (the explained class, or another one for off-class weights).
        slot: the slot index in `[0, S)`.
        prototype_id: the prototype the slot uses (argmax of its assignment over the pool).
        similarity: the slot's focal similarity on the image, `outputs.similarities[0, class_id, slot]`.
        weight: the last-layer weight from this slot to the explained class.
        contribution: `weight × similarity`.
        feature_activation: `(H, W)` φ of the slot's distance map on the latent grid.
        location: `(row, col)` of the feature-map cell nearest to the slot's prototype.
        image_size: `(H_in, W_in)` of the model view.
        percentile: the threshold of `box`.

    Example:
        ```python
        >>> import numpy as np
        >>> from protopool_hf.explanation import SlotContribution
        >>> grid = np.zeros((5, 5), dtype=np.float32)
        >>> grid[1, 3] = 4.0
        >>> slot = SlotContribution(0, 1, 7, 2.0, 0.5, 1.0, grid, (1, 3), (160, 160))
        >>> slot.activation.shape, slot.box
        ((160, 160), (28, 68, 92, 132))

        ```
    """

    class_id: int
    slot: int
    prototype_id: int
    similarity: float
    weight: float
    contribution: float
    feature_activation: np.ndarray = field(repr=False)
    location: tuple[int, int]
    image_size: tuple[int, int]
    percentile: float = 95

    @property
    def activation(self) -> np.ndarray:
        """`(H_in, W_in)` the slot's φ map upsampled to the model view (computed on each access)."""
        return upsample_map(self.feature_activation, self.image_size)

    @cached_property
    def box(self) -> tuple[int, int, int, int]:
        """`(top, bottom, left, right)` box of the activation's top pixels (bottom, right exclusive)."""
        return high_activation_box(self.activation, self.percentile)

    def to_dict(self) -> dict[str, Any]:
        """The slot as JSON-able values (without the activation map)."""
        top, bottom, left, right = self.box
        return {
            "class_id": self.class_id,
            "slot": self.slot,
            "prototype_id": self.prototype_id,
            "similarity": self.similarity,
            "weight": self.weight,
            "contribution": self.contribution,
            "box": {"top": top, "bottom": bottom, "left": left, "right": right},
            "location": {"row": self.location[0], "col": self.location[1]},
        }


@dataclass
class Explanation:
    """Why the model gave an image a class: the top classes and the slot contributions to one class's logit.

    Attributes:
        image: the model view of the input (what the model saw, true colours).
        predicted_class: the argmax class.
        top_classes: `[(class id, label, probability)]` for the top-k classes, most probable first.
        class_id: the explained class.
        logit: its logit.
        slots: every slot with a nonzero last-layer weight to `class_id`, largest contribution first.
        logits: `(C,)` all logits.
        probabilities: `(C,)` softmax of the logits.
        id2label: class names.
        hard_assignment: whether the model's slot assignment is hardened (one prototype per slot); with a soft one a
            slot mixes prototypes and `prototype_id` is the dominant one.
        percentile: the threshold of the slots' high-activation boxes.
        colormap: the colour map of the rendered heat maps.

    Example:
        ```python
        >>> import PIL.Image
        >>> from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification
        >>> from protopool_hf.explanation import explain
        >>> config = ProtoPoolConfig(backbone="test_resnet", num_labels=3, num_prototypes=6, num_slots_per_class=2)
        >>> model = ProtoPoolForImageClassification(config).eval()
        >>> explanation = explain(model, PIL.Image.new("RGB", (200, 150), "orange"), top_k=2)
        >>> len(explanation.top_classes), len(explanation.slots)
        (2, 2)
        >>> abs(sum(s.contribution for s in explanation.slots) - explanation.logit) < 1e-5
        True
        >>> explanation.render().mode
        'RGB'

        ```
    """

    image: PIL.Image.Image = field(repr=False)
    predicted_class: int
    top_classes: list[tuple[int, str, float]]
    class_id: int
    logit: float
    slots: list[SlotContribution]
    logits: np.ndarray = field(repr=False)
    probabilities: np.ndarray = field(repr=False)
    id2label: dict[int, str] = field(repr=False)
    hard_assignment: bool = True
    percentile: float = 95
    colormap: str = "jet"
    _model: Any = field(default=None, repr=False, compare=False)

    @property
    def predicted_label(self) -> str:
        """The name of the predicted class."""
        return self.id2label.get(self.predicted_class, str(self.predicted_class))

    @property
    def class_label(self) -> str:
        """The name of the explained class."""
        return self.id2label.get(self.class_id, str(self.class_id))

    def to_dict(self) -> dict[str, Any]:
        """The explanation as JSON-able values (`json.dumps` works on it); maps and pictures are left out."""
        return {
            "predicted_class": self.predicted_class,
            "predicted_label": self.predicted_label,
            "top_classes": [
                {"class_id": c, "label": label, "probability": p, "logit": float(self.logits[c])}
                for c, label, p in self.top_classes
            ],
            "class_id": self.class_id,
            "class_label": self.class_label,
            "logit": self.logit,
            "sum_of_contributions": float(math.fsum(s.contribution for s in self.slots)),
            "hard_assignment": self.hard_assignment,
            "image_size": {"height": self.image.height, "width": self.image.width},
            "slots": [s.to_dict() for s in self.slots],
        }

    def render(
        self,
        prototype_images: Mapping[int, Any] | str | os.PathLike | None = None,
        dataset: Any | None = None,
        *,
        max_slots: int = 5,
        thumb_size: int = 176,
    ) -> PIL.Image.Image:
        """Draw the "this looks like that" panel.

        The header shows the input and the top classes. Then, for the slots with the largest contributions: where the
        slot fired in the input (heat map and box), the prototype's own picture (its source image with its box, and
        its crop), and similarity × weight = contribution. A footer adds up all the slots to the logit.

        Args:
            prototype_images: the prototypes' pictures: a folder of PNGs written by `save_prototype_images` (the model
                folder or its `prototypes/`), or `{prototype id: PrototypeImages | PIL image | path}`.
            dataset: the projection dataset, to draw the prototypes from the model's provenance instead.
            max_slots: how many slots to show (largest contributions first).
            thumb_size: side of each picture in pixels.

        Returns:
            The panel as an RGB image.
        """
        if max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}.")
        if prototype_images is not None and dataset is not None:
            raise ValueError("Pass either prototype_images= or dataset=, not both.")
        shown = self.slots[:max_slots]
        ids = [s.prototype_id for s in shown]
        if dataset is None:
            pictures = collect_prototype_pictures(ids, prototype_images, self._model)
        elif self._model is None:
            raise ValueError("Drawing prototypes from a dataset needs the model: use explain(...)'s result.")
        else:
            rendered = render_prototypes(self._model, dataset, sorted(set(ids)))
            pictures = {p: [images.overlay, images.crop] for p, images in rendered.items()}
        return _render_panel(self, shown, pictures, thumb_size)

    def save(self, path: str | os.PathLike, **render_kwargs: Any) -> Path:
        """Write the rendered panel (`.png`, `.jpg`, ...) or, for a `.json` path, `to_dict()`.

        Args:
            path: the output file; its suffix picks the format.
            **render_kwargs: passed to `render` (e.g. `dataset=` or `prototype_images=`).

        Returns:
            The path written.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() == ".json":
            path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        else:
            self.render(**render_kwargs).save(path)
        return path


# --------------------------------------------------------------------------- explain


def _resolve_class(config: Any, class_id: int | str | None, default: int) -> int:
    if class_id is None:
        return default
    if isinstance(class_id, str):
        label2id = {str(name): int(c) for c, name in (getattr(config, "id2label", None) or {}).items()}
        label2id |= {class_name(config, c): c for c in set(label2id.values())}
        label2id |= {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
        if class_id not in label2id:
            raise ValueError(
                f"class_id {class_id!r} is not a class name of this model; its names: {sorted(label2id)}."
            )
        return label2id[class_id]
    if isinstance(class_id, bool) or not isinstance(class_id, int | np.integer):
        raise ValueError(f"class_id must be an int, a class name or None, got {class_id!r}.")
    if not 0 <= class_id < config.num_labels:
        raise ValueError(f"class_id must be in [0, {config.num_labels}) for this model's classes, got {class_id}.")
    return int(class_id)


def explain(
    model: torch.nn.Module,
    image: Any,
    processor: Any | None = None,
    top_k: int = 3,
    class_id: int | str | None = None,
    percentile: float = 95,
    colormap: str = "jet",
) -> Explanation:
    """Explain one image: the top-k classes, and every slot's contribution to one class's logit.

    Args:
        model: a `ProtoPoolForImageClassification`, loaded from a folder or the Hub (`trust_remote_code` works too);
            it runs in eval mode for the call and is put back in its own mode afterwards.
        image: a PIL image, a path, or normalised pixel values `(3, H_in, W_in)` / `(1, 3, H_in, W_in)`.
        processor: an image processor replacing the preprocessing of `model.config` (e.g. the repo's
            `AutoImageProcessor`); by default the config's eval transform is used, which gives the same pixels.
        top_k: how many classes to list with their probabilities.
        class_id: the class to explain (id or name); defaults to the predicted class.
        percentile: the high-activation box threshold.
        colormap: the heat map's colour map (see `protopool_hf.drawing.colormap_lut`).

    Returns:
        The `Explanation`; its slot contributions add up to `logit` (to float rounding).
    """
    config = model.config
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}.")
    pixel_values = preprocess(image, config, processor)
    view = model_view(image, config, processor)
    if view.size != (pixel_values.shape[-1], pixel_values.shape[-2]):
        raise ValueError(
            f"The processor gives {tuple(pixel_values.shape[-2:])} pixel values but a {view.height}×{view.width} "
            "view; use an image processor whose resize and crop do not depend on normalisation."
        )
    device, dtype = model_device(model)
    with evaluating(model):
        features = model.forward_features(pixel_values.to(device=device, dtype=dtype))
        head_out = model.head(features)
        distances = model.head.distances(features)[0].float().cpu()  # (P, H, W)
        assignment = head_out.slot_assignment.float().cpu()  # (C, P, S)
    logits = head_out.logits[0].float().cpu()
    similarities = head_out.similarities[0].float().cpu()  # (C, S)
    probabilities = torch.softmax(logits.double(), dim=0)
    num_classes, num_slots = similarities.shape
    id2label = {c: class_name(config, c) for c in range(num_classes)}
    order = torch.argsort(probabilities, descending=True, stable=True)[: min(top_k, num_classes)].tolist()
    top_classes = [(c, id2label[c], float(probabilities[c])) for c in order]
    predicted = int(order[0])
    explained = _resolve_class(config, class_id, predicted)

    weights = model.head.last_layer.weight.detach()[explained].float().cpu()  # (C·S,)
    slots = []
    size = (view.height, view.width)
    for j in torch.nonzero(weights).flatten().tolist():
        owner, s = divmod(j, num_slots)
        mix = assignment[owner, :, s]  # (P,)
        slot_distance = torch.einsum("phw,p->hw", distances, mix)
        similarity, weight = float(similarities[owner, s]), float(weights[j])
        slots.append(
            SlotContribution(
                class_id=owner,
                slot=s,
                prototype_id=int(mix.argmax()),
                similarity=similarity,
                weight=weight,
                contribution=weight * similarity,
                feature_activation=log_similarity(slot_distance, config.similarity_epsilon).numpy(),
                location=tuple(int(v) for v in divmod(int(slot_distance.argmin()), slot_distance.shape[1])),
                image_size=size,
                percentile=percentile,
            )
        )
    slots.sort(key=lambda s: s.contribution, reverse=True)
    return Explanation(
        image=view,
        predicted_class=predicted,
        top_classes=top_classes,
        class_id=explained,
        logit=float(logits[explained]),
        slots=slots,
        logits=logits.numpy(),
        probabilities=probabilities.float().numpy(),
        id2label=id2label,
        hard_assignment=bool(getattr(model, "is_assignment_hard", False)),
        percentile=percentile,
        colormap=colormap,
        _model=model,
    )


# --------------------------------------------------------------------------- rendering


def _signed(value: float) -> tuple[str, tuple[int, int, int]]:
    return f"{value:+.3f}", POSITIVE if value >= 0 else NEGATIVE


def _render_panel(
    explanation: Explanation,
    shown: Sequence[SlotContribution],
    pictures: Mapping[int, Sequence[PIL.Image.Image]],
    thumb: int,
) -> PIL.Image.Image:
    margin, gap = 20, 12
    title_font, head_font, body_font, small_font = load_font(24), load_font(17), load_font(15), load_font(13)
    colormap = explanation.colormap
    sources = _prototype_sources(explanation._model, explanation.id2label)
    text_w = 300
    arrow_w = 96
    row_w = thumb + arrow_w + 2 * thumb + 3 * gap + text_w
    width = 2 * margin + row_w
    line, small_line = line_height(body_font), line_height(small_font)

    # Header: the input, the prediction and the top classes.
    header_h = max(thumb, line_height(title_font) + 2 * line_height(head_font) + len(explanation.top_classes) * line)
    column_h = line_height(small_font) + 6
    row_h = thumb + 8
    footer_h = (2 if explanation.hard_assignment else 3) * small_line + 4
    height = 2 * margin + header_h + gap + column_h + len(shown) * (row_h + gap) + footer_h
    canvas = PIL.Image.new("RGB", (width, height), BACKGROUND)
    draw = PIL.ImageDraw.Draw(canvas)

    canvas.paste(fit_image(explanation.image, (thumb, thumb)), (margin, margin))
    x, y = margin + thumb + 2 * gap, margin
    text_width = width - x - margin
    prob = float(explanation.probabilities[explanation.predicted_class])
    draw.text(
        (x, y),
        fit_text(f"Prediction: {explanation.predicted_label} ({prob:.1%})", text_width, title_font),
        fill=TEXT,
        font=title_font,
    )
    y += line_height(title_font) + 4
    bar_w = 160
    for rank, (c, label, p) in enumerate(explanation.top_classes, start=1):
        draw.rectangle((x, y + 3, x + bar_w, y + line - 5), fill=PANEL)
        draw.rectangle((x, y + 3, x + max(1, round(bar_w * p)), y + line - 5), fill=ACCENT)
        text = f"{rank}. {label}  {p:.1%}  (logit {float(explanation.logits[c]):.3f})"
        draw.text((x + bar_w + 10, y), fit_text(text, text_width - bar_w - 10, body_font), fill=TEXT, font=body_font)
        y += line
    y += 8
    why = f"Why {explanation.class_label}? logit {explanation.logit:.3f} = sum of {len(explanation.slots)} slots"
    why += f" (similarity x weight); the top {len(shown)} below." if shown else "."
    draw.text((x, y), fit_text(why, text_width, head_font), fill=TEXT, font=head_font)

    # Column headings.
    y = margin + header_h + gap
    x0 = margin
    x_proto = x0 + thumb + arrow_w
    x_text = x_proto + 2 * thumb + 3 * gap
    for xpos, heading in (
        (x0, "this image: where the slot fired"),
        (x_proto, "looks like prototype (its source, its crop)"),
        (x_text, "score"),
    ):
        draw.text((xpos, y), heading, fill=MUTED, font=small_font)
    y += column_h

    for slot in shown:
        draw.rectangle((margin - 8, y - 4, width - margin + 8, y + row_h - 4), fill=PANEL)
        fired = draw_box(heatmap_overlay(explanation.image, slot.activation, colormap), slot.box)
        canvas.paste(fit_image(fired, (thumb, thumb), PANEL), (x0, y))
        arrow_y = y + thumb // 2
        draw.line((x0 + thumb + 14, arrow_y, x_proto - 18, arrow_y), fill=MUTED, width=3)
        draw.polygon([(x_proto - 10, arrow_y), (x_proto - 22, arrow_y - 8), (x_proto - 22, arrow_y + 8)], fill=MUTED)
        draw.text((x0 + thumb + 14, arrow_y - line - 2), "looks like", fill=MUTED, font=small_font)
        own = pictures.get(slot.prototype_id, [])
        if own:
            for k, picture in enumerate(own[:2]):
                canvas.paste(fit_image(picture, (thumb, thumb), PANEL), (x_proto + k * (thumb + gap // 2), y))
        else:
            note = wrap_text(NO_PICTURE_NOTE, 2 * thumb - 10, small_font, max(1, thumb // small_line))
            top = y + (thumb - len(note) * small_line) // 2
            for k, text in enumerate(note):
                draw.text((x_proto + 10, top + k * small_line), text, fill=MUTED, font=small_font)
        ty = y + 4
        owner = explanation.id2label.get(slot.class_id, str(slot.class_id))
        title = f"prototype {slot.prototype_id}"
        draw.text((x_text, ty), fit_text(title, text_w, head_font), fill=TEXT, font=head_font)
        ty += line_height(head_font)
        where = f"slot {slot.slot} of {owner}" + ("" if slot.class_id == explanation.class_id else " (other class)")
        draw.text((x_text, ty), fit_text(where, text_w, small_font), fill=MUTED, font=small_font)
        ty += small_line
        if slot.prototype_id in sources:
            draw.text(
                (x_text, ty), fit_text(sources[slot.prototype_id], text_w, small_font), fill=MUTED, font=small_font
            )
        ty += small_line + 6
        for label, value, color in (
            ("similarity", f"{slot.similarity:.3f}", TEXT),
            ("x weight", f"{slot.weight:.3f}", TEXT),
            ("= contribution", *_signed(slot.contribution)),
        ):
            draw.text((x_text, ty), label, fill=MUTED, font=body_font)
            draw.text((x_text + 130, ty), value, fill=color, font=body_font)
            ty += line
        share = slot.contribution / explanation.logit if explanation.logit else float("nan")
        if math.isfinite(share):
            draw.text((x_text, ty + 2), f"{share:.0%} of the logit", fill=MUTED, font=small_font)
        y += row_h + gap

    shown_sum = math.fsum(s.contribution for s in shown)
    rest = explanation.slots[len(shown) :]
    rest_sum = math.fsum(s.contribution for s in rest)
    lines = [
        f"shown slots: {shown_sum:+.3f}    other {len(rest)} slots: {rest_sum:+.3f}    "
        f"total {shown_sum + rest_sum:+.3f} = logit {explanation.logit:.3f}",
        "heat map: similarity of each latent patch to the slot's prototype, upsampled; "
        f"box: the pixels above its {explanation.percentile:g}th percentile",
    ]
    if not explanation.hard_assignment:
        lines.append("slot assignment not hardened: each slot mixes prototypes; the dominant one is shown")
    for k, text in enumerate(lines[:3]):
        draw.text(
            (margin, y + k * small_line), fit_text(text, width - 2 * margin, small_font), fill=MUTED, font=small_font
        )
    return canvas
