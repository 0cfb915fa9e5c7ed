"""protopool_hf.gallery: the prototype files of a model folder, the gallery and the class view."""

import math
from pathlib import Path

import PIL.Image
import pytest
from photo_fixtures import SOURCES, give_provenance, photo_model

from protopool_hf.gallery import class_view, prototype_gallery, save_prototype_images
from protopool_hf.pictures import (
    GALLERY_FILE,
    PROTOTYPES_DIR,
    prototype_filenames,
    render_prototype,
)
from protopool_hf.usage import prototype_classes, used_prototypes


NUM_PROTOTYPES = 8


def test_save_prototype_images_writes_valid_pngs(projected, dataset, tmp_path):
    paths = save_prototype_images(projected, dataset, tmp_path)
    folder = tmp_path / PROTOTYPES_DIR
    assert sorted(paths) == list(range(NUM_PROTOTYPES))
    assert paths[7] == folder / "prototype_007.png"
    expected = {Path(GALLERY_FILE).name} | {
        name for p in range(NUM_PROTOTYPES) for name in prototype_filenames(p).values()
    }
    assert {f.name for f in folder.iterdir()} == expected
    for file in folder.iterdir():
        with PIL.Image.open(file) as image:
            assert image.format == "PNG"
            image.verify()
    with PIL.Image.open(paths[3]) as crop:
        top, bottom, left, right = render_prototype(projected, dataset, 3).box
        assert crop.size == (right - left, bottom - top)


def test_gallery_size_and_labels(projected, pictures):
    gallery = prototype_gallery(projected, pictures=pictures, columns=3, thumb_size=64)
    tile_width = 2 * 64 + 6  # overlay and crop, 6 px apart
    assert gallery.width == 2 * 16 + 3 * tile_width + 2 * 16
    rows = math.ceil(NUM_PROTOTYPES / 3)
    assert gallery.height > rows * 64 + (rows - 1) * 16
    one_row = prototype_gallery(projected, pictures=pictures, columns=NUM_PROTOTYPES, thumb_size=64)
    assert one_row.width == 2 * 16 + NUM_PROTOTYPES * tile_width + (NUM_PROTOTYPES - 1) * 16
    assert one_row.height < gallery.height


def test_gallery_skips_unused_prototypes(dataset):
    model = photo_model(num_prototypes=9)
    give_provenance(model, dataset, [*SOURCES, (0, 0, 0)])  # prototype 8: projected, but no slot uses it
    assert used_prototypes(model) == list(range(8))
    assert prototype_classes(model)[8] == []
    gallery = prototype_gallery(model, dataset, columns=9, thumb_size=32)
    assert gallery.width == 2 * 16 + 8 * (2 * 32 + 6) + 7 * 16


def test_class_view_shows_the_class_slots(projected, dataset, pictures):
    view = class_view(projected, None, 2, pictures=pictures, thumb_size=64, columns=5)
    assert view.width == 2 * 16 + 2 * (2 * 64 + 6) + 16  # S = 2 slots in one row
    assert class_view(projected, dataset, 2, thumb_size=64).size == view.size
    with pytest.raises(ValueError, match=r"class_id must be an int in \[0, 4\)"):
        class_view(projected, dataset, 4)
