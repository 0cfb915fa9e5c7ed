"""Prototype pictures: geometry on real photos, heat maps, boxes, crops, files, gallery, errors."""

import math
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from photo_fixtures import PHOTOS, photo_dataset, photo_model

from protopool_hf import ProtoPoolForImageClassification
from protopool_hf.data import from_hf_dataset, make_transforms
from protopool_hf.drawing import colormap_lut, heatmap_overlay
from protopool_hf.gallery import class_view, prototype_gallery, save_prototype_images
from protopool_hf.maps import high_activation_box, model_view, preprocess, prototype_activation, upsample_map
from protopool_hf.pictures import (
    GALLERY_FILE,
    PROTOTYPES_DIR,
    PrototypeImages,
    nearest_patches,
    prototype_filenames,
    render_prototype,
    render_prototypes,
)
from protopool_hf.usage import prototype_classes, used_prototypes


NUM_PROTOTYPES = 8
# (image, feature row, feature column) of each prototype's source patch on the 5×5 map of test_resnet at 160 px.
SOURCES = [(0, 1, 2), (1, 2, 4), (2, 3, 3), (3, 4, 1), (0, 4, 4), (1, 0, 0), (2, 2, 0), (3, 1, 3)]


def make_model(**overrides) -> ProtoPoolForImageClassification:
    return photo_model(**{"num_prototypes": NUM_PROTOTYPES, **overrides})


def give_provenance(model: ProtoPoolForImageClassification, dataset, sources=SOURCES) -> None:
    """What a projection leaves behind: prototype p is the latent patch at its recorded (image, row, col)."""
    pixels = torch.cat([preprocess(dataset[i]["image"], model.config) for i in range(len(dataset))])
    image, row, col = (torch.tensor(v) for v in zip(*sources, strict=True))
    with torch.no_grad():
        latent = model.latent_map(pixels)
        model.head.prototypes.copy_(latent[image, :, row, col])
        # Class c uses prototypes c and c + 4, so every prototype is used.
        model.head.slot_logits.fill_(-5.0)
        for c in range(4):
            model.head.slot_logits[c, c, 0] = 5.0
            model.head.slot_logits[c, c + 4, 1] = 5.0
    labels = torch.tensor([dataset[int(i)]["label"] for i in image])
    model.harden_assignment()
    input_size = list(model.config.input_size)
    model.set_projection_provenance(image, row, col, torch.zeros(len(sources)), labels, input_size=input_size)


@pytest.fixture(scope="module")
def dataset() -> datasets.Dataset:
    return photo_dataset()


@pytest.fixture(scope="module")
def projected(dataset) -> ProtoPoolForImageClassification:
    model = make_model()
    give_provenance(model, dataset)
    return model


@pytest.fixture(scope="module")
def pictures(projected, dataset) -> dict[int, PrototypeImages]:
    return render_prototypes(projected, dataset)


def reference_view(path: Path, size: int = 160, crop_pct: float = 0.95) -> np.ndarray:
    """The eval geometry written out by hand: shortest edge to floor(size / crop_pct) (torchvision's antialiased
    resize of uint8 pixels, as transformers' default image processor), then a centre crop at floored offsets."""
    from torchvision.transforms.v2 import functional as tvF

    image = PIL.Image.open(path).convert("RGB")
    short = math.floor(size / crop_pct)
    if image.width <= image.height:
        new = (int(short * image.height / image.width), short)
    else:
        new = (short, int(short * image.width / image.height))
    pixels = torch.from_numpy(np.asarray(image)).permute(2, 0, 1)
    pixels = tvF.resize(pixels, list(new), interpolation=tvF.InterpolationMode.BILINEAR, antialias=True)
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    return pixels[:, top : top + size, left : left + size].permute(1, 2, 0).numpy()


# --------------------------------------------------------------------------- geometry


def test_photos_are_small_and_real():
    assert len(PHOTOS) == 4
    assert sum(p.stat().st_size for p in PHOTOS) < 1_000_000
    sizes = {PIL.Image.open(p).size for p in PHOTOS}
    assert (1024, 683) in sizes  # one non-square photo exercises the centre crop


@pytest.mark.parametrize("index", range(4))
def test_model_view_is_the_eval_resize_and_crop_in_true_colours(index):
    config = make_model().config
    view = model_view(PHOTOS[index], config)
    assert view.mode == "RGB"
    assert view.size == (160, 160)
    np.testing.assert_array_equal(np.asarray(view), reference_view(PHOTOS[index]))


def test_preprocess_is_bit_identical_to_the_eval_transform(dataset):
    config = make_model().config
    transform = make_transforms(config, train=False)
    ours = torch.cat([preprocess(dataset[i]["image"], config) for i in range(4)])
    batch = transform({"image": [str(p) for p in PHOTOS], "label": [0, 1, 2, 3]})
    assert torch.equal(ours, batch["pixel_values"])


def test_model_view_of_a_tensor_undoes_the_normalisation():
    config = make_model().config
    pixels = preprocess(PHOTOS[2], config)
    assert pixels.shape == (1, 3, 160, 160)
    back = np.asarray(model_view(pixels, config)).astype(int)
    assert np.abs(back - np.asarray(model_view(PHOTOS[2], config)).astype(int)).max() <= 1
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        model_view(torch.zeros(2, 3, 8, 8), config)


def test_model_view_follows_projection_input_size(dataset):
    model = make_model(input_size=[3, 224, 224])
    give_provenance(model, dataset, [(i, 6 - i, i) for i in range(4)] * 2)
    pictures = render_prototype(model, dataset, 3)
    assert pictures.image.size == (224, 224)
    assert pictures.activation.shape == (224, 224)


# --------------------------------------------------------------------------- maps and boxes


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


def test_jet_colour_map_and_overlay():
    lut = colormap_lut()
    assert lut.shape == (256, 3)
    assert lut.dtype == np.uint8
    assert tuple(lut[0]) == (0, 0, 128)  # dark blue
    assert tuple(lut[-1]) == (128, 0, 0)  # dark red
    assert lut[128, 1] > 200  # green in the middle
    matplotlib = pytest.importorskip("matplotlib")
    reference = np.rint(matplotlib.colormaps["jet"](np.linspace(0, 1, 256))[:, :3] * 255)
    # OpenCV's JET (the official code's) puts its knots at multiples of 1/8; matplotlib's a little off them.
    difference = np.abs(lut.astype(int) - reference)
    assert difference.mean() < 8
    assert difference.max() <= 40
    assert colormap_lut("turbo").shape == (256, 3)
    with pytest.raises(ValueError, match="colour map"):
        colormap_lut("no-such-map")
    image = PIL.Image.new("RGB", (6, 4), (200, 100, 50))
    same = heatmap_overlay(image, np.zeros((4, 6)), image_weight=1.0, heat_weight=0.0)
    assert np.array_equal(np.asarray(same), np.asarray(image))
    with pytest.raises(ValueError, match="upsample"):
        heatmap_overlay(image, np.zeros((5, 5)))


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

    model = make_model()
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
    model = make_model(num_prototypes=9)
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
    model = make_model()
    for call in (
        lambda: render_prototype(model, dataset, 0),
        lambda: save_prototype_images(model, dataset, tmp_path),
        lambda: prototype_gallery(model, dataset),
    ):
        with pytest.raises(ValueError, match="project_prototypes"):
            call()
    assert not (tmp_path / PROTOTYPES_DIR).exists()


def test_prototype_without_provenance(projected, dataset):
    model = make_model()
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
    model = make_model()
    give_provenance(model, dataset)
    model.config.projection_dataset = "cub200"
    named = from_hf_dataset(photo_dataset(), name="photos")
    with pytest.warns(UserWarning, match="'cub200'"):
        render_prototypes(model, named, [0])


def test_dataset_of_tensors_is_refused(projected):
    transformed = from_hf_dataset(photo_dataset()).with_transform(make_transforms(projected.config, train=False))
    with pytest.raises(ValueError, match="holds a tensor"):
        render_prototype(projected, transformed, 0)
