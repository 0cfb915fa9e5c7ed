"""The eval preprocessing of ProtoPool models, in one place: a stock transformers image processor.

Shape alphabet: H_in, W_in model input; H_0, W_0 the original image.

Everything that turns a photo into model input at evaluation time comes from here: the `preprocessor_config.json`
that `save_pretrained` writes (what `AutoImageProcessor` and `pipeline` apply), the library's eval transform
(training's projection and validation data, `explain`, the pictures) and the pictures' geometry (the model view and
where it sits in the original image). They are one object, the `BitImageProcessor` that
`AutoImageProcessor.from_pretrained(folder)` instantiates by default (its torchvision backend), so they agree bit for
bit for every image size. Training augmentation stays timm's (`protopool_hf.transforms.make_transforms`).

The processor resizes, then crops the centre `H_in × W_in` (the crop offset is floored), rescales to [0, 1] and
normalises with the config's mean and std:

- `crop_mode="squash"`: resize to `(H_in / crop_pct, W_in / crop_pct)` (floored) regardless of the aspect ratio; with
  `crop_pct=1` (the presets, as the official `Resize((224, 224))`) nothing is cropped.
- `crop_mode="center"`: resize the shorter side to `max(H_in, W_in) / crop_pct` (floored), keeping the aspect ratio.

This module is copied with the modeling file for `trust_remote_code`: it imports only torch, PIL and transformers.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import PIL.Image
import torch


__all__ = [
    "CROP_MODES",
    "INTERPOLATIONS",
    "OFFICIAL_PREPROCESSING",
    "EvalTransform",
    "Geometry",
    "eval_data_config",
    "image_processor",
    "image_processor_dict",
]

#: Preprocessing of the official code, as config fields: `Resize((224, 224))`, ImageNet mean and std, no crop. The
#: `cub200` / `cars196` presets and converted official checkpoints use it.
OFFICIAL_PREPROCESSING: dict[str, Any] = {
    "input_size": [3, 224, 224],
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "interpolation": "bilinear",
    "crop_pct": 1.0,
    "crop_mode": "squash",
}
#: Resampling filters the stock processor's default (torchvision) backend can apply, with their PIL codes.
INTERPOLATIONS: dict[str, int] = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3}
CROP_MODES = ("center", "squash")
#: What timm's eval transform uses when a data config names no interpolation, crop_pct or crop_mode.
_DEFAULTS = {"interpolation": "bilinear", "crop_pct": 0.875, "crop_mode": "center"}
_PROCESSOR_CLASS = "BitImageProcessor"


def eval_data_config(config: Any, input_size: Sequence[int] | None = None) -> dict[str, Any]:
    """The checked eval preprocessing of `config`, as a timm data config.

    Args:
        config: a `ProtoPoolConfig` (its `data_config()`) or a timm data-config mapping with at least `input_size`,
            `mean` and `std`; a missing `interpolation`, `crop_pct` or `crop_mode` takes timm's eval default
            (bilinear, 0.875, center).
        input_size: `(3, H_in, W_in)` to use instead of the config's (e.g. a projection's recorded size).

    Returns:
        `input_size`, `mean`, `std`, `interpolation`, `crop_pct` and `crop_mode`.

    Raises:
        ValueError: a field is missing or out of range; the message names it.
    """
    data = dict(config.data_config() if hasattr(config, "data_config") else config)
    missing = {"input_size", "mean", "std"} - set(data)
    if missing:
        raise ValueError(
            f"The data config {data} lacks {sorted(missing)}: pass a ProtoPoolConfig or its data_config()."
        )
    if input_size is not None:
        data["input_size"] = input_size
    size = tuple(data["input_size"])
    if len(size) != 3 or size[0] != 3 or not all(_is_int(v) and v > 0 for v in size):
        raise ValueError(f"input_size must be (3, H, W): images are converted to RGB; got {data}.")
    resolved = {key: data.get(key) if data.get(key) is not None else default for key, default in _DEFAULTS.items()}
    if resolved["interpolation"] not in INTERPOLATIONS:
        raise ValueError(
            f"interpolation {resolved['interpolation']!r} is not supported by transformers' image processors "
            f"(torchvision backend): choose one of {sorted(INTERPOLATIONS)}."
        )
    crop_pct = resolved["crop_pct"]
    if isinstance(crop_pct, bool) or not isinstance(crop_pct, int | float) or not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {resolved['crop_pct']!r}.")
    if resolved["crop_mode"] not in CROP_MODES:
        raise ValueError(f"crop_mode must be one of {CROP_MODES}, got {resolved['crop_mode']!r}.")
    mean, std = tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"])
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need one value per RGB channel, got mean {mean} and std {std}.")
    return {"input_size": size, "mean": mean, "std": std, **resolved, "crop_pct": float(crop_pct)}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def image_processor_dict(config: Any, input_size: Sequence[int] | None = None) -> dict[str, Any]:
    """The `preprocessor_config.json` of a model: a stock `BitImageProcessor` doing the config's eval preprocessing.

    `AutoImageProcessor.from_pretrained(folder)` reads it without `trust_remote_code` or this package, and by default
    instantiates the torchvision-backend `BitImageProcessor` that `EvalTransform` uses (`backend="pil"` gives
    `BitImageProcessorPil`, whose resize differs by up to one grey level).

    Args:
        config: see `eval_data_config`.
        input_size: see `eval_data_config`.

    Returns:
        The JSON-ready processor config.
    """
    data = eval_data_config(config, input_size)
    _, height, width = data["input_size"]
    crop_pct = data["crop_pct"]
    if data["crop_mode"] == "squash":
        size = {"height": math.floor(height / crop_pct), "width": math.floor(width / crop_pct)}
    else:
        size = {"shortest_edge": math.floor(max(height, width) / crop_pct)}
    return {
        "image_processor_type": _PROCESSOR_CLASS,
        "do_resize": True,
        "size": size,
        "resample": INTERPOLATIONS[data["interpolation"]],
        "do_center_crop": True,
        "crop_size": {"height": height, "width": width},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(data["mean"]),
        "image_std": list(data["std"]),
        "do_convert_rgb": True,
    }


def image_processor(config: Any, input_size: Sequence[int] | None = None) -> Any:
    """The image processor that `AutoImageProcessor.from_pretrained` builds from `image_processor_dict(config)`.

    Args:
        config: see `eval_data_config`.
        input_size: see `eval_data_config`.

    Returns:
        A transformers `BitImageProcessor` (torchvision backend).
    """
    import transformers

    return getattr(transformers, _PROCESSOR_CLASS).from_dict(image_processor_dict(config, input_size))


@dataclass(frozen=True)
class Geometry:
    """Where the model input sits in an original image: resize to `resized_size`, then crop `crop_box`.

    Coordinates are continuous pixel coordinates (pixel `i` covers `[i, i + 1)`), `(y, x)` order.

    Attributes:
        image_size: `(H_0, W_0)` of the original image.
        resized_size: `(H_r, W_r)` after the resize.
        crop_box: `(top, left, H_in, W_in)` of the crop, in resized pixels.

    Example:
        ```python
        >>> from protopool_hf.preprocessing import Geometry
        >>> geometry = Geometry(image_size=(300, 400), resized_size=(150, 200), crop_box=(11, 36, 128, 128))
        >>> geometry.scale, geometry.to_original(0, 0), geometry.to_input(22, 72)
        ((2.0, 2.0), (22.0, 72.0), (0.0, 0.0))
        >>> geometry.box_to_original((0, 0, 128, 128))  # the crop, in the original image's pixels
        (22.0, 72.0, 278.0, 328.0)

        ```
    """

    image_size: tuple[int, int]
    resized_size: tuple[int, int]
    crop_box: tuple[int, int, int, int]

    @property
    def scale(self) -> tuple[float, float]:
        """`(sy, sx)`: original pixels per model-input pixel along each axis."""
        return self.image_size[0] / self.resized_size[0], self.image_size[1] / self.resized_size[1]

    def to_original(self, y: float, x: float) -> tuple[float, float]:
        """Map a point of the model input to the original image."""
        (sy, sx), (top, left) = self.scale, self.crop_box[:2]
        return (y + top) * sy, (x + left) * sx

    def to_input(self, y: float, x: float) -> tuple[float, float]:
        """Map a point of the original image to the model input (outside `[0, H_in) × [0, W_in)` when cropped)."""
        (sy, sx), (top, left) = self.scale, self.crop_box[:2]
        return y / sy - top, x / sx - left

    def box_to_original(self, box: Sequence[float]) -> tuple[float, float, float, float]:
        """Map a model-input box `(top, left, bottom, right)` to the original image."""
        top, left = self.to_original(box[0], box[1])
        bottom, right = self.to_original(box[2], box[3])
        return top, left, bottom, right


class EvalTransform:
    """The eval transform: the stock image processor of `image_processor(config)`, one image at a time.

    `transform(image)` is bit-exact with `AutoImageProcessor.from_pretrained(folder)(image)["pixel_values"][0]` for a
    model saved with this config, and with `transform.normalise(transform.view(image))`, so pictures drawn on the
    view and the pixel values the model saw are one.

    Args:
        config: see `eval_data_config`.
        input_size: see `eval_data_config`.

    Example:
        ```python
        >>> import PIL.Image
        >>> from protopool_hf.preprocessing import EvalTransform
        >>> transform = EvalTransform({"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3})
        >>> photo = PIL.Image.new("RGB", (50, 20), (255, 0, 0))
        >>> tuple(transform(photo).shape), transform.view(photo).size
        ((3, 32, 32), (32, 32))
        >>> transform.geometry(photo).crop_box  # 20 px high -> 36 px (32 / 0.875); 50 px wide -> 90 px
        (2, 29, 32, 32)

        ```
    """

    def __init__(self, config: Any, input_size: Sequence[int] | None = None) -> None:
        self.data_config = eval_data_config(config, input_size)
        self.processor = image_processor(self.data_config)

    def __call__(self, image: PIL.Image.Image) -> torch.Tensor:
        """`(3, H_in, W_in)` float32 pixel values of an RGB image."""
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def view(self, image: PIL.Image.Image) -> PIL.Image.Image:
        """The model view: the processor's resize and crop, before rescaling; an RGB image of `W_in × H_in`."""
        pixels = self.processor(images=image, return_tensors="pt", do_rescale=False, do_normalize=False)
        pixels = pixels["pixel_values"][0]
        if pixels.dtype != torch.uint8:  # the torchvision backend resizes uint8 tensors to uint8
            raise TypeError(f"{type(self.processor).__name__} resized to {pixels.dtype}, not uint8 pixels.")
        return PIL.Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy(), mode="RGB")

    def normalise(self, view: PIL.Image.Image) -> torch.Tensor:
        """`(3, H_in, W_in)` float32 pixel values of a model view: the processor's rescale and normalisation."""
        if view.size != (self.data_config["input_size"][2], self.data_config["input_size"][1]):
            raise ValueError(
                f"A model view must be {self.data_config['input_size'][1:]} (H, W), got {view.size[::-1]}."
            )
        out = self.processor(images=view, return_tensors="pt", do_resize=False, do_center_crop=False)
        return out["pixel_values"][0]

    def geometry(self, image: PIL.Image.Image | Sequence[int]) -> Geometry:
        """Where the model input sits in `image` (a PIL image, or its `(H_0, W_0)`)."""
        from transformers.image_transforms import get_resize_output_image_size
        from transformers.image_utils import ChannelDimension

        height, width = (image.height, image.width) if isinstance(image, PIL.Image.Image) else map(int, image)
        size, crop = self.processor.size, self.processor.crop_size
        if size.shortest_edge:  # the processor's own helper, on an empty (0, H_0, W_0) tensor
            empty = torch.empty(0, height, width)
            resized = get_resize_output_image_size(
                empty, size=size.shortest_edge, default_to_square=False, input_data_format=ChannelDimension.FIRST
            )
        else:
            resized = (size.height, size.width)
        top, left = int((resized[0] - crop.height) / 2.0), int((resized[1] - crop.width) / 2.0)  # its centre_crop
        return Geometry((height, width), (int(resized[0]), int(resized[1])), (top, left, crop.height, crop.width))
