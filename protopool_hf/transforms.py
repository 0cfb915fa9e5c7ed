"""Pixel transforms for ProtoPool datasets: seeded training augmentation, the eval transform, batching.

[`make_transforms`] builds the batch transform a dataset of `protopool_hf.data` takes with `ds.with_transform(...)`:
decode, crop to `bbox`, convert to RGB, then timm's training augmentation (or the official code's), or the eval
transform that `AutoImageProcessor` applies bit for bit. [`collate_fn`] stacks the transformed rows into batches.
With `object_mask`, every row also gets the object pixels of its transformed image (for the background term).
"""

import contextlib
import hashlib
import random
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch

from .images import UnreadableImageError, decode_row
from .preprocessing import EvalTransform
from .torch_utils import check_labels


__all__ = ["AUGMENTATIONS", "OBJECT_MASKS", "ImageTransform", "collate_fn", "make_transforms", "nonzero_pixels"]

#: The training augmentations of `make_transforms` (the CLI's `--augment`).
AUGMENTATIONS = ("timm", "official")
#: The object-mask rules of `make_transforms(object_mask=...)`.
OBJECT_MASKS = ("nonzero",)

ObjectMask = Callable[[torch.Tensor], torch.Tensor]


def nonzero_pixels(mean: Sequence[float], std: Sequence[float]) -> ObjectMask:
    """The `"nonzero"` object-mask rule: pixels not black in any channel (Fashion-MNIST's objects: raw pixel > 0).

    Args:
        mean: the normalisation mean of the pixel values.
        std: the normalisation std.

    Returns:
        A function `(3, H, W)` normalised pixel values -> `(H, W)` bool: True where the 8-bit value is above 0 in
        some channel (the threshold is half a step, 0.5 / 255, so interpolation leaves black black).

    Example:
        ```python
        >>> import torch
        >>> from protopool_hf.transforms import nonzero_pixels
        >>> pixels = torch.full((3, 1, 2), -1.0)  # black, normalised with mean 0.5, std 0.5
        >>> pixels[:, 0, 1] = -1.0 + 2 / 255  # an 8-bit value of 1
        >>> nonzero_pixels((0.5,) * 3, (0.5,) * 3)(pixels).tolist()
        [[False, True]]

        ```
    """
    mean_ = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std_ = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def rule(pixel_values: torch.Tensor) -> torch.Tensor:
        return (pixel_values.float() * std_ + mean_).amax(dim=0) > 0.5 / 255

    return rule


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    """Restore Python's, numpy's and torch's CPU RNG states on exit: the caller's random streams are untouched."""
    states = random.getstate(), np.random.get_state(), torch.random.default_generator.get_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.default_generator.set_state(states[2])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.random.default_generator.manual_seed(seed)


class ImageTransform:
    """Batch transform for `Dataset.with_transform`: decode, crop to `bbox`, `to_rgb`, then a pixel pipeline.

    Maps `{"image": [...], "label": [...], "index": [...]}` to `pixel_values` (N, 3, H, W) float32, `labels` (N,)
    int64, when the batch has it, `index` (N,) int64 and, with an `object_mask` rule, `object_mask` (N, H, W) bool
    (the rule applied to each transformed image, so it follows the augmentation). Training augmentation is seeded
    per sample by (seed, epoch, index), so a resumed run sees the same augmented images; call `set_epoch` with the
    0-based Trainer epoch at each epoch start. The epoch lives in shared memory, so DataLoader workers (persistent
    ones included) see it.

    Example:
        ```python
        >>> import datasets, PIL.Image
        >>> from protopool_hf.data import from_hf_dataset
        >>> from protopool_hf.transforms import collate_fn, make_transforms
        >>> raw = datasets.Dataset.from_dict(
        ...     {"image": [PIL.Image.new("L", (40, 30)), PIL.Image.new("RGBA", (20, 20))], "label": [0, 1]},
        ...     features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])}),
        ... )
        >>> transform = make_transforms({"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3}, train=True)
        >>> transform.set_epoch(0)
        >>> ds = from_hf_dataset(raw).with_transform(transform)
        >>> batch = collate_fn([ds[0], ds[1]])
        >>> batch["pixel_values"].shape, batch["labels"].tolist()
        (torch.Size([2, 3, 32, 32]), [0, 1])

        ```
    """

    def __init__(
        self,
        pipeline: Callable[[PIL.Image.Image], torch.Tensor],
        train: bool,
        seed: int | None = 0,
        num_labels: int | None = None,
        skip_bad_images: bool = False,
        object_mask: ObjectMask | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.object_mask = object_mask
        self.train = train
        self.seed = seed
        self.num_labels = num_labels
        self.skip_bad_images = skip_bad_images
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._warned: set[str] = set()

    @property
    def epoch(self) -> int:
        """The epoch that seeds the augmentation."""
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Set the 0-based training epoch that seeds the augmentation (from a callback's `on_epoch_begin`)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}.")
        self._epoch.fill_(int(epoch))

    def sample_seed(self, index: int) -> int:
        """The RNG seed of sample `index` at the current epoch: a hash of (seed, epoch, index)."""
        key = f"{int(self.seed)},{self.epoch},{int(index)}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")

    def __call__(self, batch: dict[str, list]) -> dict[str, torch.Tensor]:
        """Transform a batch dict of lists; see the class docstring."""
        if "image" not in batch or "label" not in batch:
            raise ValueError(f"Batches need 'image' and 'label' columns, got {list(batch)}: use from_hf_dataset.")
        indices = batch.get("index")
        seeded = self.train and self.seed is not None
        if seeded and indices is None:
            raise ValueError(
                "Seeded training augmentation needs an 'index' column: load the data with protopool_hf.data "
                "(or from_hf_dataset), or pass seed=None for unseeded augmentation."
            )
        n = len(batch["image"])
        class_ids = torch.as_tensor([int(label) for label in batch["label"]], dtype=torch.int64)
        check_labels(class_ids, self.num_labels, name="The `label` column", index=indices)
        bboxes, rows = batch.get("bbox", [None] * n), []
        with _preserved_rng() if seeded else contextlib.nullcontext():
            for value, bbox, label, index in zip(
                batch["image"], bboxes, batch["label"], indices or [None] * n, strict=True
            ):
                index = None if index is None else int(index)
                image = self._decode(value, bbox, index)
                if image is not None:
                    if seeded:
                        _seed_all(self.sample_seed(index))
                    rows.append((self.pipeline(image), int(label), index))
        if not rows:
            raise UnreadableImageError("Every image of this batch is unreadable (see the warnings above).")
        pixels, labels, kept = zip(*rows, strict=True)
        out = {"pixel_values": torch.stack(pixels), "labels": torch.tensor(labels, dtype=torch.int64)}
        if indices is not None:
            out["index"] = torch.tensor(kept, dtype=torch.int64)
        if self.object_mask is not None:
            out["object_mask"] = torch.stack([self.object_mask(p) for p in pixels])
        return out

    def _decode(self, value: Any, bbox: Sequence[float] | None, index: int | None) -> PIL.Image.Image | None:
        try:
            return decode_row(value, bbox, index)
        except UnreadableImageError as exc:
            if not self.skip_bad_images:
                raise
            if str(exc) not in self._warned:
                self._warned.add(str(exc))
                warnings.warn(f"Skipping an unreadable image: {exc}", stacklevel=3)
            return None


def _official_augmentation(interpolation: str) -> Callable[[PIL.Image.Image], PIL.Image.Image]:
    """Online form of the official offline augmentation: one of rotate ±15°, shear ±10°, skew 0.2; then a flip."""
    from timm.data.transforms import str_to_interp_mode
    from torchvision import transforms

    mode = str_to_interp_mode(interpolation)
    one_of = [
        transforms.RandomRotation(15, interpolation=mode),
        transforms.RandomAffine(0, shear=(-10, 10, -10, 10), interpolation=mode),
        transforms.RandomPerspective(distortion_scale=0.2, p=1.0, interpolation=mode),
    ]
    return transforms.Compose([transforms.RandomChoice(one_of), transforms.RandomHorizontalFlip()])


def make_transforms(
    config: Any,
    train: bool,
    augmentation: str = "timm",
    *,
    seed: int | None = 0,
    skip_bad_images: bool = False,
    object_mask: str | ObjectMask | None = None,
) -> ImageTransform:
    """Build the batch transform for training or evaluation from the config's timm data config.

    Args:
        config: a `ProtoPoolConfig` (its `data_config()` gives input_size, mean, std, interpolation, crop_pct) or
            such a data-config mapping itself.
        train: training augmentation (seeded by seed, epoch and index) or the deterministic eval transform.
        augmentation: `"timm"`: timm's `create_transform` for the backbone (train: random resized crop, flip, colour
            jitter). `"official"`: for training, one of rotation ±15°, shear ±10° or perspective skew 0.2, then a
            horizontal flip (online equivalents of the official offline augmentation; corners fill black), then the
            eval transform. Evaluation always uses the config's eval transform, `preprocessing.EvalTransform`: the
            stock image processor saved with the model, so pixel values are bit-exact with `AutoImageProcessor`'s
            (`crop_pct`, `crop_mode`: the presets squash to H × W without crop, as the official code).
        seed: seeds the training augmentation; `None` uses the global RNGs (not reproducible).
        skip_bad_images: skip unreadable images with one warning each instead of raising `UnreadableImageError`.
        object_mask: add `object_mask` (H, W) bool to every row, for the background term (`background_weight`) and
            the restricted projection: `"nonzero"` (objects on black, as Fashion-MNIST: `nonzero_pixels`) or a
            function of the transformed `(3, H, W)` pixel values. Colour jitter lifts black and would make the
            `"nonzero"` rule see object everywhere, so with it timm's augmentation has none unless a data-config
            mapping asks for `color_jitter`.

    Returns:
        An `ImageTransform`; apply it with `ds.with_transform(...)` and batch with `collate_fn`.
    """
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got {augmentation!r}.")
    if object_mask not in (None, *OBJECT_MASKS) and not callable(object_mask):
        raise ValueError(f"object_mask must be one of {OBJECT_MASKS}, a function or None, got {object_mask!r}.")
    eval_transform = EvalTransform(config)
    data_config = eval_transform.data_config
    nonzero = object_mask == "nonzero"
    if nonzero:
        object_mask = nonzero_pixels(data_config["mean"], data_config["std"])
    if not train:
        pipeline: Callable[[PIL.Image.Image], torch.Tensor] = eval_transform
    elif augmentation == "official":
        from torchvision import transforms

        # The official code's online equivalent: augment the full image, then its eval resize (the presets squash).
        pipeline = transforms.Compose([_official_augmentation(data_config["interpolation"]), eval_transform])
    else:
        from timm.data import create_transform

        # timm's own training options in a data-config mapping (scale, ratio, hflip, color_jitter, ...) pass through.
        options = dict(config) if isinstance(config, Mapping) else {}
        if nonzero:  # the rule needs black to stay black: no colour jitter unless the mapping asks for it
            options.setdefault("color_jitter", None)
        pipeline = create_transform(**{**options, **data_config}, is_training=True)
    num_labels = getattr(config, "num_labels", None)
    return ImageTransform(
        pipeline,
        train=train,
        seed=seed,
        num_labels=num_labels,
        skip_bad_images=skip_bad_images,
        object_mask=object_mask,
    )


def collate_fn(examples: Sequence[Mapping[str, Any]], keep_index: bool = False) -> dict[str, torch.Tensor]:
    """Stack transformed examples into a batch (a `Trainer` `data_collator`).

    Args:
        examples: rows of an `ImageTransform`-ed dataset (`pixel_values` (3, H, W), `labels`, maybe `index`).
        keep_index: keep `index` (N,) in the batch, e.g. for projection; the model's `forward` does not take it.

    Returns:
        `pixel_values` (N, 3, H, W) and `labels` (N,) int64 (and `index` (N,) int64 when asked; `object_mask`
        (N, H, W) bool when the rows have it).
    """
    if not examples:
        raise ValueError("collate_fn got an empty batch (were all of its images skipped as unreadable?).")
    batch = {
        "pixel_values": torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples]),
        "labels": torch.tensor([int(e["labels"]) for e in examples], dtype=torch.int64),
    }
    if keep_index:
        batch["index"] = torch.tensor([int(e["index"]) for e in examples], dtype=torch.int64)
    if all("object_mask" in e for e in examples):
        batch["object_mask"] = torch.stack([torch.as_tensor(e["object_mask"]) for e in examples])
    return batch
