"""Drawing on pictures: the colours, the heat-map colour table and overlay, boxes, fonts, text fitting, cells and grids.

Shape alphabet: H_in, W_in model input.

The one place that decides how the library's pictures look: the prototype pictures, the gallery and class view
(`protopool_hf.gallery`) and the explanation panel (`protopool_hf.explanation`) all draw with these colours and
helpers. It needs only PIL and numpy (the JET colour map is built in); matplotlib (the `viz` extra) is imported only
to use one of its colour maps by name. Text is drawn with Pillow's built-in font, in ASCII (`printable`).

Example:
    ```python
    >>> import numpy as np
    >>> import PIL.Image
    >>> from protopool_hf.drawing import draw_box, heatmap_overlay
    >>> image = PIL.Image.new("RGB", (64, 48), "white")
    >>> activation = np.outer(np.arange(48), np.arange(64)).astype(np.float32)
    >>> picture = draw_box(heatmap_overlay(image, activation), (30, 48, 40, 64))
    >>> picture.size, picture.getpixel((40, 30))  # the box's top-left corner is drawn in BOX_COLOR
    ((64, 48), (255, 221, 0))

    ```
"""

import math
import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from .images import to_rgb


__all__ = [
    "ACCENT",
    "BACKGROUND",
    "BOX_COLOR",
    "CELL_GAP",
    "MUTED",
    "NEGATIVE",
    "PANEL",
    "POSITIVE",
    "TEXT",
    "THUMB_BACKGROUND",
    "cell",
    "class_name",
    "colormap_lut",
    "draw_box",
    "fit_image",
    "fit_text",
    "grid",
    "heatmap_overlay",
    "line_height",
    "load_font",
    "printable",
    "text_width",
    "wrap_text",
]

Color = tuple[int, int, int]

BOX_COLOR: Color = (255, 221, 0)  # the high-activation box
BACKGROUND: Color = (255, 255, 255)  # the page
PANEL: Color = (244, 244, 244)  # a row or bar behind content
THUMB_BACKGROUND: Color = (240, 240, 240)  # around a picture scaled into a square cell
TEXT: Color = (30, 30, 30)
MUTED: Color = (110, 110, 110)  # secondary text, arrows
POSITIVE: Color = (24, 120, 60)
NEGATIVE: Color = (180, 40, 40)
ACCENT: Color = (40, 90, 170)
CELL_GAP = 6  # pixels between the pictures of a cell, and above its text
_REPLACEMENTS = str.maketrans({"×": "x", "−": "-", "–": "-", "—": "-", "…": "...", "·": "-", "φ": "phi", "Σ": "sum"})


# --------------------------------------------------------------------------- heat maps and boxes


def colormap_lut(name: str = "jet") -> np.ndarray:
    """A `(256, 3)` uint8 colour table: the built-in `"jet"` (MATLAB/OpenCV JET) or any matplotlib colour map.

    Args:
        name: `"jet"`, or a matplotlib colour map name such as `"turbo"` or `"inferno"` (needs the `viz` extra).

    Returns:
        `(256, 3)` uint8 RGB table.
    """
    if name == "jet":
        x = np.linspace(0.0, 1.0, 256)
        rgb = [np.clip(np.minimum(4 * x - shift, -4 * x + shift + 3), 0, 1) for shift in (1.5, 0.5, -0.5)]
        return np.rint(np.stack(rgb, axis=1) * 255).astype(np.uint8)
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(
            f"Colour map {name!r} needs matplotlib: `pip install 'protopool-hf[viz]'`, or use colormap='jet'."
        ) from exc
    try:
        cmap = matplotlib.colormaps[name]
    except KeyError as exc:
        raise ValueError(f"Unknown colour map {name!r}; use 'jet' or a matplotlib name such as 'turbo'.") from exc
    return np.rint(cmap(np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)


def heatmap_overlay(
    image: PIL.Image.Image,
    activation: np.ndarray,
    colormap: str = "jet",
    image_weight: float = 0.6,
    heat_weight: float = 0.4,
) -> PIL.Image.Image:
    """Blend a colour-mapped activation over an image: `image_weight·image + heat_weight·heat`.

    The map is min-max rescaled to [0, 1] first (a constant map is all 0), as the official code does before its
    JET colour map (it blends 0.5·image + 0.3·heat, a darker picture; pass those weights to match it).

    Args:
        image: RGB image of size `W_in × H_in`.
        activation: `(H_in, W_in)` map.
        colormap: see `colormap_lut`.
        image_weight: weight of the image.
        heat_weight: weight of the heat map.

    Returns:
        The blended RGB image.
    """
    activation = np.asarray(activation, dtype=np.float64)
    if activation.shape != (image.height, image.width):
        raise ValueError(
            f"The activation map has shape {activation.shape}, the image is {image.height}×{image.width} (H×W): "
            "upsample the map to the image size first (upsample_map)."
        )
    low, span = activation.min(), np.ptp(activation)
    unit = (activation - low) / span if span > 0 else np.zeros_like(activation)
    heat = colormap_lut(colormap)[np.rint(unit * 255).astype(np.intp)].astype(np.float64)
    blend = image_weight * np.asarray(to_rgb(image), dtype=np.float64) + heat_weight * heat
    return PIL.Image.fromarray(np.clip(np.rint(blend), 0, 255).astype(np.uint8), mode="RGB")


def draw_box(
    image: PIL.Image.Image, box: tuple[int, int, int, int], color: Color = BOX_COLOR, width: int = 2
) -> PIL.Image.Image:
    """A copy of `image` with the `(top, bottom, left, right)` box (bottom, right exclusive) outlined inside it."""
    top, bottom, left, right = box
    out = to_rgb(image).copy()
    PIL.ImageDraw.Draw(out).rectangle((left, top, right - 1, bottom - 1), outline=color, width=width)
    return out


# --------------------------------------------------------------------------- text


def load_font(size: int) -> PIL.ImageFont.ImageFont | PIL.ImageFont.FreeTypeFont:
    """Pillow's built-in font at `size` pixels (the fixed bitmap font on Pillow < 10.1)."""
    try:
        return PIL.ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return PIL.ImageFont.load_default()


def text_width(text: str, font: Any) -> float:
    """The width of `text` in pixels when drawn with `font`."""
    return PIL.ImageDraw.Draw(PIL.Image.new("RGB", (1, 1))).textlength(text, font=font)


def line_height(font: Any) -> int:
    """The height of a line of text in `font`, with spacing."""
    top, bottom = font.getbbox("Ag")[1::2]
    return int(bottom - top) + 6


def printable(text: str) -> str:
    """`text` in the ASCII that Pillow's built-in font draws: accents dropped (é -> e), × -> x, others -> ?."""
    text = unicodedata.normalize("NFKD", str(text).translate(_REPLACEMENTS))
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    return text.encode("ascii", "replace").decode("ascii")


def fit_text(text: str, width: int, font: Any) -> str:
    """`text` (made printable), shortened with an ellipsis to fit `width` pixels."""
    text = printable(text)
    if text_width(text, font) <= width:
        return text
    while text and text_width(text + "...", font) > width:
        text = text[:-1]
    return text.rstrip(" ,") + "..."


def wrap_text(text: str, width: int, font: Any, max_lines: int) -> list[str]:
    """Word-wrap `text` into at most `max_lines` lines of `width` pixels (the last one ellipsised)."""
    lines: list[str] = []
    words = printable(text).split(" ")
    while words and len(lines) < max_lines:
        line = words.pop(0)
        while words and text_width(f"{line} {words[0]}", font) <= width:
            line = f"{line} {words.pop(0)}"
        lines.append(line)
    if words:
        lines[-1] = fit_text(f"{lines[-1]} {' '.join(words)}", width, font)
    return [fit_text(line, width, font) for line in lines]


def class_name(config: Any, class_id: int) -> str:
    """The display name of a class: `config.id2label`'s (underscores as spaces), else the id."""
    id2label = getattr(config, "id2label", None) or {}
    name = id2label.get(class_id, id2label.get(str(class_id)))
    return str(name).replace("_", " ") if name is not None else str(class_id)


# --------------------------------------------------------------------------- cells and grids


def fit_image(image: PIL.Image.Image, size: tuple[int, int], background: Color = BACKGROUND) -> PIL.Image.Image:
    """`image` scaled (up or down, aspect kept) to fit `size`, centred on a background."""
    scale = min(size[0] / image.width, size[1] / image.height)
    new = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resample = PIL.Image.Resampling.NEAREST if scale >= 3 else PIL.Image.Resampling.LANCZOS
    canvas = PIL.Image.new("RGB", size, background)
    canvas.paste(image.resize(new, resample), ((size[0] - new[0]) // 2, (size[1] - new[1]) // 2))
    return canvas


def cell(
    images: Sequence[PIL.Image.Image],
    lines: Sequence[tuple[str, Any, Color]],
    thumb: int,
    text_lines: int,
) -> PIL.Image.Image:
    """One tile: `images` side by side in `thumb`-pixel squares, then the first `text_lines` of (text, font, colour).

    Args:
        images: the pictures, left to right.
        lines: the text lines under them, each fitted to the tile's width.
        thumb: side of each picture's square.
        text_lines: how many of `lines` to draw (the tile's height leaves room for exactly these).

    Returns:
        The tile as an RGB image.
    """
    width = len(images) * thumb + (len(images) - 1) * CELL_GAP
    heights = [line_height(font) for _, font, _ in lines]
    tile = PIL.Image.new("RGB", (width, thumb + CELL_GAP + sum(heights[:text_lines])), BACKGROUND)
    for i, image in enumerate(images):
        tile.paste(fit_image(image, (thumb, thumb), THUMB_BACKGROUND), (i * (thumb + CELL_GAP), 0))
    draw, y = PIL.ImageDraw.Draw(tile), thumb + CELL_GAP
    for (text, font, color), height in zip(lines[:text_lines], heights, strict=False):
        draw.text((0, y), fit_text(text, width, font), fill=color, font=font)
        y += height
    return tile


def grid(
    tiles: Sequence[PIL.Image.Image], columns: int, title: str | None = None, gap: int = 16, margin: int = 16
) -> PIL.Image.Image:
    """Tiles in rows of `columns` (each in a cell the size of the largest tile), under an optional title.

    Raises:
        ValueError: there are no tiles.
    """
    if not tiles:
        raise ValueError("Nothing to draw: no prototype pictures.")
    columns = max(1, min(columns, len(tiles)))
    cell_w, cell_h = max(t.width for t in tiles), max(t.height for t in tiles)
    rows = math.ceil(len(tiles) / columns)
    font = load_font(20)
    title_h = line_height(font) + 10 if title else 0
    width = 2 * margin + columns * cell_w + (columns - 1) * gap
    height = 2 * margin + title_h + rows * cell_h + (rows - 1) * gap
    canvas = PIL.Image.new("RGB", (width, height), BACKGROUND)
    if title:
        PIL.ImageDraw.Draw(canvas).text(
            (margin, margin), fit_text(title, width - 2 * margin, font), fill=TEXT, font=font
        )
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        canvas.paste(tile, (margin + c * (cell_w + gap), margin + title_h + r * (cell_h + gap)))
    return canvas
