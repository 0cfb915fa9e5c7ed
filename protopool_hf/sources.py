"""Where each prototype came from: the projection's provenance in the model, and its source images in the dataset.

The projection records, for every prototype, the dataset row, feature-map cell, distance and label of the patch it
was moved onto, and the dataset's name (`protopool_hf.provenance`, which reads and writes those records). The pictures
read the source images and labels back here, from the dataset the caller passes.

Example:
    ```python
    >>> import datasets, PIL.Image
    >>> from protopool_hf.sources import dataset_image, dataset_label, dataset_rows
    >>> ds = datasets.Dataset.from_dict({"image": [PIL.Image.new("RGB", (8, 6))] * 3, "label": [2, 0, 1]})
    >>> dataset_image(ds, 1).size, dataset_label(ds, 2)
    ((8, 6), 1)
    >>> from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification
    >>> config = ProtoPoolConfig(backbone="test_resnet", num_labels=3, num_prototypes=3, num_slots_per_class=1)
    >>> model = ProtoPoolForImageClassification(config)
    >>> dataset_rows(ds.add_column("index", [10, 11, 12]), [12, 10], model)  # recorded image index -> row
    {12: 2, 10: 0}

    ```
"""

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch

from .maps import _as_pil
from .provenance import read_provenance


__all__ = ["IMAGE_COLUMNS", "dataset_image", "dataset_label", "dataset_rows"]

#: The columns a dataset row's image is looked for in, in order, when no `image_column` is given.
IMAGE_COLUMNS = ("image", "img", "pixel_values")


# --------------------------------------------------------------------------- provenance (read from the model)


def _prototype_sources(model: Any, id2label: Mapping[int, str]) -> dict[int, str]:
    """`{prototype id: "projected on a <class> image"}` for the projected prototypes of `model`."""
    if getattr(model, "head", None) is None:
        return {}
    provenance = read_provenance(model)
    index, labels = provenance.image_index.tolist(), provenance.label.tolist()
    return {
        p: f"projected on a {id2label.get(label, str(label))} image"
        for p, (i, label) in enumerate(zip(index, labels, strict=True))
        if i >= 0 and label >= 0
    }


# --------------------------------------------------------------------------- reading the dataset


def _without_transform(dataset: Any) -> Any:
    return dataset.with_format(None) if hasattr(dataset, "with_format") else dataset


def dataset_rows(dataset: Any, image_indices: Sequence[int], model: torch.nn.Module) -> dict[int, int]:
    """Map recorded image indices to dataset rows (through the `index` column when there is one).

    Args:
        dataset: the projection dataset.
        image_indices: image indices as the projection recorded them.
        model: the projected model (its `config.projection_dataset` names the dataset in errors).

    Returns:
        `{recorded image index: dataset row}`.

    Raises:
        ValueError: the dataset lacks one of the images; the message says which dataset to pass.
    """
    size = len(dataset)
    columns = getattr(dataset, "column_names", None) or []
    recorded = getattr(model.config, "projection_dataset", None) or "the projection dataset"
    if "index" in columns:
        stored = np.asarray(_without_transform(dataset).select_columns(["index"])["index"], dtype=np.int64)
        row_of = {int(v): r for r, v in enumerate(stored.tolist())}
        missing = sorted({i for i in image_indices if i not in row_of})
        if missing:
            raise ValueError(
                f"The prototypes were projected on images {missing[:5]} of {recorded!r}, but this dataset's `index` "
                f"column (its {size} rows) lacks them: pass the dataset used by project_prototypes, not a subset."
            )
        return {i: row_of[i] for i in image_indices}
    too_far = sorted({i for i in image_indices if i >= size})
    if too_far:
        raise ValueError(
            f"The prototypes were projected on image {too_far[-1]} of {recorded!r}, but this dataset has only {size} "
            "rows: pass the dataset (same split and order) used by project_prototypes."
        )
    return {i: i for i in image_indices}


def dataset_image(dataset: Any, row: int, image_column: str | None = None) -> PIL.Image.Image:
    """The image of one dataset row, as 8-bit RGB, read without the dataset's training transform.

    Args:
        dataset: a `datasets.Dataset` with an image column, or any sequence of rows with an image, or of
            `(image, label)` pairs.
        row: the row.
        image_column: the image column of mapping rows (default: the first of `IMAGE_COLUMNS` present).

    Returns:
        The RGB image.
    """
    item = dataset[int(row)]
    if isinstance(item, Mapping):
        column = image_column or next((c for c in IMAGE_COLUMNS if c in item), None)
        if column is None or column not in item:
            raise ValueError(
                f"Dataset rows have columns {sorted(item)}, none of them an image column {list(IMAGE_COLUMNS)}: "
                "pass image_column=..."
            )
        value = item[column]
    elif isinstance(item, tuple | list):
        value = item[0]
    else:
        value = item
    if isinstance(value, torch.Tensor):
        raise ValueError(
            f"Row {row} of the dataset holds a tensor, not an image: pass the dataset without its training transform "
            "(e.g. the loader's own dataset, before `with_transform(make_transforms(...))`)."
        )
    return _as_pil(value)


def dataset_label(dataset: Any, row: int) -> int:
    """The label of one dataset row (its `label` / `labels` column or second item), -1 when it has none."""
    columns = getattr(dataset, "column_names", None) or []
    if "label" in columns:  # read the label alone, without decoding the image
        return int(_without_transform(dataset).select_columns(["label"])[int(row)]["label"])
    item = dataset[int(row)]
    if isinstance(item, Mapping):
        value = item.get("label", item.get("labels", -1))
    elif isinstance(item, tuple | list) and len(item) > 1:
        value = item[1]
    else:
        value = -1
    try:
        return int(value)
    except (TypeError, ValueError):
        warnings.warn(f"Row {row} has a non-integer label {value!r}; recording -1.", stacklevel=3)
        return -1
