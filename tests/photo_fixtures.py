"""The four committed photos as a dataset, the tiny model sized for them, and model folders for the explorer tests.

The model is the suite's tiny model (`protopool_tiny.tiny_model`, the one conftest's `tiny_model` fixture returns)
with one class per photo.
"""

import json
import math
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import torch
from protopool_tiny import tiny_model

from protopool_hf import ProtoPoolForImageClassification
from protopool_hf.maps import preprocess


PHOTOS = sorted((Path(__file__).parent / "data" / "photos").glob("*.jpg"))
NAMES = ["bull mastiff", "strawberry", "drum", "bald eagle"]
PHOTO_MODEL = {"num_labels": 4, "num_prototypes": 8, "num_slots_per_class": 2, "prototype_dim": 16}
# The explorer's model: 64 px, with both label maps.
EXPLORER = {"input_size": [3, 64, 64], "label2id": {name: i for i, name in enumerate(NAMES)}}
# A report in the shape `protopool_hf.evaluate_interpretability(...).to_dict()` writes (a few of its fields).
REPORT = {
    "num_images": 4,
    "accuracy": 0.5,
    "prototypes_used": 8,
    "explanation_size_mean": 2.5,
    "localisations": {"upsampled": {"deletion_gain": 0.125}},
    "settings": {"percentile": 95},
}


def photo_dataset() -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
    return datasets.Dataset.from_dict({"image": [str(p) for p in PHOTOS], "label": [0, 1, 2, 3]}, features=features)


def photo_model(seed: int = 0, **overrides) -> ProtoPoolForImageClassification:
    """The tiny model with one class per photo (`NAMES`), 8 prototypes, 2 slots per class, in eval mode."""
    return tiny_model(seed, **{**PHOTO_MODEL, "id2label": dict(enumerate(NAMES)), **overrides}).eval()


# (image, feature row, feature column) of each prototype's source patch on the 5×5 map of test_resnet at 160 px.
SOURCES = [(0, 1, 2), (1, 2, 4), (2, 3, 3), (3, 4, 1), (0, 4, 4), (1, 0, 0), (2, 2, 0), (3, 1, 3)]


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


def projected_folder(folder: Path) -> Path:
    """A projected tiny model saved with its pictures, nearest patches, two examples, metrics and a report."""
    from protopool_hf.explorer import save_nearest_patches
    from protopool_hf.hub import save_model_folder
    from protopool_hf.projection import project_prototypes
    from protopool_hf.transforms import make_transforms

    model = photo_model(**EXPLORER)
    raw = photo_dataset()
    project_prototypes(model, raw.with_transform(make_transforms(model.config, train=False)), batch_size=4)
    save_model_folder(model, folder, dataset=raw)
    save_nearest_patches(model, raw, folder, prototype_ids=model.class_to_prototypes()[0].tolist(), k=2)
    (folder / "examples").mkdir()
    for path in PHOTOS[:2]:
        PIL.Image.open(path).convert("RGB").resize((96, 72)).save(folder / "examples" / f"{path.stem}.png")
    (folder / "interpretability.json").write_text(json.dumps(REPORT))
    (folder / "all_results.json").write_text(json.dumps({"test_accuracy": 0.75}))  # as the Trainer writes it
    return folder


def unprojected_folder(folder: Path) -> Path:
    """A tiny model straight from initialisation, saved with save_pretrained only."""
    photo_model(1, **EXPLORER).save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- image files (data and images tests)
def jpeg(path: Path, size=(40, 30), color=(200, 30, 30), mode="RGB") -> Path:
    """Write a one-colour JPEG (creating its folder) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.new(mode, size, color).save(path, format="JPEG", quality=95)
    return path


def truncate(path: Path) -> Path:
    """Cut a file to its first half (a truncated image) and return its path."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def pixels(image: PIL.Image.Image) -> np.ndarray:
    """`(H·W, 3)` the RGB pixels of an image."""
    return np.asarray(image).reshape(-1, 3)
