"""Tests of protopool_hf.transforms: shapes from the config, eval normalisation, the seeded training augmentation,
label and input checks, batching."""

import gzip
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from protopool_hf import ProtoPoolConfig
from protopool_hf.data import from_hf_dataset, load_fashion_mnist
from protopool_hf.images import decode_image
from protopool_hf.preprocessing import EvalTransform
from protopool_hf.transforms import collate_fn, make_transforms, nonzero_pixels


FASHION = Path(__file__).parent / "data" / "fashion-mnist"
SMALL = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "interpolation": "bilinear"}


@pytest.fixture(scope="module")
def config():
    return ProtoPoolConfig(
        backbone="test_resnet", num_labels=3, num_prototypes=6, num_slots_per_class=2, prototype_dim=8
    )


@pytest.fixture(scope="module")
def photos():
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 255, (48, 64, 3), np.uint8)) for _ in range(4)]
    raw = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2, 1]})
    return from_hf_dataset(raw.cast_column("image", datasets.Image()))


@pytest.mark.parametrize("augmentation", ["timm", "official"])
@pytest.mark.parametrize("train", [True, False])
def test_make_transforms_shapes_from_the_config(config, photos, augmentation, train):
    ds = photos.with_transform(make_transforms(config, train=train, augmentation=augmentation))
    batch = ds[:4]
    assert batch["pixel_values"].shape == (4, 3, 160, 160) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].tolist() == [0, 1, 2, 1] and batch["index"].tolist() == [0, 1, 2, 3]
    collated = collate_fn([ds[0], ds[3]])
    assert collated["pixel_values"].shape == (2, 3, 160, 160) and collated["labels"].tolist() == [0, 1]
    assert torch.equal(collated["pixel_values"][1], batch["pixel_values"][3])
    assert "index" not in collated and collate_fn([ds[3]], keep_index=True)["index"].tolist() == [3]


@pytest.mark.parametrize("augmentation", ["timm", "official"])
def test_eval_transform_normalises_with_the_config_mean_and_std(augmentation):
    flat = datasets.Dataset.from_dict({"image": [PIL.Image.new("RGB", (50, 20), (255, 128, 0))], "label": [0]})
    out = from_hf_dataset(flat.cast_column("image", datasets.Image())).with_transform(
        make_transforms(SMALL, train=False, augmentation=augmentation)
    )[:1]["pixel_values"][0]
    expected = (torch.tensor([255, 128, 0]) / 255 - 0.5) / 0.25
    assert out.shape == (3, 32, 32)
    torch.testing.assert_close(out.mean(dim=(1, 2)), expected, atol=1e-5, rtol=0)


def test_squash_eval_resizes_without_crop():
    from torchvision import transforms

    image = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 50, 3), np.uint8))
    raw = datasets.Dataset.from_dict({"image": [image], "label": [0]}).cast_column("image", datasets.Image())
    squash = {**SMALL, "crop_mode": "squash", "crop_pct": 1.0}  # what the cub200/cars196 presets use
    out = from_hf_dataset(raw).with_transform(make_transforms(squash, train=False))[0]
    reference = transforms.Compose(
        [transforms.Resize((32, 32)), transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.25] * 3)]
    )
    torch.testing.assert_close(out["pixel_values"], reference(decode_image(raw.with_format(None)[0]["image"])))


def test_timm_training_options_of_a_data_config_reach_the_augmentation(photos):
    fixed = {**SMALL, "scale": (1.0, 1.0), "ratio": (1.0, 1.0), "hflip": 0.0, "color_jitter": None}
    crop = make_transforms(fixed, train=True).pipeline.transforms[0]
    assert (crop.scale, crop.ratio) == ((1.0, 1.0), (1.0, 1.0))
    out = photos.with_transform(make_transforms(fixed, train=True))[:2]["pixel_values"]
    assert out.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("augmentation", ["timm", "official"])
def test_training_augmentation_is_seeded_by_seed_epoch_and_index(photos, augmentation):
    transform = make_transforms(SMALL, train=True, augmentation=augmentation, seed=3)
    assert transform.sample_seed(5) == 14539181121660479380  # pinned: a resumed run must derive the same seeds
    ds = photos.with_transform(transform)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    first = ds[:4]["pixel_values"]
    assert torch.equal(torch.rand(3), before)  # the caller's RNG stream is untouched
    assert torch.equal(ds[:4]["pixel_values"], first)
    assert torch.equal(ds.select([2])[0]["pixel_values"], first[2])  # independent of the batch composition
    assert not torch.equal(first[0], first[1])
    transform.set_epoch(1)
    assert transform.epoch == 1
    second = ds[:4]["pixel_values"]
    assert all(not torch.equal(a, b) for a, b in zip(first, second, strict=True))
    transform.set_epoch(0)
    assert torch.equal(ds[:4]["pixel_values"], first)
    other_seed = photos.with_transform(make_transforms(SMALL, train=True, augmentation=augmentation, seed=4))[:4]
    assert not torch.equal(other_seed["pixel_values"], first)


def test_epoch_reaches_persistent_dataloader_workers(photos):
    transform = make_transforms(SMALL, train=True, seed=0)
    ds = photos.with_transform(transform)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=4, num_workers=1, persistent_workers=True, collate_fn=collate_fn
    )
    epochs = []
    for epoch in range(2):
        transform.set_epoch(epoch)
        epochs.append(next(iter(loader))["pixel_values"])
    for epoch in range(2):
        transform.set_epoch(epoch)
        assert torch.equal(epochs[epoch], ds[:4]["pixel_values"])


def test_transform_errors(config, photos):
    plain = datasets.Dataset.from_dict({"image": [PIL.Image.new("RGB", (9, 9))], "label": [0]})
    plain = plain.cast_column("image", datasets.Image())
    with pytest.raises(ValueError, match="'index' column"):
        plain.with_transform(make_transforms(SMALL, train=True))[0]
    assert plain.with_transform(make_transforms(SMALL, train=True, seed=None))[0]["pixel_values"].shape == (3, 32, 32)
    with pytest.raises(
        ValueError, match=r"The `label` column holds \[5\] \(samples at index \[0\]\), outside \[0, 3\)"
    ):
        from_hf_dataset(
            plain.cast_column("label", datasets.Value("int64")).map(lambda _: {"label": 5})
        ).with_transform(make_transforms(config, train=False))[0]
    with pytest.raises(ValueError, match="augmentation"):
        make_transforms(config, train=True, augmentation="augmentor")
    with pytest.raises(ValueError, match=r"input_size must be \(3, H, W\)"):
        make_transforms({**SMALL, "input_size": (1, 32, 32)}, train=False)
    with pytest.raises(ValueError, match="empty batch"):
        collate_fn([])


def test_fashion_mnist_through_the_transform():
    config = ProtoPoolConfig(
        backbone="test_resnet", num_labels=10, num_prototypes=20, num_slots_per_class=2, input_size=[3, 32, 32]
    )
    ds = load_fashion_mnist(FASHION, limit=8).with_transform(make_transforms(config, train=True))
    batch = collate_fn(ds.__getitems__(list(range(8))))
    assert batch["pixel_values"].shape == (8, 3, 32, 32)
    assert batch["labels"].tolist() == _labels(FASHION / "train-labels-idx1-ubyte.gz")[:8]
    assert torch.isfinite(batch["pixel_values"]).all()
    # greyscale in, three equal channels out
    assert torch.equal(batch["pixel_values"][:, 0], batch["pixel_values"][:, 1])


def test_object_masks_follow_the_transformed_images():
    """`object_mask="nonzero"`: the garment's pixels of each transformed image, through the augmentation too."""
    config = ProtoPoolConfig(
        backbone="test_resnet", num_labels=10, num_prototypes=20, num_slots_per_class=2, input_size=[3, 56, 56]
    )
    raw = load_fashion_mnist(FASHION, limit=4)
    plain = raw.with_transform(make_transforms(config, train=False, object_mask="nonzero"))
    batch = collate_fn(plain.__getitems__([0, 1, 2, 3]))
    assert batch["object_mask"].shape == (4, 56, 56) and batch["object_mask"].dtype == torch.bool
    view = EvalTransform(config).view
    for row in range(4):  # the eval transform squashes 28 -> 56 px: the mask is the model view's non-black pixels
        resized = np.asarray(view(raw[row]["image"].convert("RGB"))).max(axis=2)
        assert np.array_equal(batch["object_mask"][row].numpy(), resized > 0)
        assert 0.2 < (resized > 0).mean() < 1
    # Under augmentation the mask is taken from the augmented image itself.
    data = {**config.data_config(), "color_jitter": None}
    augmented = raw.with_transform(make_transforms(data, train=True, object_mask="nonzero"))
    rows = augmented.__getitems__([0, 1])
    rule = nonzero_pixels(data["mean"], data["std"])
    for item in rows:
        assert torch.equal(item["object_mask"], rule(item["pixel_values"]))
        assert 0 < item["object_mask"].float().mean() < 1
    # A config's own timm augmentation keeps black black under the rule (no colour jitter unless a mapping asks).
    jittered = raw.with_transform(make_transforms(config, train=True, object_mask="nonzero")).__getitems__([0, 1])
    for item in jittered:
        assert 0.2 < item["object_mask"].float().mean() < 0.95
        assert torch.equal(item["object_mask"], rule(item["pixel_values"]))
    # A function of the pixel values works too; the masks pass through collate_fn only when every row has one.
    ones = raw.with_transform(make_transforms(config, train=False, object_mask=lambda px: px[0] > -10))
    assert collate_fn(ones.__getitems__([0, 1]))["object_mask"].all()
    assert "object_mask" not in collate_fn([rows[0], {k: v for k, v in rows[1].items() if k != "object_mask"}])
    with pytest.raises(ValueError, match="object_mask must be one of"):
        make_transforms(config, train=False, object_mask="grabcut")


def _labels(path: Path) -> list[int]:
    with gzip.open(path, "rb") as f:
        return list(f.read()[8:])
