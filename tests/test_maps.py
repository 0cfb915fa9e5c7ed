"""protopool_hf.maps on real photos: the model view, preprocessing, heat maps, upsampling, high-activation boxes."""

import numpy as np
import PIL.Image
import pytest
import torch
from photo_fixtures import PHOTOS, give_provenance, photo_model, reference_view

from protopool_hf.data import make_transforms
from protopool_hf.drawing import heatmap_overlay
from protopool_hf.maps import high_activation_box, model_view, preprocess, prototype_activation, upsample_map
from protopool_hf.pictures import render_prototype


def test_photos_are_small_and_real():
    assert len(PHOTOS) == 4
    assert sum(p.stat().st_size for p in PHOTOS) < 1_000_000
    sizes = {PIL.Image.open(p).size for p in PHOTOS}
    assert (1024, 683) in sizes  # one non-square photo exercises the centre crop


@pytest.mark.parametrize("index", range(4))
def test_model_view_is_the_eval_resize_and_crop_in_true_colours(index):
    config = photo_model().config
    view = model_view(PHOTOS[index], config)
    assert view.mode == "RGB"
    assert view.size == (160, 160)
    np.testing.assert_array_equal(np.asarray(view), reference_view(PHOTOS[index]))


def test_preprocess_is_bit_identical_to_the_eval_transform(dataset):
    config = photo_model().config
    transform = make_transforms(config, train=False)
    ours = torch.cat([preprocess(dataset[i]["image"], config) for i in range(4)])
    batch = transform({"image": [str(p) for p in PHOTOS], "label": [0, 1, 2, 3]})
    assert torch.equal(ours, batch["pixel_values"])


def test_model_view_of_a_tensor_undoes_the_normalisation():
    config = photo_model().config
    pixels = preprocess(PHOTOS[2], config)
    assert pixels.shape == (1, 3, 160, 160)
    back = np.asarray(model_view(pixels, config)).astype(int)
    assert np.abs(back - np.asarray(model_view(PHOTOS[2], config)).astype(int)).max() <= 1
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        model_view(torch.zeros(2, 3, 8, 8), config)


def test_model_view_follows_projection_input_size(dataset):
    model = photo_model(input_size=[3, 224, 224])
    give_provenance(model, dataset, [(i, 6 - i, i) for i in range(4)] * 2)
    pictures = render_prototype(model, dataset, 3)
    assert pictures.image.size == (224, 224)
    assert pictures.activation.shape == (224, 224)


@pytest.mark.parametrize("index", [0, 2])
def test_heat_map_has_the_model_view_size(projected, index):
    activation = prototype_activation(projected, PHOTOS[index], 5)
    view = model_view(PHOTOS[index], projected.config)
    assert activation.shape == (view.height, view.width) == (160, 160)
    assert activation.dtype == np.float32
    overlay = heatmap_overlay(view, activation)
    assert overlay.size == view.size


def test_upsampling_keeps_a_constant_map_and_matches_the_feature_peak():
    assert np.allclose(upsample_map(np.full((5, 5), 3.0), (160, 160)), 3.0)
    peak = np.zeros((5, 5), dtype=np.float32)
    peak[1, 3] = 1.0
    up = upsample_map(peak, (160, 160))
    r, c = np.unravel_index(up.argmax(), up.shape)
    assert 32 <= r < 64
    assert 96 <= c < 128


def test_high_activation_box_is_the_official_percentile_rule():
    activation = np.zeros((100, 80))
    activation[10:30, 30:55] = 1.0  # 500 of 8000 pixels: more than 5 %, so the 95th percentile is 1
    assert high_activation_box(activation, 95) == (10, 30, 30, 55)
    activation[60, 5] = 1.0
    assert high_activation_box(activation, 95) == (10, 61, 5, 55)
    # Ties at the threshold count as above it (>=): with under 5 % of bright pixels the 0 background is selected.
    small = np.zeros((100, 80))
    small[10:20, 30:45] = 1.0
    assert high_activation_box(small, 95) == (0, 100, 0, 80)
    assert high_activation_box(small, 99) == (10, 20, 30, 45)
    rng = np.random.default_rng(0)
    noisy = rng.random((40, 40))
    top, bottom, left, right = high_activation_box(noisy, 95)
    mask = noisy >= np.percentile(noisy, 95)
    assert mask[top:bottom, left:right].sum() == mask.sum()
    assert mask[top].any() and mask[bottom - 1].any() and mask[:, left].any() and mask[:, right - 1].any()


def test_high_activation_box_rejects_bad_maps():
    with pytest.raises(ValueError, match="NaN"):
        high_activation_box(np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match="2-D"):
        high_activation_box(np.zeros(5))
    with pytest.raises(ValueError, match="percentile"):
        high_activation_box(np.zeros((4, 4)), 101)
