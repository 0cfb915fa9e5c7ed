"""Part keypoints and the part-based scores: consistency, stability (Huang et al.) and purity (Nauta et al.).

Consistency and stability follow Huang et al., ICCV 2023 (EvalProtoPNet); purity follows Nauta et al., CVPR 2023
(PIP-Net).

Keypoints are `PartAnnotations`: for every dataset row, the `(x, y)` pixel position of each named part in the image
*as the dataset decodes it* (after the CUB loader's crop to the bird's box), NaN where the part is not visible.
`load_cub_parts` reads CUB-200-2011's `parts/part_locs.txt` in the row order of `data.load_cub200`;
`PartAnnotations.from_rows` takes a generic per-image list, for any other dataset.

The scores below take per-image part *hits* (a part is hit when its keypoint lies in a region the prototype points
at) and are pure numpy, so each definition is one short function (`metrics.evaluate_interpretability` computes the
hits):

- **consistency**: for each unit (a class and one of its prototypes), the share of the class's images, among those
  where the part is visible, whose region holds the part, per part; the unit is consistent when some part reaches
  `threshold` (0.8). The score is the percentage of consistent units (a unit with no visible part counts as not
  consistent).
- **stability**: for each unit, the share of images whose hit vector over all parts is the same with and without
  input noise; the score is the mean over units, in percent (a unit that hits no part with or without noise counts
  as stable, as in the reference).
- **purity**: for each prototype, over its top-k images, the mean presence of each part among the images where it
  is visible; a prototype's purity is its best part's value; reported as mean and standard deviation over
  prototypes and as the share of "part-related" prototypes (purity > 0.5). PIP-Net merges left and right parts
  (`PartAnnotations.merged_groups`).
"""

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image


__all__ = [
    "CUB_PART_LAYOUT",
    "PartAnnotations",
    "PurityScores",
    "box_hits",
    "consistency_score",
    "load_cub_parts",
    "peak_box",
    "peak_patch",
    "purity_scores",
    "stability_score",
]

CUB_PART_LAYOUT = (
    "CUB-200-2011's archive: images.txt, train_test_split.txt, bounding_boxes.txt, parts/parts.txt and "
    "parts/part_locs.txt (lines `<image id> <part id> <x> <y> <visible>`) in one folder (pass it or its parent)."
)
_SIDE = re.compile(r"^(left|right)\s+")


@dataclass
class PartAnnotations:
    """Part keypoints of a dataset's images, one entry per dataset row.

    Attributes:
        names: the K part names.
        keypoints: one `(K, 2)` float array per row: `(x, y)` in pixels of the decoded image (pixel `i` covers
            `[i, i + 1)`), NaN for a part that is not visible.
        source: where the annotations come from, for error messages.
    """

    names: list[str]
    keypoints: list[np.ndarray]
    source: str = "the part annotations"
    _groups: dict[str, list[int]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.names = [str(name) for name in self.names]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"{self.source}: part names must be unique, got {self.names}.")
        arrays = []
        for row, points in enumerate(self.keypoints):
            array = np.asarray(points, dtype=np.float64)
            if array.shape != (len(self.names), 2):
                raise ValueError(
                    f"{self.source}: row {row} has keypoints of shape {array.shape}, expected ({len(self.names)}, 2): "
                    "one (x, y) per part, NaN when the part is not visible."
                )
            arrays.append(array)
        self.keypoints = arrays

    def __len__(self) -> int:
        return len(self.keypoints)

    @classmethod
    def from_rows(
        cls, rows: Sequence[Mapping[str, Sequence[float]] | None], names: Sequence[str] | None = None, source: str = ""
    ) -> "PartAnnotations":
        """Build from one `{part name: (x, y)}` mapping per row (a missing part or a None row: not visible).

        Args:
            rows: per-image visible parts, in the dataset's row order.
            names: the part names in order (default: every name seen, sorted).
            source: where the rows come from, for error messages.
        """
        source = source or "the part annotations"
        seen = sorted({name for row in rows if row for name in row})
        names = list(names) if names is not None else seen
        unknown = sorted(set(seen) - set(names))
        if unknown:
            raise ValueError(f"{source}: unknown part names {unknown}; the parts are {names}.")
        keypoints = []
        for row_id, row in enumerate(rows):
            points = np.full((len(names), 2), np.nan)
            for name, xy in (row or {}).items():
                if len(xy) != 2:
                    raise ValueError(f"{source}: row {row_id}, part {name!r}: expected [x, y], got {list(xy)!r}.")
                points[names.index(name)] = [float(xy[0]), float(xy[1])]
            keypoints.append(points)
        return cls(names, keypoints, source)

    @classmethod
    def from_json(cls, path: str | os.PathLike, limit: int | None = None) -> "PartAnnotations":
        """Read a JSON list with one `{part name: [x, y]}` object (or null) per image, in the dataset's row order.

        Args:
            path: the file.
            limit: keep only the first `limit` rows.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Part file {str(path)!r} does not exist: check the path.")
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"Part file {str(path)!r} is not valid JSON: {error}.") from error
        if not isinstance(rows, list) or not all(row is None or isinstance(row, dict) for row in rows):
            raise ValueError(f"Part file {str(path)!r}: expected a JSON list with one {{part: [x, y]}} per image.")
        return cls.from_rows(rows[:limit] if limit is not None else rows, source=str(path))

    def check_inside(self, row: int, size: tuple[int, int]) -> None:
        """Raise a `ValueError` naming the row and part when a visible keypoint lies outside an `(H, W)` image."""
        points = self.keypoints[row]
        height, width = size
        bad = ~np.isnan(points[:, 0]) & (
            (points[:, 0] < 0) | (points[:, 0] > width) | (points[:, 1] < 0) | (points[:, 1] > height)
        )
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"{self.source}: row {row}, part {self.names[k]!r} at (x, y) = {tuple(points[k].tolist())} lies outside "
                f"its {width}x{height} image: check the annotations (coordinates are pixels of the decoded image)."
            )

    def merged_groups(self) -> dict[str, list[int]]:
        """Part groups with left and right merged (`"left eye"`, `"right eye"` -> `"eye"`), as PIP-Net scores CUB."""
        groups: dict[str, list[int]] = {}
        for k, name in enumerate(self.names):
            groups.setdefault(_SIDE.sub("", name), []).append(k)
        return groups


def _read_lines(path: Path, fields: int) -> list[list[str]]:
    if not path.is_file():
        raise FileNotFoundError(f"Part annotation file {path} not found. Expected layout: {CUB_PART_LAYOUT}")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        values = line.split(maxsplit=fields - 1)
        if len(values) != fields:
            raise ValueError(f"{path}, line {number}: expected {fields} fields, got {line!r}.")
        rows.append(values)
    return rows


def load_cub_parts(
    root: str | os.PathLike, split: str = "test", crop_to_bbox: bool = True, limit: int | None = None
) -> PartAnnotations:
    """Read CUB-200-2011's part keypoints, one row per image of `data.load_cub200(root, split, crop_to_bbox, limit)`.

    Part ids and image ids are 1-based in the files; invisible parts (visible = 0) become NaN. With `crop_to_bbox`
    the keypoints are moved into the crop the loader decodes (the box rounded to pixels, as `load_cub200` crops), and
    parts outside it become invisible. The 15 parts are kept as they are (left and right apart, as EvalProtoPNet).

    Args:
        root: the `CUB_200_2011` folder or its parent.
        split: `"train"` or `"test"`.
        crop_to_bbox: match a loader that crops to the bird's box (the default of `load_cub200`).
        limit: keep only the first `limit` images, as the loader's `limit`.

    Returns:
        The `PartAnnotations`.

    Raises:
        FileNotFoundError: an annotation file or an image is missing.
        ValueError: a malformed line, an unknown image or part id, or a keypoint outside its image.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    root = Path(root).expanduser()
    base = root / "CUB_200_2011" if (root / "CUB_200_2011").is_dir() else root
    images = dict(_read_lines(base / "images.txt", 2))
    is_train = dict(_read_lines(base / "train_test_split.txt", 2))
    parts = sorted(((int(i), name.strip()) for i, name in _read_lines(base / "parts" / "parts.txt", 2)))
    part_index = {part_id: k for k, (part_id, _) in enumerate(parts)}
    keep = [i for i in images if is_train.get(i, "") == ("1" if split == "train" else "0")]
    keep = keep[:limit] if limit is not None else keep
    row_of = {image_id: row for row, image_id in enumerate(keep)}
    points = np.full((len(keep), len(parts), 2), np.nan)
    locs = base / "parts" / "part_locs.txt"
    for number, (image_id, part_id, x, y, visible) in enumerate(_read_lines(locs, 5), start=1):
        if image_id not in images:
            raise ValueError(f"{locs}, line {number}: unknown image id {image_id} (images.txt has no such image).")
        if int(part_id) not in part_index:
            raise ValueError(f"{locs}, line {number}: unknown part id {part_id} (parts/parts.txt has no such part).")
        if image_id in row_of and visible.strip() != "0":
            points[row_of[image_id], part_index[int(part_id)]] = [float(x), float(y)]
    boxes = {i: [float(v) for v in rest.split()] for i, rest in _read_lines(base / "bounding_boxes.txt", 2)}
    result = PartAnnotations([name for _, name in parts], list(points), source=str(locs))
    for row, image_id in enumerate(keep):
        path = base / "images" / images[image_id]
        if not path.is_file():
            raise FileNotFoundError(f"CUB-200-2011 image {path} (id {image_id}) is missing.")
        with PIL.Image.open(path) as image:
            width, height = image.size
        result.check_inside(row, (height, width))
        if crop_to_bbox:
            if image_id not in boxes:
                raise ValueError(f"{base / 'bounding_boxes.txt'} has no line for image id {image_id}.")
            x, y, w, h = boxes[image_id]
            left, top = max(0, round(x)), max(0, round(y))
            right, bottom = min(width, round(x + w)), min(height, round(y + h))
            moved = result.keypoints[row] - [left, top]
            outside = (
                (moved[:, 0] < 0) | (moved[:, 0] > right - left) | (moved[:, 1] < 0) | (moved[:, 1] > bottom - top)
            )
            moved[outside] = np.nan
            result.keypoints[row] = moved
    return result


# --------------------------------------------------------------------------- regions and hits


def peak_box(activation: np.ndarray, half_size: int) -> tuple[int, int, int, int]:
    """The box of ±`half_size` pixels around the map's first maximum, clipped at the border.

    Returns:
        `(top, bottom, left, right)`, bottom and right exclusive (`2·half_size + 1` pixels wide inside the image).
    """
    height, width = activation.shape
    y, x = divmod(int(np.argmax(activation)), width)
    return max(0, y - half_size), min(height, y + half_size + 1), max(0, x - half_size), min(width, x + half_size + 1)


def peak_patch(activation: np.ndarray, size: int) -> tuple[int, int, int, int]:
    """A `size`×`size` patch centred on the map's first maximum, shifted inside the image (PIP-Net's purity patch)."""
    height, width = activation.shape
    y, x = divmod(int(np.argmax(activation)), width)
    top = min(max(0, y - size // 2), max(0, height - size))
    left = min(max(0, x - size // 2), max(0, width - size))
    return top, min(height, top + size), left, min(width, left + size)


def box_hits(keypoints: np.ndarray, box: Sequence[int]) -> np.ndarray:
    """`(K, 2)` keypoints `(x, y)` (NaN: not visible) and a `(top, bottom, left, right)` box -> `(K,)` bool hits.

    The box covers `[top, bottom] × [left, right]` in continuous pixel coordinates, borders included (as the
    reference's integer test `top <= y <= bottom` on an inclusive box).
    """
    top, bottom, left, right = box
    x, y = keypoints[:, 0], keypoints[:, 1]
    with np.errstate(invalid="ignore"):
        return (x >= left) & (x <= right) & (y >= top) & (y <= bottom)


def _group(values: np.ndarray, groups: Mapping[str, Sequence[int]] | None) -> np.ndarray:
    if groups is None:
        return values
    return np.stack([values[..., list(members)].any(axis=-1) for members in groups.values()], axis=-1)


def consistency_score(
    hits: Sequence[np.ndarray], visible: Sequence[np.ndarray], threshold: float = 0.8
) -> float | None:
    """Huang et al.'s consistency, in percent.

    Args:
        hits: per unit, an `(I, K)` bool array: part k hit in the unit's image i.
        visible: per unit, the matching `(I, K)` bool array: part k visible in image i.
        threshold: the share of images a part must be hit in.

    Returns:
        The percentage of units whose best part is hit in at least `threshold` of the images where it is visible;
        None without units.
    """
    if not hits:
        return None
    consistent = []
    for unit_hits, unit_visible in zip(hits, visible, strict=True):
        seen = unit_visible.sum(axis=0)
        ratio = np.where(seen > 0, (unit_hits & unit_visible).sum(axis=0) / np.maximum(seen, 1), 0.0)
        consistent.append(bool(ratio.size and ratio.max() >= threshold))
    return 100.0 * float(np.mean(consistent))


def stability_score(clean: Sequence[np.ndarray], noisy: Sequence[np.ndarray]) -> float | None:
    """Huang et al.'s stability, in percent; None without units.

    Per unit, the share of images whose `(K,)` hit vector is unchanged by the noise (`clean` and `noisy` as `hits`
    of `consistency_score`), averaged over units.
    """
    if not clean:
        return None
    same = [float((a == b).all(axis=1).mean()) if len(a) else 1.0 for a, b in zip(clean, noisy, strict=True)]
    return 100.0 * float(np.mean(same))


@dataclass
class PurityScores:
    """Purity of each prototype (its best part's mean presence) and their summary."""

    per_prototype: list[float]
    mean: float | None
    std: float | None
    part_related_share: float | None


def purity_scores(
    hits: Sequence[np.ndarray],
    visible: Sequence[np.ndarray],
    groups: Mapping[str, Sequence[int]] | None = None,
    related: float = 0.5,
) -> PurityScores:
    """PIP-Net's purity.

    Args:
        hits: per prototype, an `(I, K)` bool array over its top-k images: part k lies in the prototype's patch.
        visible: per prototype, the matching visibility.
        groups: merge parts (e.g. `PartAnnotations.merged_groups()`): a group is hit (visible) when any member is.
        related: the purity above which a prototype counts as part-related.

    Returns:
        `PurityScores`; a prototype without any visible part scores 0.
    """
    scores = []
    for unit_hits, unit_visible in zip(hits, visible, strict=True):
        h, v = _group(unit_hits & unit_visible, groups), _group(unit_visible, groups)
        seen = v.sum(axis=0)
        presence = np.where(seen > 0, h.sum(axis=0) / np.maximum(seen, 1), 0.0)
        scores.append(float(presence.max()) if presence.size else 0.0)
    if not scores:
        return PurityScores([], None, None, None)
    array = np.asarray(scores)
    return PurityScores(scores, float(array.mean()), float(array.std()), float((array > related).mean()))
