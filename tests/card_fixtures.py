"""A fixed tiny model and stand-in pictures shared by test_card.py and test_hub.py."""

import copy
import functools
import io
from pathlib import Path

import protopool_tiny
import torch
from PIL import Image

from protopool_hf import ProtoPoolForImageClassification
from protopool_hf.metrics import BoxStats, InterpretabilityReport, LocalisationScores
from protopool_hf.pictures import GALLERY_FILE


REPO = "org/protopool-tiny"
DATASET = "org/birds"
CLASSES = {0: "cardinal", 1: "blue jay", 2: "house | sparrow"}  # the "|" must be escaped in the card's table
SLOTS = [[0, 1], [2, 1], [3, 5]]  # the prototype of each class slot: 1 is shared, 4 is unused
METRICS = {"eval_accuracy": 0.75, "eval_loss": 0.61, "eval_runtime": 1.5, "test_accuracy": 0.5, "epoch": 3.0}
TRAINING = {"learning_rate": 0.001, "num_train_epochs": 3, "per_device_train_batch_size": 8}
CODE = {
    "configuration_protopool.py",
    "modeling_protopool.py",
    "layers.py",
    "losses.py",
    "backbone.py",
    "preprocessing.py",
    "gumbel.py",
    "loading.py",
    "provenance.py",
    "torch_utils.py",
}
MODEL_FILES = {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", *CODE}
PICTURES = {0, 1, 2, 3, 5}


GALLERY = GALLERY_FILE  # the gallery, relative to the folder or repo root
# An interpretability report as `protopool-hf evaluate` writes it (numbers made up; one localisation, no parts).
REPORT = InterpretabilityReport(
    num_images=6,
    num_localised_images=2,
    accuracy=0.5,
    num_prototypes=6,
    prototypes_used=5,
    prototypes_used_share=5 / 6,
    duplicate_slots=0,
    duplicate_slots_per_class=[0, 0, 0],
    classes_per_prototype_mean=1.2,
    classes_per_prototype_max=2,
    explanation_size_mean=1.5,
    explanation_size_median=1.5,
    localisations={
        "upsampled": LocalisationScores(
            test_top_slots=BoxStats(4, 0.25, 0.625, 0.5), deletion_auc=0.3, random_deletion_auc=0.5, deletion_gain=0.2
        )
    },
).to_dict()


def card_model(projected: bool = True) -> ProtoPoolForImageClassification:
    """The suite's tiny model (`protopool_tiny.tiny_model`, seed 0) with a known slot assignment and (when `projected`)
    provenance for every used prototype."""
    return copy.deepcopy(_tiny_model(projected))


@functools.cache
def _tiny_model(projected: bool) -> ProtoPoolForImageClassification:
    model = protopool_tiny.tiny_model(0, id2label=CLASSES, label2id={name: i for i, name in CLASSES.items()}).eval()
    with torch.no_grad():
        logits = torch.full((3, 6, 2), -5.0)
        for class_id, prototypes in enumerate(SLOTS):
            for slot, prototype in enumerate(prototypes):
                logits[class_id, prototype, slot] = 5.0
        model.head.slot_logits.copy_(logits)
    if projected:
        model.set_projection_provenance(
            image_index=torch.tensor([0, 1, 1, 2, -1, 3]),
            row=torch.tensor([1, 2, 0, 3, -1, 4]),
            col=torch.tensor([0, 1, 2, 3, -1, 4]),
            distance=torch.tensor([0.0, 0.0, 0.0, 0.0, float("nan"), 0.0]),
            label=torch.tensor([0, 0, 1, 2, -1, 2]),
            dataset_name=DATASET,
            input_size=[3, 160, 160],
        )
        model.harden_assignment()
    return model


def png(color: tuple[int, int, int], size: tuple[int, int] = (8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_pictures(folder: Path, ids=PICTURES) -> set[str]:
    """Stand-ins for gallery.save_prototype_images: a crop per prototype and the gallery."""
    names = {f"prototypes/prototype_{p:03d}.png" for p in ids} | {GALLERY}
    for index, name in enumerate(sorted(names)):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(png((40 * index % 256, 100, 200)))
    return names


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name != folder.name)
