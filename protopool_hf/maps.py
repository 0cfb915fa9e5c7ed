"""Where a prototype fires: the model view of an image, similarity maps, their upsampling and high-activation boxes.

Shape alphabet: N batch, P prototypes, H, W feature-map size, H_in, W_in model input.

Every map is drawn on the *model view* of an image: the image the model saw, i.e. the eval transform's resize and
centre crop (`protopool_hf.preprocessing.EvalTransform`, the stock image processor saved with the model), without the
normalisation, so colours are the photo's own (the official code min-max rescales normalised tensors instead, which
shifts them). The activation of a prototype is φ(d) = log((d + 1) / (d + ε)) of its squared distance to every latent
patch, upsampled bicubically to the model view; its high-activation box is the bounding box of the pixels at or above
the map's 95th percentile (the official rule).

Example:
    ```python
    >>> import PIL.Image
    >>> from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification
    >>> from protopool_hf.maps import high_activation_box, model_view, prototype_activation
    >>> config = ProtoPoolConfig(backbone="test_resnet", num_labels=2, num_prototypes=4, num_slots_per_class=1)
    >>> model = ProtoPoolForImageClassification(config)
    >>> photo = PIL.Image.new("RGB", (200, 150), "orange")
    >>> activation = prototype_activation(model, photo, 3)
    >>> model_view(photo, config).size, activation.shape
    ((160, 160), (160, 160))
    >>> top, bottom, left, right = high_activation_box(activation)
    >>> 0 <= top < bottom <= 160 and 0 <= left < right <= 160
    True

    ```
"""

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from .images import decode_image, to_rgb
from .layers import log_similarity
from .preprocessing import EvalTransform, eval_data_config
from .torch_utils import evaluating


__all__ = [
    "distance_maps",
    "high_activation_box",
    "model_device",
    "model_view",
    "preprocess",
    "prototype_activation",
    "similarity_maps",
    "upsample_map",
]


# --------------------------------------------------------------------------- the model view of an image


def _as_pil(image: Any) -> PIL.Image.Image:
    """A PIL image, a path, or a stored-image value (`{"path", "bytes"}`, bytes) -> 8-bit RGB PIL image."""
    if isinstance(image, PIL.Image.Image):
        return to_rgb(image)
    if isinstance(image, str | os.PathLike) and not Path(image).is_file():
        raise FileNotFoundError(f"Image file {image} not found.")
    return decode_image(image)


def model_view(image: Any, config: Any, processor: Any | None = None) -> PIL.Image.Image:
    """The image the model sees, before normalisation: the eval transform's resize and centre crop.

    Args:
        image: a PIL image (any mode), a path, or a normalised `(3, H_in, W_in)` / `(1, 3, H_in, W_in)` tensor
            (pixel values already preprocessed with the config's mean and std, which are undone).
        config: a `ProtoPoolConfig` or its `data_config()` mapping.
        processor: a transformers image processor to use instead of the config's preprocessing; its resize and crop
            are applied with normalisation switched off.

    Returns:
        An RGB image of the model's input size `W_in × H_in`.
    """
    if isinstance(image, torch.Tensor):
        return _tensor_to_view(image, eval_data_config(config))
    pil = _as_pil(image)
    if processor is not None:
        pixels = processor(images=pil, return_tensors="pt", do_normalize=False)["pixel_values"]
        array = pixels[0].float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
        return PIL.Image.fromarray(array, mode="RGB")
    return EvalTransform(config).view(pil)


def _tensor_to_view(pixel_values: torch.Tensor, data_config: Mapping[str, Any]) -> PIL.Image.Image:
    if pixel_values.ndim == 4 and pixel_values.shape[0] == 1:
        pixel_values = pixel_values[0]
    if pixel_values.ndim != 3 or pixel_values.shape[0] != 3:
        raise ValueError(
            f"An image tensor must be normalised pixel values of shape (3, H, W) or (1, 3, H, W), got "
            f"{tuple(pixel_values.shape)}."
        )
    mean = torch.tensor(data_config["mean"], dtype=torch.float32)[:, None, None]
    std = torch.tensor(data_config["std"], dtype=torch.float32)[:, None, None]
    unit = (pixel_values.detach().float().cpu() * std + mean).clamp(0, 1)
    return PIL.Image.fromarray(unit.mul(255).round().byte().permute(1, 2, 0).numpy(), mode="RGB")


def preprocess(image: Any, config: Any, processor: Any | None = None) -> torch.Tensor:
    """Preprocess one image exactly like the model's eval transform (the processor of `preprocessor_config.json`).

    Args:
        image: a PIL image, a path, or an already normalised `(3, H_in, W_in)` / `(1, 3, H_in, W_in)` tensor
            (returned as a batch of one).
        config: a `ProtoPoolConfig` or its `data_config()` mapping.
        processor: a transformers image processor to use instead (`processor(images=..., return_tensors="pt")`).

    Returns:
        `(1, 3, H_in, W_in)` float32 pixel values.
    """
    if isinstance(image, torch.Tensor):
        pixels = image if image.ndim == 4 else image[None]
        if pixels.ndim != 4 or pixels.shape[:2] != (1, 3):
            raise ValueError(f"An image tensor must have shape (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}.")
        return pixels.float()
    if processor is not None:
        return processor(images=_as_pil(image), return_tensors="pt")["pixel_values"].float()
    return EvalTransform(config)(_as_pil(image))[None]


# --------------------------------------------------------------------------- activation maps


def model_device(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the model runs: its backbone's device and floating dtype (float32 for a model without float weights)."""
    parameter = next(model.backbone.parameters(), None)
    if parameter is None:
        parameter = model.head.prototypes
    dtype = parameter.dtype if parameter.dtype.is_floating_point else torch.float32
    return parameter.device, dtype


def distance_maps(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """`(N, 3, H_in, W_in)` normalised images -> `(N, P, H, W)` squared distances in float32, on the CPU (eval, no grad)."""
    device, dtype = model_device(model)
    with evaluating(model):
        return model.prototype_distances(pixel_values.to(device=device, dtype=dtype)).float().cpu()


def similarity_maps(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """φ(d) of every prototype at every latent location, the official push's activation.

    Args:
        model: a `ProtoPoolForImageClassification` (set to eval mode for the call).
        pixel_values: `(N, 3, H_in, W_in)` normalised images.

    Returns:
        `(N, P, H, W)` float32 on the CPU; larger means closer.
    """
    return log_similarity(distance_maps(model, pixel_values), model.config.similarity_epsilon)


def upsample_map(activation: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Upsample a `(H, W)` map bicubically (a = −0.75, half-pixel centres: OpenCV's `INTER_CUBIC`) to `size`.

    Args:
        activation: `(H, W)` map.
        size: `(H_in, W_in)` target size.

    Returns:
        `(H_in, W_in)` float32 array.
    """
    tensor = torch.as_tensor(np.asarray(activation, dtype=np.float32))
    if tensor.ndim != 2:
        raise ValueError(f"upsample_map expects a 2-D (H, W) map, got shape {tuple(tensor.shape)}.")
    out = F.interpolate(tensor[None, None], size=tuple(size), mode="bicubic", align_corners=False)
    return out[0, 0].numpy()


def prototype_activation(
    model: torch.nn.Module, image: Any, prototype_id: int, processor: Any | None = None
) -> np.ndarray:
    """The similarity map φ(d) of one prototype on an image, upsampled to the model view.

    Args:
        model: a `ProtoPoolForImageClassification`.
        image: a PIL image, a path or a normalised tensor (see `preprocess`).
        prototype_id: the prototype, in `[0, P)`.
        processor: optional transformers image processor replacing the config's preprocessing.

    Returns:
        `(H_in, W_in)` float32 map, the size of `model_view(image, model.config)`.
    """
    _check_prototype_id(model, prototype_id)
    pixels = preprocess(image, model.config, processor)
    maps = similarity_maps(model, pixels)[0, prototype_id]
    return upsample_map(maps, tuple(pixels.shape[-2:]))


def high_activation_box(activation: np.ndarray, percentile: float = 95) -> tuple[int, int, int, int]:
    """The bounding box of the pixels at or above the map's `percentile`-th percentile (the official rule).

    Args:
        activation: `(H_in, W_in)` map.
        percentile: threshold percentile in [0, 100].

    Returns:
        `(top, bottom, left, right)` in pixels, bottom and right exclusive: the crop is
        `image.crop((left, top, right, bottom))`, or `array[top:bottom, left:right]`.
    """
    activation = np.asarray(activation, dtype=np.float64)
    if activation.ndim != 2 or activation.size == 0:
        raise ValueError(f"high_activation_box expects a non-empty 2-D map, got shape {activation.shape}.")
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}.")
    if not np.isfinite(activation).all():
        raise ValueError("The activation map holds NaN or infinite values; check the model's weights.")
    mask = activation >= np.percentile(activation, percentile)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _check_prototype_id(model: torch.nn.Module, prototype_id: int) -> int:
    num = int(model.config.num_prototypes)
    if isinstance(prototype_id, bool) or not isinstance(prototype_id, int | np.integer) or not 0 <= prototype_id < num:
        raise ValueError(
            f"prototype_id must be an int in [0, {num}) for this model's {num} prototypes, got {prototype_id!r}."
        )
    return int(prototype_id)
