"""protopool_hf.pictures on real photos: crops at the recorded patch, rendering, nearest patches, provenance errors."""

import math

import numpy as np
import pytest
import torch
from photo_fixtures import PHOTOS, SOURCES, give_provenance, photo_dataset, photo_model, reference_view

from protopool_hf.data import from_hf_dataset
from protopool_hf.gallery import prototype_gallery, save_prototype_images
from protopool_hf.maps import preprocess
from protopool_hf.pictures import (
    PROTOTYPES_DIR,
    nearest_patches,
    render_prototype,
    render_prototypes,
)
from protopool_hf.transforms import make_transforms


NUM_PROTOTYPES = 8


# --------------------------------------------------------------------------- prototype pictures


def test_crop_is_the_source_photo_at_the_recorded_location(projected, dataset, pictures):
    assert sorted(pictures) == list(range(NUM_PROTOTYPES))
    for p, (image, row, col) in enumerate(SOURCES):
        pic = pictures[p]
        assert (pic.image_index, pic.row, pic.col) == (image, row, col)
        assert pic.label == dataset[image]["label"]
        assert pic.distance < 1e-3
        source = reference_view(PHOTOS[image])
        np.testing.assert_array_equal(np.asarray(pic.image), source)
        top, bottom, left, right = pic.box
        assert 0 <= top < bottom <= 160
        assert 0 <= left < right <= 160
        np.testing.assert_array_equal(np.asarray(pic.crop), source[top:bottom, left:right])
        # The box holds the recorded cell's centre, and the map peaks in that cell (stride 160 / 5 = 32 px).
        centre_y, centre_x = (row + 0.5) * 32, (col + 0.5) * 32
        assert top <= centre_y < bottom
        assert left <= centre_x < right
        peak_y, peak_x = np.unravel_index(pic.activation.argmax(), pic.activation.shape)
        assert (peak_y // 32, peak_x // 32) == (row, col)
        assert pic.overlay.size == pic.image.size == (160, 160)
        assert pic.classes == [p % 4]


# The 1-D bicubic kernel (a = −0.75) has weights of absolute sum at most 1.375, so an upsampled pixel moves by at most
# 1.375² times the largest move of the map cells it mixes.
BICUBIC_GAIN = 1.375**2


def activation_slack(alone: torch.Tensor, batched: torch.Tensor, epsilon: float) -> float:
    """How far φ(d), upsampled, may move when the distances `(H, W)` move from `batched` to `alone` by rounding.

    A conv or matrix-multiply kernel may round differently for another batch size (its choice depends on N·H·W and
    the CPU), moving d by Δd. φ'(d) = 1/(d + 1) − 1/(d + ε) is up to 1/ε near d = 0 (at a prototype's own patch), so
    φ moves by at most Δd/(d − Δd + ε) (and never more than its range log(1/ε)).
    """
    change = float((alone - batched).abs().max())
    assert change <= 1e-5 * (1 + float(batched.abs().max()))  # the distances themselves agree to float32 rounding
    room = (batched - change + epsilon).clamp_min(1e-30)
    per_cell = (change / room).clamp_max(math.log(1 / epsilon))
    return BICUBIC_GAIN * float(per_cell.max()) + 1e-5


def test_render_prototype_matches_the_batched_render(projected, dataset, pictures):
    single = render_prototype(projected, dataset, 6)
    # Like with like: one image per forward pass gives the same numbers bit for bit.
    one_by_one = render_prototypes(projected, dataset, batch_size=1)
    assert single.box == one_by_one[6].box
    np.testing.assert_array_equal(single.activation, one_by_one[6].activation)
    # The batch of 4 (`pictures`) may round the distances differently: equal up to what float32 rounding allows.
    pixels = torch.cat([preprocess(dataset[i]["image"], projected.config) for i in range(len(dataset))])
    with torch.no_grad():
        batched = projected.prototype_distances(pixels)[SOURCES[6][0], 6]
        alone = projected.prototype_distances(pixels[SOURCES[6][0]][None])[0, 6]
    slack = activation_slack(alone, batched, projected.config.similarity_epsilon)
    np.testing.assert_allclose(single.activation, pictures[6].activation, rtol=0, atol=slack)
    assert single.distance == pytest.approx(pictures[6].distance, abs=1e-5)


def test_rows_are_found_through_the_index_column(projected, dataset):
    """Datasets from protopool_hf.data carry `index`: provenance survives a shuffle."""
    shuffled = from_hf_dataset(photo_dataset()).shuffle(seed=3)
    assert shuffled["index"] != [0, 1, 2, 3]
    pictures = render_prototypes(projected, shuffled, [2, 3])
    np.testing.assert_array_equal(np.asarray(pictures[2].image), reference_view(PHOTOS[2]))
    np.testing.assert_array_equal(np.asarray(pictures[3].image), reference_view(PHOTOS[3]))


def test_real_projection_then_pictures(dataset):
    from protopool_hf.projection import project_prototypes

    model = photo_model()
    with torch.no_grad():
        model.head.slot_logits.fill_(-5.0)
        for c in range(4):
            model.head.slot_logits[c, c, 0] = 5.0
            model.head.slot_logits[c, c + 4, 1] = 5.0
    data = from_hf_dataset(photo_dataset(), name="photos")
    project_prototypes(model, data.with_transform(make_transforms(model.config, train=False)), batch_size=2)
    assert model.config.projection_dataset == "photos"
    pictures = render_prototypes(model, data)
    for p, pic in pictures.items():
        assert pic.label == p % 4  # class c's prototypes search class c's only photo
        source = reference_view(PHOTOS[pic.image_index])
        top, bottom, left, right = pic.box
        np.testing.assert_array_equal(np.asarray(pic.crop), source[top:bottom, left:right])


def test_nearest_patches_starts_with_the_projection_patch(projected, dataset):
    nearest = nearest_patches(projected, dataset, 3, k=3, batch_size=3)
    assert len(nearest) == 3
    assert (nearest[0].image_index, nearest[0].row, nearest[0].col) == SOURCES[3]
    distances = [n.distance for n in nearest]
    assert distances == sorted(distances)
    assert distances[0] < 1e-3
    assert len({n.image_index for n in nearest}) == 3
    for n in nearest:
        assert n.label == n.image_index
        top, bottom, left, right = n.box
        np.testing.assert_array_equal(
            np.asarray(n.crop), reference_view(PHOTOS[n.image_index])[top:bottom, left:right]
        )
    assert len(nearest_patches(projected, dataset, 3, k=10)) == 4


# --------------------------------------------------------------------------- errors


def test_unprojected_model_says_to_project_first(dataset, tmp_path):
    model = photo_model()
    for call in (
        lambda: render_prototype(model, dataset, 0),
        lambda: save_prototype_images(model, dataset, tmp_path),
        lambda: prototype_gallery(model, dataset),
    ):
        with pytest.raises(ValueError, match="project_prototypes"):
            call()
    assert not (tmp_path / PROTOTYPES_DIR).exists()


def test_prototype_without_provenance(projected, dataset):
    model = photo_model()
    give_provenance(model, dataset)
    index = model.head.projection_image_index.clone()
    index[5] = -1
    model.head.projection_image_index.copy_(index)
    with pytest.raises(ValueError, match="Prototype 5 has no projection provenance"):
        render_prototype(model, dataset, 5)
    assert sorted(render_prototypes(model, dataset)) == [0, 1, 2, 3, 4, 6, 7]
    with pytest.raises(ValueError, match=r"prototype_id must be an int in \[0, 8\)"):
        render_prototype(projected, dataset, 8)


def test_dataset_shorter_than_recorded_index(projected, dataset):
    with pytest.raises(ValueError, match="only 2 rows"):
        render_prototypes(projected, dataset.select(range(2)))
    subset = from_hf_dataset(photo_dataset()).select([0, 1])
    with pytest.raises(ValueError, match="lacks them"):
        render_prototypes(projected, subset)


def test_wrong_dataset_is_caught_by_the_content_check(projected, dataset):
    reordered = dataset.select([1, 0, 3, 2])
    with pytest.raises(ValueError, match="not the dataset, split, order or preprocessing"):
        render_prototypes(projected, reordered)
    pictures = render_prototypes(projected, reordered, [0], verify=False)
    assert pictures[0].distance > 1e-3


def test_dataset_name_mismatch_warns(dataset):
    model = photo_model()
    give_provenance(model, dataset)
    model.config.projection_dataset = "cub200"
    named = from_hf_dataset(photo_dataset(), name="photos")
    with pytest.warns(UserWarning, match="'cub200'"):
        render_prototypes(model, named, [0])


def test_dataset_of_tensors_is_refused(projected):
    transformed = from_hf_dataset(photo_dataset()).with_transform(make_transforms(projected.config, train=False))
    with pytest.raises(ValueError, match="holds a tensor"):
        render_prototype(projected, transformed, 0)
