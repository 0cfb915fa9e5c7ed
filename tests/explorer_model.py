"""Tiny model folders for the explorer tests: projected (pictures, examples, reports) and never projected."""

import json
from pathlib import Path

import datasets
import PIL.Image
import torch

from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification


PHOTOS = sorted((Path(__file__).parent / "data" / "photos").glob("*.jpg"))
NAMES = ["bull mastiff", "strawberry", "drum", "bald eagle"]
TINY = {
    "backbone": "test_resnet",
    "num_labels": 4,
    "num_prototypes": 8,
    "num_slots_per_class": 2,
    "prototype_dim": 16,
    "input_size": [3, 64, 64],
    "id2label": dict(enumerate(NAMES)),
    "label2id": {name: i for i, name in enumerate(NAMES)},
}
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


def tiny_model(seed: int = 0) -> ProtoPoolForImageClassification:
    torch.manual_seed(seed)
    return ProtoPoolForImageClassification(ProtoPoolConfig(**TINY)).eval()


def projected_folder(folder: Path) -> Path:
    """A projected tiny model saved with its pictures, nearest patches, two examples, metrics and a report."""
    from protopool_hf.explorer import save_nearest_patches
    from protopool_hf.hub import save_model_folder
    from protopool_hf.projection import project_prototypes
    from protopool_hf.transforms import make_transforms

    model = tiny_model()
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
    tiny_model(1).save_pretrained(folder)
    return folder
