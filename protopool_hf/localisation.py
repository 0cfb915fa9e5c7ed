"""Where a prototype is in an image: the upsampled latent map (the official way) and a gradient-based map.

Shape alphabet: N images, K prototypes per image, H, W feature-map size, H_in, W_in model input.

Two localisations of prototype p on an image, both `(H_in, W_in)` maps (larger means "more of p here"):

- `"upsampled"`: φ(d) = log((d + 1) / (d + ε)) of p's squared distance to every latent patch, upsampled bicubically
  to the input (`maps.upsample_map`, OpenCV's `INTER_CUBIC`): what the pictures draw and the official code
  uses. It assumes a latent cell looks at the input pixels under it, which is false for deep maps with a large
  receptive field (Xu-Darme et al., CVPR-W 2023, "Sanity checks for patch visualisation in prototype-based image
  classification").
- `"gradient"`: SmoothGrad (Smilkov et al., 2017) of p's image similarity φ(min over locations of d) with respect to
  the input pixels: the mean over `samples` noisy copies (Gaussian noise of std `noise` × the input's value range) of
  the absolute gradient, summed over the colour channels. It says which pixels the similarity actually depends on.

The box of a map is `maps.high_activation_box`: the bounding box of the pixels at or above its 95th
percentile, as the pictures draw it.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .layers import log_similarity
from .maps import distance_maps, high_activation_box, model_device, upsample_map


__all__ = [
    "LOCALISATIONS",
    "SmoothGrad",
    "check_localisations",
    "localisation_maps",
    "map_boxes",
]

LOCALISATIONS = ("upsampled", "gradient")


@dataclass(frozen=True)
class SmoothGrad:
    """Parameters of the gradient localisation.

    Attributes:
        samples: noisy copies averaged per image.
        noise: std of the Gaussian noise, as a fraction of the image's value range (max − min).
        seed: seed of the noise (a local generator: the global RNG is not touched).

    Example:
        ```python
        >>> import torch
        >>> from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification
        >>> from protopool_hf.localisation import SmoothGrad, localisation_maps, map_boxes
        >>> config = ProtoPoolConfig(
        ...     backbone="test_resnet", num_labels=2, num_prototypes=4, num_slots_per_class=1, input_size=[3, 64, 64]
        ... )
        >>> model = ProtoPoolForImageClassification(config).eval()
        >>> images = torch.randn(2, 3, 64, 64)
        >>> maps = localisation_maps(model, images, [[0, 3], [1, 2]], "gradient", SmoothGrad(samples=2))
        >>> maps.shape, map_boxes(maps).shape  # (N, K, H_in, W_in) maps, one box per map
        ((2, 2, 64, 64), (2, 2, 4))

        ```
    """

    samples: int = 8
    noise: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"SmoothGrad samples must be >= 1, got {self.samples}.")
        if self.noise < 0:
            raise ValueError(f"SmoothGrad noise must be >= 0, got {self.noise}.")


def check_localisations(localisation: str | Sequence[str]) -> tuple[str, ...]:
    """`"upsampled"`, `"gradient"` or a sequence of them -> a tuple without repeats; raises on an unknown name."""
    names = (localisation,) if isinstance(localisation, str) else tuple(localisation)
    unknown = [name for name in names if name not in LOCALISATIONS]
    if unknown or not names:
        raise ValueError(f"localisation must be one or more of {list(LOCALISATIONS)}, got {localisation!r}.")
    return tuple(dict.fromkeys(names))


def _upsampled(
    model: torch.nn.Module, pixel_values: torch.Tensor, prototype_ids: np.ndarray, distances: torch.Tensor | None
) -> np.ndarray:
    if distances is None:
        distances = distance_maps(model, pixel_values)
    maps = log_similarity(distances, model.config.similarity_epsilon)
    size = tuple(pixel_values.shape[-2:])
    out = np.zeros((*prototype_ids.shape, *size), dtype=np.float32)
    for n in range(prototype_ids.shape[0]):
        for k, p in enumerate(prototype_ids[n]):
            out[n, k] = upsample_map(maps[n, int(p)], size)
    return out


def _gradient(
    model: torch.nn.Module, pixel_values: torch.Tensor, prototype_ids: np.ndarray, smoothgrad: SmoothGrad
) -> np.ndarray:
    device, dtype = model_device(model)
    generator = torch.Generator().manual_seed(smoothgrad.seed)
    num_ids = prototype_ids.shape[1]
    out = np.zeros((*prototype_ids.shape, *pixel_values.shape[-2:]), dtype=np.float32)
    epsilon = model.config.similarity_epsilon
    for n in range(pixel_values.shape[0]):
        image = pixel_values[n].float().cpu()
        spread = float(image.max() - image.min()) or 1.0
        noise = torch.randn((smoothgrad.samples, *image.shape), generator=generator) * smoothgrad.noise * spread
        # One batch per image: K prototypes × samples noisy copies; row r scores prototype ids[r // samples].
        batch = (image[None] + noise).repeat(num_ids, 1, 1, 1).to(device=device, dtype=dtype).requires_grad_(True)
        ids = torch.as_tensor(prototype_ids[n], device=device).repeat_interleave(smoothgrad.samples)
        with torch.enable_grad():
            distances = model.prototype_distances(batch).flatten(2)  # (K·samples, P, H·W)
            chosen = distances[torch.arange(len(ids), device=device), ids]  # (K·samples, H·W)
            similarity = log_similarity(chosen.amin(dim=1), epsilon)
            (gradient,) = torch.autograd.grad(similarity.sum(), batch)
        magnitude = gradient.detach().float().abs().sum(dim=1).cpu()  # (K·samples, H_in, W_in)
        out[n] = magnitude.view(num_ids, smoothgrad.samples, *magnitude.shape[-2:]).mean(dim=1).numpy()
    return out


def localisation_maps(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    prototype_ids: Sequence[Sequence[int]] | np.ndarray,
    method: str = "upsampled",
    smoothgrad: SmoothGrad | None = None,
    distances: torch.Tensor | None = None,
) -> np.ndarray:
    """The localisation map of given prototypes on given images.

    Args:
        model: a `ProtoPoolForImageClassification` (put it in eval mode first).
        pixel_values: `(N, 3, H_in, W_in)` normalised images.
        prototype_ids: `(N, K)` prototype ids: K prototypes for each image.
        method: `"upsampled"` or `"gradient"` (see the module docstring).
        smoothgrad: parameters of `"gradient"` (default `SmoothGrad()`).
        distances: the images' `(N, P, H, W)` distances when already computed (`maps.distance_maps`): the
            upsampled maps then need no forward pass.

    Returns:
        `(N, K, H_in, W_in)` float32 maps.
    """
    (method,) = check_localisations(method)
    ids = np.asarray(prototype_ids, dtype=np.int64).reshape(pixel_values.shape[0], -1)
    num = int(model.config.num_prototypes)
    if ids.size and (ids.min() < 0 or ids.max() >= num):
        raise ValueError(f"prototype ids must be in [0, {num}), got {ids.min()}..{ids.max()}.")
    if method == "upsampled":
        return _upsampled(model, pixel_values, ids, distances)
    return _gradient(model, pixel_values, ids, smoothgrad or SmoothGrad())


def map_boxes(maps: np.ndarray, percentile: float = 95) -> np.ndarray:
    """`(..., H_in, W_in)` maps -> `(..., 4)` int64 high-activation boxes `(top, bottom, left, right)`, exclusive ends."""
    flat = maps.reshape(-1, *maps.shape[-2:])
    boxes = np.array([high_activation_box(m, percentile) for m in flat], dtype=np.int64).reshape(-1, 4)
    return boxes.reshape(*maps.shape[:-2], 4)
