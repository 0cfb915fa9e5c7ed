"""Reading stored images: decode to 8-bit RGB (EXIF orientation applied), crop to a box, name the file on failure.

Used by the dataset loaders' decoded view (`protopool_hf.data`), the pixel transforms (`protopool_hf.transforms`) and
the pictures. An image that cannot be read raises [`UnreadableImageError`], whose message names the file and says
what to do.
"""

import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps


__all__ = ["UnreadableImageError", "decode_image", "decode_row", "to_rgb"]


class UnreadableImageError(OSError):
    """An image file (or stored image) that cannot be decoded; the message names it.

    Example:
        ```python
        >>> from protopool_hf.images import UnreadableImageError, decode_image
        >>> decode_image(b"not an image", name="row 3")
        Traceback (most recent call last):
        ...
        protopool_hf.images.UnreadableImageError: Cannot read image row 3: ...

        ```
    """


# --------------------------------------------------------------------------- colour


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Convert any PIL image to 8-bit RGB.

    Transparent images (RGBA, LA, PA, palette or greyscale with a transparency key) are composited on white.
    16-bit greyscale (`I;16*`, and `I`, read as the 16-bit range PNG decoders give it) is scaled by 255/65535,
    where a plain `convert` would clip everything above 255 to white. CMYK uses PIL's conversion.

    Args:
        image: a PIL image of any mode.

    Returns:
        An RGB image of the same size (the input itself when it already is plain RGB).
    """
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"to_rgb expects a PIL.Image.Image, got {type(image).__name__}.")
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        wide = np.clip(np.asarray(image, dtype=np.float64), 0, 65535)
        return PIL.Image.fromarray(np.rint(wide / 257.0).astype(np.uint8), mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


# --------------------------------------------------------------------------- decoding


def decode_image(value: Any, name: str | None = None) -> PIL.Image.Image:
    """Decode one stored image to 8-bit RGB, applying its EXIF orientation.

    Args:
        value: a `datasets.Image` value (`{"path", "bytes"}`), a path, raw bytes, or a PIL image.
        name: how to name the image in errors when it has no path (e.g. `"index 12"`).

    Returns:
        The RGB image, fully loaded.

    Raises:
        UnreadableImageError: the file is missing, empty, truncated, not an image, or too large for PIL's
            decompression-bomb limit; the message names it.
    """
    if isinstance(value, PIL.Image.Image):
        return to_rgb(value)
    path, data = (value.get("path"), value.get("bytes")) if isinstance(value, Mapping) else (None, None)
    if isinstance(value, str | os.PathLike):
        path = os.fspath(value)
    elif isinstance(value, bytes | bytearray):
        data = bytes(value)
    label = path or name or "image"
    if path is None and data is None:
        raise UnreadableImageError(f"{label}: no path and no bytes to decode (value {value!r}).")
    try:
        image = PIL.Image.open(io.BytesIO(data) if data is not None else path)
        image.load()
        image = PIL.ImageOps.exif_transpose(image)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        hint = " (raise PIL.Image.MAX_IMAGE_PIXELS to allow it)" if "decompression bomb" in str(exc) else ""
        raise UnreadableImageError(
            f"Cannot read image {label}: {exc}{hint}. Replace or remove the file, or skip unreadable images with "
            "make_transforms(..., skip_bad_images=True)."
        ) from exc
    return to_rgb(image)


def _crop(image: PIL.Image.Image, bbox: Sequence[float], label: str) -> PIL.Image.Image:
    x, y, w, h = (float(v) for v in bbox)
    box = (max(0, round(x)), max(0, round(y)), min(image.width, round(x + w)), min(image.height, round(y + h)))
    if box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"Bounding box {list(bbox)} of {label} lies outside its {image.width}x{image.height} image.")
    return image.crop(box)


def decode_row(value: Any, bbox: Sequence[float] | None, index: int | None) -> PIL.Image.Image:
    """Decode a dataset row's image and crop it to its `bbox` (`[x, y, width, height]` in pixels) when it has one."""
    name = f"at index {index}" if index is not None else None
    image = decode_image(value, name=name)
    if bbox is None:
        return image
    path = value.get("path") if isinstance(value, Mapping) else None
    return _crop(image, bbox, path or name or "image")
