"""`evaluate_interpretability`: measure a ProtoPool model's explanations on a dataset (the metrics are in `metrics`).

Shape alphabet: N images, C classes, P prototypes, S slots per class, H, W feature-map size, H_in, W_in model input.

Every image goes through the model's own eval preprocessing (`preprocessing.EvalTransform`, the saved image
processor); masks and keypoints, given in the pixels of the image as the dataset decodes it, are carried through the
same resize and crop into model-input coordinates (masks with nearest-neighbour resizing; keypoints cropped away
become invisible). Pixel parameters of the references (±36 px consistency box, 32 px purity patch, both at 224 px)
are scaled to the model's input size.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch

from .deletion import curve_area, deletion_curves, mean_curve
from .images import decode_image, to_rgb
from .localisation import LOCALISATIONS, SmoothGrad, check_localisations, localisation_maps
from .losses import cell_object_shares
from .maps import distance_maps, high_activation_box
from .metrics import (
    BACKGROUND_BELOW,
    CONSISTENCY_HALF_SIZE,
    CONSISTENCY_THRESHOLD,
    MOSTLY_OBJECT,
    PERCENTILE,
    PURITY_PATCH,
    PURITY_TOP_K,
    REFERENCE_SIZE,
    STABILITY_NOISE,
    BoxStats,
    InterpretabilityReport,
    LocalisationScores,
    Masks,
    explanation_size,
    mask_reader,
    structure_metrics,
    top_prototypes,
)
from .parts import (
    PartAnnotations,
    PurityScores,
    box_hits,
    consistency_score,
    peak_box,
    peak_patch,
    purity_scores,
    stability_score,
)
from .preprocessing import EvalTransform
from .provenance import read_provenance
from .torch_utils import evaluating


__all__ = ["evaluate_interpretability"]


def _row(dataset: Any, index: int, image_column: str, label_column: str) -> tuple[PIL.Image.Image, int | None]:
    item = dataset[int(index)]
    if not isinstance(item, Mapping) or image_column not in item:
        columns = sorted(item) if isinstance(item, Mapping) else type(item).__name__
        raise ValueError(f"Dataset rows need an {image_column!r} column (pass image_column=...), got {columns}.")
    value = item[image_column]
    if isinstance(value, torch.Tensor):
        raise ValueError(
            f"Row {index} holds a tensor, not an image: pass the dataset without its training transform (the "
            "evaluation preprocesses the images itself, as the model's image processor)."
        )
    image = value if isinstance(value, PIL.Image.Image) else decode_image(value, name=f"at row {index}")
    label = item.get(label_column)
    return image, None if label is None else int(label)


def _rows_of(dataset: Any, indices: Sequence[int]) -> list[int]:
    """Projection provenance indices -> dataset rows (through an `index` column when there is one)."""
    columns = getattr(dataset, "column_names", None) or []
    if "index" not in columns:
        bad = [i for i in indices if i >= len(dataset)]
        if bad:
            raise ValueError(
                f"The prototypes were projected on image {bad[0]}, but projection_dataset has {len(dataset)} rows: "
                "pass the dataset (split and order) the projection used."
            )
        return list(indices)
    stored = dataset.with_format(None).select_columns(["index"])["index"] if hasattr(dataset, "with_format") else []
    row_of = {int(v): r for r, v in enumerate(stored)}
    missing = [i for i in indices if i not in row_of]
    if missing:
        raise ValueError(
            f"The prototypes were projected on images {missing[:5]}, which projection_dataset's `index` column lacks: "
            "pass the dataset the projection used."
        )
    return [row_of[i] for i in indices]


def _check_annotations(name: str, value: Any, dataset: Any) -> None:
    if value is None or callable(value) or isinstance(value, str):
        return
    if len(value) != len(dataset):
        raise ValueError(
            f"{name} has {len(value)} entries but its dataset has {len(dataset)} rows: give one per row, in order."
        )


class _Image:
    """One evaluation image in model-input coordinates: pixels, object mask, keypoints."""

    def __init__(self, transform: EvalTransform, image: PIL.Image.Image, mask: np.ndarray | None, parts: Any) -> None:
        image = to_rgb(image)
        self.pixels = transform(image)
        self.size = (int(self.pixels.shape[-2]), int(self.pixels.shape[-1]))
        geometry = transform.geometry(image)
        self.mask = None
        if mask is not None:
            (height, width), (top, left, h, w) = geometry.resized_size, geometry.crop_box
            pil = PIL.Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), PIL.Image.NEAREST)
            self.mask = np.asarray(pil.crop((left, top, left + w, top + h))) > 127
        self.keypoints = self.visible = None
        if parts is not None:
            points = np.full_like(parts, np.nan)
            for k, (x, y) in enumerate(parts):
                if np.isfinite(x) and np.isfinite(y):
                    yi, xi = geometry.to_input(float(y), float(x))
                    if 0 <= yi <= self.size[0] and 0 <= xi <= self.size[1]:
                        points[k] = [xi, yi]
            self.keypoints, self.visible = points, np.isfinite(points[:, 0])

    def object_share(self, box: Sequence[int]) -> float:
        top, bottom, left, right = (int(v) for v in box)
        return float(self.mask[top:bottom, left:right].mean())


def _progress(iterable: Any, enabled: bool, description: str, total: int | None = None) -> Any:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=description, total=total)


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def evaluate_interpretability(
    model: torch.nn.Module,
    dataset: Any,
    *,
    masks: Masks | None = None,
    parts: PartAnnotations | None = None,
    projection_dataset: Any | None = None,
    projection_masks: Masks | None = None,
    projection_parts: PartAnnotations | None = None,
    max_images: int | None = None,
    localisation: str | Sequence[str] = LOCALISATIONS,
    top_slots: int = 3,
    batch_size: int = 32,
    smoothgrad: SmoothGrad | None = None,
    deletion_repeats: int = 3,
    seed: int = 0,
    image_column: str = "image",
    label_column: str = "label",
    progress: bool = False,
) -> InterpretabilityReport:
    """Measure the interpretability of a ProtoPool model on a dataset.

    Args:
        model: a `ProtoPoolForImageClassification` (its train/eval modes are restored afterwards).
        dataset: the evaluation split: rows with an image (PIL image or stored image) and a label column, e.g. a
            loader of `protopool_hf.data` or any `datasets.Dataset` (without a training transform).
        masks: object masks of `dataset`'s images: one `(H, W)` boolean array per row (the size of the decoded
            image), a function `PIL image -> (H, W) bool array`, or a rule name of `MASK_RULES` (`"fashion-mnist"`:
            raw pixel > 0).
        parts: part keypoints of `dataset`'s rows (`parts.load_cub_parts`, `PartAnnotations.from_rows`), for
            consistency and stability.
        projection_dataset: the split the projection provenance indexes (default: `dataset`), for the prototypes'
            source boxes and for purity.
        projection_masks: masks of `projection_dataset` (default: `masks` when it is a function or a rule, or when
            `projection_dataset` is `dataset`).
        projection_parts: keypoints of `projection_dataset`, for purity (default: `parts` when `projection_dataset`
            is `dataset`).
        max_images: use only the first N images (of each dataset) for the costly metrics: boxes, parts, purity,
            deletion (default: all). Structure metrics and accuracy use every image.
        localisation: `"upsampled"`, `"gradient"` or both (default): the box-based metrics are reported under each.
        top_slots: how many of the predicted class's top slots (distinct prototypes) an explanation shows.
        batch_size: images per forward pass.
        smoothgrad: parameters of the gradient localisation.
        deletion_repeats: random-box draws per image for the deletion baseline.
        seed: seed of the stability noise and the random boxes.
        image_column: the image column.
        label_column: the label column.
        progress: show progress bars (tqdm).

    Returns:
        An `InterpretabilityReport`.

    Raises:
        ValueError: bad arguments or annotations (the message names the argument, row and value).

    Example:
        ```python
        >>> import datasets, numpy as np, PIL.Image
        >>> from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification, evaluate_interpretability
        >>> config = ProtoPoolConfig(
        ...     backbone="test_resnet", num_labels=2, num_prototypes=4, num_slots_per_class=2, input_size=[3, 64, 64]
        ... )
        >>> model = ProtoPoolForImageClassification(config).eval()
        >>> rng = np.random.default_rng(0)
        >>> images = [PIL.Image.fromarray(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)) for _ in range(4)]
        >>> ds = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 0, 1]})
        >>> masks = [np.ones((80, 80), dtype=bool)] * 4  # the object fills every image
        >>> report = evaluate_interpretability(model, ds, masks=masks, localisation="upsampled")
        >>> report.num_images, report.localisations["upsampled"].test_top_slots.mean_object_share
        (4, 1.0)
        >>> sorted(report.to_dict()["localisations"]["upsampled"])[:3]  # JSON-safe, as `interpretability.json`
        ['background_prototypes', 'consistency', 'deletion_auc']

        ```
    """
    methods = check_localisations(localisation)
    if len(dataset) == 0:
        raise ValueError("evaluate_interpretability got an empty dataset.")
    for name, value in (("max_images", max_images), ("top_slots", top_slots), ("batch_size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    projection_dataset = dataset if projection_dataset is None else projection_dataset
    same = projection_dataset is dataset
    if projection_masks is None and (same or callable(masks) or isinstance(masks, str)):
        projection_masks = masks
    if projection_parts is None and same:
        projection_parts = parts
    for name, value, data in (
        ("masks", masks, dataset),
        ("parts", parts, dataset),
        ("projection_masks", projection_masks, projection_dataset),
        ("projection_parts", projection_parts, projection_dataset),
    ):
        _check_annotations(name, value, data)
    mask_of = mask_reader(masks, "masks")
    projection_mask_of = mask_reader(projection_masks, "projection_masks")
    count = min(len(dataset), max_images or len(dataset))
    # Annotations of the images the costly metrics read are checked before any work.
    for data, mask_fn, annotations in (
        (dataset, None if masks is None or callable(masks) or isinstance(masks, str) else mask_of, parts),
        (projection_dataset, None, projection_parts),
    ):
        if mask_fn is None and annotations is None:
            continue
        for row in range(min(len(data), count)):
            image, _ = _row(data, row, image_column, label_column)
            if mask_fn is not None:
                mask_fn(row, image)
            if annotations is not None:
                annotations.check_inside(row, (image.height, image.width))
    transform = EvalTransform(model.config)
    config = model.config
    size = tuple(int(v) for v in config.input_size[1:])
    scale = min(size) / REFERENCE_SIZE
    half_size, patch = max(1, round(CONSISTENCY_HALF_SIZE * scale)), max(1, round(PURITY_PATCH * scale))
    smoothgrad = smoothgrad or SmoothGrad(seed=seed)
    slots = model.class_to_prototypes().cpu().numpy()  # (C, S)
    num_slots = slots.shape[1]
    weight = model.head.last_layer.weight.detach().float().cpu().numpy()  # (C, C·S)
    scores = {method: LocalisationScores() for method in methods}

    def load(data: Any, row: int, mask_fn: Any, annotations: PartAnnotations | None) -> tuple[_Image, int | None]:
        image, label = _row(data, row, image_column, label_column)
        mask = mask_fn(row, image) if mask_fn is not None else None
        keypoints = None
        if annotations is not None:
            annotations.check_inside(row, (image.height, image.width))
            keypoints = annotations.keypoints[row]
        return _Image(transform, image, mask, keypoints), label

    with evaluating(model, no_grad=False):
        # ---- pass 1, every image: predictions, explanation size, the top slots of the predicted class
        correct, sizes, labelled = 0, [], 0
        top: list[list[int]] = []
        rows = range(len(dataset))
        parameter = next(model.parameters())
        device, dtype = parameter.device, parameter.dtype if parameter.dtype.is_floating_point else torch.float32
        for start in _progress(range(0, len(dataset), batch_size), progress, f"forward (batches of {batch_size})"):
            chunk = rows[start : start + batch_size]
            batch = [_row(dataset, i, image_column, label_column) for i in chunk]
            pixels = torch.stack([transform(to_rgb(image)) for image, _ in batch])
            with torch.no_grad():
                out = model(pixel_values=pixels.to(device=device, dtype=dtype))
            logits, sims = (
                out.logits.float().cpu().numpy(),
                out.similarities.float().cpu().numpy(),
            )  # (N, C), (N, C, S)
            for n, (_, label) in enumerate(batch):
                c = int(logits[n].argmax())
                if label is not None:
                    labelled += 1
                    correct += int(label == c)
                contributions = weight[c] * sims[n].reshape(-1)  # (C·S,)
                sizes.append(explanation_size(contributions))
                if chunk[n] < count:
                    own = contributions[c * num_slots : (c + 1) * num_slots]
                    top.append([c, *top_prototypes(own, slots[c], top_slots)])

        # ---- pass 2, the first `count` images: boxes, cells, parts, deletion
        shares = {m: [] for m in methods}
        cell_shares: list[float] = []
        units: dict[tuple[int, int], dict[str, list]] = {}
        curves: dict[str, list] = {m: [] for m in methods}
        noise_generator = torch.Generator().manual_seed(seed)
        box_generator = np.random.default_rng(seed)
        for row in _progress(range(count), progress, "explanations", count):
            item, label = load(dataset, row, mask_of, parts)
            c, ids = top[row][0], top[row][1:]
            distances = distance_maps(model, item.pixels[None])  # (1, P, H, W), shared by the maps below
            if item.mask is not None:
                cells = cell_object_shares(torch.from_numpy(item.mask)[None], distances.shape[-2:])[0].flatten()
                cell_shares += [float(cells[int(distances[0, p].argmin())]) for p in ids]
            class_ids = None
            if item.keypoints is not None and label is not None:
                class_ids = sorted({int(p) for p in slots[label]})
                noise = (torch.randn(item.pixels.shape, generator=noise_generator) * STABILITY_NOISE[0]).clamp(
                    -STABILITY_NOISE[1], STABILITY_NOISE[1]
                )
                noisy = (item.pixels + noise)[None]
                noisy_distances = distance_maps(model, noisy)
            for method in methods:
                maps = localisation_maps(model, item.pixels[None], [ids], method, smoothgrad, distances)[0]
                boxes = [high_activation_box(m, PERCENTILE) for m in maps]
                if item.mask is not None:
                    shares[method] += [item.object_share(box) for box in boxes]
                curve = deletion_curves(
                    model, item.pixels, boxes, c, repeats=deletion_repeats, generator=box_generator
                )
                curves[method].append(curve)
                if class_ids is not None:
                    clean = localisation_maps(model, item.pixels[None], [class_ids], method, smoothgrad, distances)[0]
                    shaken = localisation_maps(model, noisy, [class_ids], method, smoothgrad, noisy_distances)[0]
                    for p, a, b in zip(class_ids, clean, shaken, strict=True):
                        unit = units.setdefault((label, p), {})
                        record = unit.setdefault(method, {"clean": [], "noisy": [], "visible": []})
                        record["clean"].append(box_hits(item.keypoints, peak_box(a, half_size)))
                        record["noisy"].append(box_hits(item.keypoints, peak_box(b, half_size)))
                        record["visible"].append(item.visible)
        for method in methods:
            result = scores[method]
            if masks is not None:
                result.test_top_slots = BoxStats.of(shares[method])
            if curves[method]:
                slot_curve = mean_curve([curve.slots for curve in curves[method]])
                random_curve = mean_curve([curve.random for curve in curves[method]])
                result.deletion_curve, result.random_deletion_curve = slot_curve.tolist(), random_curve.tolist()
                result.deletion_auc, result.random_deletion_auc = curve_area(slot_curve), curve_area(random_curve)
                result.deletion_gain = result.random_deletion_auc - result.deletion_auc
            records = [unit[method] for unit in units.values() if method in unit]
            if records:
                visible = [np.array(r["visible"]) for r in records]
                result.consistency = consistency_score(
                    [np.array(r["clean"]) for r in records], visible, CONSISTENCY_THRESHOLD
                )
                result.stability = stability_score(
                    [np.array(r["clean"]) for r in records], [np.array(r["noisy"]) for r in records]
                )

        # ---- the projected prototypes: source boxes, purity
        used = sorted({int(p) for p in slots.flatten()})
        index = read_provenance(model).image_index.numpy()
        projected = [p for p in used if index[p] >= 0]
        if projection_mask_of is not None and projected:
            source_rows = _rows_of(projection_dataset, [int(index[p]) for p in projected])
            source_shares: dict[str, list[float]] = {m: [] for m in methods}
            for p, row in _progress(list(zip(projected, source_rows, strict=True)), progress, "prototype sources"):
                item, _ = load(projection_dataset, row, projection_mask_of, None)
                for method in methods:
                    (activation,) = localisation_maps(model, item.pixels[None], [[p]], method, smoothgrad)[0]
                    source_shares[method].append(item.object_share(high_activation_box(activation, PERCENTILE)))
            for method in methods:
                scores[method].prototype_sources = BoxStats.of(source_shares[method])
                scores[method].background_prototypes = [
                    p for p, share in zip(projected, source_shares[method], strict=True) if share < BACKGROUND_BELOW
                ]
        if projection_parts is not None:
            purity = _purity(
                model,
                projection_dataset,
                projection_parts,
                used,
                methods,
                load=load,
                count=min(len(projection_dataset), max_images or len(projection_dataset)),
                batch_size=batch_size,
                patch=patch,
                smoothgrad=smoothgrad,
                progress=progress,
                columns=(image_column, label_column),
            )
            for method, result in purity.items():
                scores[method].purity_mean, scores[method].purity_std = result.mean, result.std
                scores[method].purity_part_related_share = result.part_related_share

    structure = structure_metrics(slots, int(config.num_prototypes))
    gains = {m: scores[m].deletion_gain for m in methods if scores[m].deletion_gain is not None}
    settings = {
        "top_slots": top_slots,
        "box_percentile": PERCENTILE,
        "background_below": BACKGROUND_BELOW,
        "mostly_object": MOSTLY_OBJECT,
        "input_size": list(size),
        "consistency_half_size_px": half_size,
        "consistency_threshold": CONSISTENCY_THRESHOLD,
        "stability_noise_std_clip": list(STABILITY_NOISE),
        "purity_patch_px": patch,
        "purity_top_k": PURITY_TOP_K,
        "smoothgrad": {"samples": smoothgrad.samples, "noise": smoothgrad.noise, "seed": smoothgrad.seed},
        "deletion_repeats": deletion_repeats,
        "seed": seed,
        "masks": masks if isinstance(masks, str) else (None if masks is None else type(masks).__name__),
        "parts": None if parts is None else {"source": parts.source, "names": parts.names},
        "prototypes_projected": len(projected),
    }
    return InterpretabilityReport(
        num_images=len(dataset),
        num_localised_images=count,
        accuracy=correct / labelled if labelled else None,
        **structure,
        explanation_size_mean=_mean(sizes),
        explanation_size_median=float(np.median(sizes)) if sizes else None,
        top_slot_cells_background_share=float(np.mean(np.array(cell_shares) < BACKGROUND_BELOW))
        if cell_shares
        else None,
        top_slot_cells_mean_object_share=_mean(cell_shares),
        localisations=scores,
        more_faithful_localisation=max(gains, key=gains.get) if len(gains) > 1 else None,
        settings=settings,
    )


def _purity(
    model: torch.nn.Module,
    dataset: Any,
    annotations: PartAnnotations,
    used: list[int],
    methods: Sequence[str],
    *,
    load: Callable[..., tuple[_Image, int | None]],
    count: int,
    batch_size: int,
    patch: int,
    smoothgrad: SmoothGrad,
    progress: bool,
    columns: tuple[str, str],
) -> dict[str, PurityScores]:
    """PIP-Net's purity of the used prototypes over their top-k images among the first `count` rows of `dataset`."""
    image_column, label_column = columns
    best = np.full((count, len(used)), np.inf)
    transform = EvalTransform(model.config)
    for start in _progress(range(0, count, batch_size), progress, "purity scan"):
        chunk = range(start, min(count, start + batch_size))
        pixels = torch.stack([transform(to_rgb(_row(dataset, i, image_column, label_column)[0])) for i in chunk])
        best[chunk.start : chunk.stop] = distance_maps(model, pixels).flatten(2).amin(dim=2)[:, used].numpy()
    k = min(PURITY_TOP_K, count)
    top_rows = np.argsort(best, axis=0, kind="stable")[:k]  # (k, U)
    per_row: dict[int, list[int]] = {}
    for u in range(len(used)):
        for row in top_rows[:, u]:
            per_row.setdefault(int(row), []).append(u)
    hits = {m: [[] for _ in used] for m in methods}
    visible: list[list[np.ndarray]] = [[] for _ in used]
    for row, members in _progress(sorted(per_row.items()), progress, "purity"):
        item, _ = load(dataset, row, None, annotations)
        for u in members:
            visible[u].append(item.visible)
        for method in methods:
            maps = localisation_maps(model, item.pixels[None], [[used[u] for u in members]], method, smoothgrad)[0]
            for u, activation in zip(members, maps, strict=True):
                hits[method][u].append(box_hits(item.keypoints, peak_patch(activation, patch)))
    groups = annotations.merged_groups()
    arrays = [np.array(v) for v in visible]
    return {m: purity_scores([np.array(h) for h in hits[m]], arrays, groups) for m in methods}
