"""Interpretability metrics on data where the right value is known by construction, hand computations, annotations.

The constructed case: 96 px black images with one white 40×40 square (the object, as the masks say) at a position
aligned to the 8 px stride of test_resnet's stage 2 (a 12×12 latent map), and a dark grey 40×40 "pebble" in the
bottom-left corner (background). Convolutions are exactly equivariant to such shifts, so the latent vector of the
square's centre cell is the same in every image (distance 0), and so is the pebble's centre cell. Prototypes set to one or the other make every metric's value known.
"""

import json

import datasets
import numpy as np
import PIL.Image
import protopool_tiny
import pytest
import torch

from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification
from protopool_hf.deletion import curve_area, delete_boxes, mean_curve, random_boxes_like
from protopool_hf.interpretability import evaluate_interpretability
from protopool_hf.localisation import SmoothGrad, localisation_maps, map_boxes
from protopool_hf.metrics import BoxStats, explanation_size, structure_metrics, top_prototypes
from protopool_hf.parts import (
    PartAnnotations,
    box_hits,
    consistency_score,
    peak_box,
    peak_patch,
    purity_scores,
    stability_score,
)
from protopool_hf.preprocessing import EvalTransform


SIZE = 96
SQUARE = 40
PEBBLE = 40  # the bottom-left corner: cells 7..11 × 0..4, never under a square
# (row, col) of each square's top-left corner, in 8 px cells: the square covers cells r..r+4, c..c+4.
POSITIONS = [(2, 2), (1, 6), (5, 6), (6, 7)]
OBJECT_CELL = (4, 4)  # the centre cell of image 0's square
BACKGROUND_CELL = (9, 2)  # the pebble's centre cell
PART_NAMES = ["head", "tail"]
FAST = SmoothGrad(samples=2, noise=0.05)


def square_mask(row: int, col: int) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[8 * row : 8 * row + SQUARE, 8 * col : 8 * col + SQUARE] = True
    return mask


def square_image(row: int, col: int) -> PIL.Image.Image:
    """The white square (the object) and a dark grey pebble in the bottom-left corner (background, not in the mask)."""
    array = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    array[SIZE - PEBBLE :, :PEBBLE] = 60
    array[square_mask(row, col)] = 255
    return PIL.Image.fromarray(array)


def square_masks() -> list[np.ndarray]:
    return [square_mask(r, c) for r, c in POSITIONS]


def square_dataset() -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["square", "blank"])})
    images = [square_image(r, c) for r, c in POSITIONS]
    return datasets.Dataset.from_dict({"image": images, "label": [0] * len(images)}, features=features)


def square_parts() -> PartAnnotations:
    """ "head" at the square's centre, "tail" on the pebble (never near a square)."""
    rows = [{"head": (8 * c + SQUARE / 2, 8 * r + SQUARE / 2), "tail": (2.0, SIZE - 2.0)} for r, c in POSITIONS]
    return PartAnnotations.from_rows(rows, names=PART_NAMES)


def make_model(kinds: tuple[str, str, str, str], dataset: datasets.Dataset) -> ProtoPoolForImageClassification:
    """Class 0 uses prototypes 0 and 1, class 1 uses 2 and 3; prototype p is image 0's object or background cell."""
    model = protopool_tiny.tiny_model(
        0,
        num_labels=2,
        num_prototypes=4,
        input_size=[3, SIZE, SIZE],
        crop_pct=1.0,
        feature_stage=2,
        id2label={0: "square", 1: "blank"},
    ).eval()
    config = model.config
    pixels = EvalTransform(config)(dataset[0]["image"].convert("RGB"))[None]
    cells = [OBJECT_CELL if kind == "object" else BACKGROUND_CELL for kind in kinds]
    with torch.no_grad():
        latent = model.latent_map(pixels)[0]
        model.head.prototypes.copy_(torch.stack([latent[:, r, c] for r, c in cells]))
        model.head.slot_logits.fill_(-5.0)
        for p in range(4):
            model.head.slot_logits[p // 2, p, p % 2] = 5.0
    model.harden_assignment()
    rows, cols = (torch.tensor(v) for v in zip(*cells, strict=True))
    model.set_projection_provenance(
        torch.zeros(4, dtype=torch.long),
        rows,
        cols,
        torch.zeros(4),
        torch.tensor([0, 0, 1, 1]),
        input_size=[3, 96, 96],
    )
    return model


@pytest.fixture(scope="module")
def dataset() -> datasets.Dataset:
    return square_dataset()


@pytest.fixture(scope="module")
def object_report(dataset):
    model = make_model(("object",) * 4, dataset)
    return evaluate_interpretability(
        model, dataset, masks=square_masks(), parts=square_parts(), localisation="upsampled", deletion_repeats=1
    )


# --------------------------------------------------------------------------- known by construction


def test_object_prototypes_are_all_object_and_consistent(object_report):
    scores = object_report.localisations["upsampled"]
    assert scores.prototype_sources == BoxStats(4, 0.0, 1.0, 1.0) and scores.background_prototypes == []
    assert scores.test_top_slots == BoxStats(len(POSITIONS) * 2, 0.0, 1.0, 1.0)
    assert object_report.top_slot_cells_background_share == 0.0
    assert object_report.top_slot_cells_mean_object_share == 1.0
    assert scores.consistency == 100.0  # (class 0, prototype 0) and (class 0, prototype 1) hit the head every time
    assert scores.stability == 100.0
    assert scores.purity_mean == 1.0 and scores.purity_std == 0.0 and scores.purity_part_related_share == 1.0
    assert object_report.accuracy == 1.0


def test_structure_of_the_constructed_model(object_report):
    assert object_report.prototypes_used == 4 and object_report.prototypes_used_share == 1.0
    assert object_report.duplicate_slots == 0 and object_report.duplicate_slots_per_class == [0, 0]
    assert object_report.classes_per_prototype_mean == 1.0 and object_report.classes_per_prototype_max == 1
    # Both slots of the predicted class carry the same similarity: 90 % of the logit needs both.
    assert object_report.explanation_size_mean == 2.0


def test_background_prototypes_are_all_background(dataset):
    model = make_model(("background",) * 4, dataset)
    report = evaluate_interpretability(
        model, dataset, masks=square_masks(), localisation="upsampled", deletion_repeats=1, max_images=3
    )
    scores = report.localisations["upsampled"]
    assert scores.prototype_sources.background_share == 1.0
    assert scores.background_prototypes == [0, 1, 2, 3]
    assert scores.test_top_slots.background_share == 1.0
    assert scores.test_top_slots.half_object_share == 0.0
    assert report.top_slot_cells_background_share == 1.0
    assert report.num_localised_images == 3 and scores.test_top_slots.count == 3 * 2


def test_all_object_and_all_background_masks_under_both_localisations(dataset):
    model = make_model(("object", "object", "background", "background"), dataset)
    ones = [np.ones((SIZE, SIZE), bool)] * len(dataset)
    zeros = [np.zeros((SIZE, SIZE), bool)] * len(dataset)
    for masks, expected in ((ones, BoxStats(2, 0.0, 1.0, 1.0)), (zeros, BoxStats(2, 1.0, 0.0, 0.0))):
        report = evaluate_interpretability(model, dataset, masks=masks, max_images=1, smoothgrad=FAST)
        for method in ("upsampled", "gradient"):
            assert report.localisations[method].test_top_slots == expected, method
            assert report.localisations[method].prototype_sources.count == 4
        assert report.top_slot_cells_mean_object_share == expected.mean_object_share


def test_deletion_of_the_object_boxes_beats_random_boxes(dataset):
    # Class 0's prototypes are the square, class 1's the background: every image is class 0 because of the square.
    model = make_model(("object", "object", "background", "background"), dataset)
    report = evaluate_interpretability(model, dataset, max_images=2, smoothgrad=FAST)
    for method in ("upsampled", "gradient"):
        scores = report.localisations[method]
        assert len(scores.deletion_curve) == 3  # intact, then the two distinct prototypes of class 0
        assert scores.deletion_curve[0] == scores.random_deletion_curve[0] > 0.5
        assert scores.deletion_curve[-1] < scores.random_deletion_curve[-1]
        assert scores.deletion_gain > 0
    assert report.more_faithful_localisation in ("upsampled", "gradient")
    assert report.localisations["upsampled"].prototype_sources is None  # no masks given


def test_report_is_json_safe(object_report):
    content = json.loads(json.dumps(object_report.to_dict(), allow_nan=False))
    assert content["localisations"]["upsampled"]["test_top_slots"]["background_share"] == 0.0
    assert content["settings"]["consistency_half_size_px"] == round(36 * SIZE / 224)
    assert content["settings"]["parts"]["names"] == PART_NAMES


def test_gradient_map_follows_the_square(dataset):
    model = make_model(("object",) * 4, dataset)
    pixels = torch.stack([EvalTransform(model.config)(dataset[i]["image"].convert("RGB")) for i in range(2)])
    maps = localisation_maps(model, pixels, [[0], [0]], "gradient", FAST)
    assert maps.shape == (2, 1, SIZE, SIZE)
    for n, (r, c) in enumerate(POSITIONS[:2]):
        top, bottom, left, right = map_boxes(maps[n, 0])
        centre_y, centre_x = (top + bottom) / 2, (left + right) / 2  # inside the square
        assert 8 * r <= centre_y <= 8 * r + SQUARE and 8 * c <= centre_x <= 8 * c + SQUARE


# --------------------------------------------------------------------------- hand computations


def test_structure_metrics_by_hand():
    slots = np.array([[0, 0, 1], [1, 2, 3], [4, 4, 4]])  # class 0 repeats 0 twice, class 2 uses 4 thrice
    out = structure_metrics(slots, num_prototypes=8)
    assert out["prototypes_used"] == 5 and out["prototypes_used_share"] == 5 / 8
    assert out["duplicate_slots_per_class"] == [2, 0, 3] and out["duplicate_slots"] == 5
    # classes per used prototype: 0 -> {0}, 1 -> {0, 1}, 2 -> {1}, 3 -> {1}, 4 -> {2}
    assert out["classes_per_prototype_mean"] == pytest.approx(6 / 5) and out["classes_per_prototype_max"] == 2


def test_explanation_size_and_top_prototypes_by_hand():
    assert explanation_size(np.array([5.0, 3.0, 1.0, 1.0, -4.0])) == 3  # 5 + 3 + 1 = 9 = 90 % of 10
    assert explanation_size(np.array([9.0, 1.0])) == 1
    assert explanation_size(np.array([-1.0, 0.0])) == 0
    assert top_prototypes(np.array([0.1, 0.9, 0.5, 0.7]), np.array([3, 5, 3, 8]), k=3) == [5, 8, 3]
    assert top_prototypes(np.array([0.1, 0.9]), np.array([3, 3]), k=3) == [3]


def test_box_stats_by_hand():
    stats = BoxStats.of([0.0, 0.05, 0.1, 0.5, 1.0])
    assert stats == BoxStats(5, 0.4, pytest.approx(0.33), 0.4)
    assert BoxStats.of([]) == BoxStats(0, None, None, None)


def test_part_hits_boxes_and_patches_by_hand():
    keypoints = np.array([[2.0, 3.0], [5.0, 5.0], [np.nan, np.nan], [4.0, 1.0]])  # (x, y)
    assert box_hits(keypoints, (1, 5, 2, 4)).tolist() == [True, False, False, True]  # borders included
    activation = np.zeros((10, 12))
    activation[1, 10] = 1
    assert peak_box(activation, 3) == (0, 5, 7, 12)  # clipped at the top and right
    assert peak_patch(activation, 4) == (0, 4, 8, 12)  # shifted inside


def test_consistency_stability_purity_by_hand():
    visible = [np.array([[1, 1], [1, 0], [1, 1], [1, 1], [1, 1]], bool)] * 2
    # unit 0: part 0 hit in 4/5 images (consistent at 0.8); unit 1: part 0 in 3/5, part 1 in 2/4 (not consistent).
    hits_a = np.array([[1, 0], [1, 0], [1, 0], [1, 0], [0, 0]], bool)
    hits_b = np.array([[1, 1], [1, 1], [1, 0], [0, 1], [0, 0]], bool)
    assert consistency_score([hits_a, hits_b], visible) == 50.0
    assert consistency_score([hits_b], visible[:1], threshold=0.6) == 100.0
    assert consistency_score([], []) is None
    noisy_a = hits_a.copy()
    noisy_a[0, 1] = True  # one of five images changes
    assert stability_score([hits_a, hits_b], [noisy_a, hits_b]) == pytest.approx(100 * (0.8 + 1.0) / 2)
    purity = purity_scores([hits_a, hits_b], visible)
    assert purity.per_prototype == [pytest.approx(0.8), pytest.approx(0.6)]
    assert purity.mean == pytest.approx(0.7) and purity.part_related_share == 1.0
    merged = purity_scores([hits_b], visible[:1], groups={"both": [0, 1]})  # hit if either: 4 of 5
    assert merged.per_prototype == [pytest.approx(0.8)]


def test_left_and_right_parts_merge():
    parts = PartAnnotations(["beak", "left eye", "right eye"], [np.zeros((3, 2))])
    assert parts.merged_groups() == {"beak": [0], "eye": [1, 2]}


def test_deletion_pieces_by_hand():
    image = torch.ones(3, 6, 6)
    steps = delete_boxes(image, [(0, 2, 0, 2), (1, 3, 1, 3)])
    assert steps.shape == (3, 3, 6, 6)
    assert steps[0].sum() == 108 and steps[1].sum() == 108 - 12 and steps[2].sum() == 108 - 12 - 9
    boxes = random_boxes_like([(0, 2, 0, 5), (1, 6, 2, 3)], (6, 6), np.random.default_rng(0))
    assert [(bottom - top, right - left) for top, bottom, left, right in boxes] == [(2, 5), (5, 1)]
    assert all(top >= 0 and bottom <= 6 and left >= 0 and right <= 6 for top, bottom, left, right in boxes)
    assert curve_area([1.0, 0.5, 0.0]) == pytest.approx(0.5)
    assert curve_area([1.0, 1.0]) == 1.0
    # An image with fewer boxes keeps all of them removed at the later steps: its curve holds its last value.
    assert mean_curve([np.array([1.0, 0.5, 0.2]), np.array([1.0, 0.8])]).tolist() == pytest.approx([1.0, 0.65, 0.5])


def test_deletion_curves_average_over_classes_with_fewer_distinct_prototypes():
    # Class 1's two slots share prototype 2, so its images have one box and class 0's two: curves of 2 and 3 points.
    torch.manual_seed(0)
    config = ProtoPoolConfig(
        backbone="test_resnet", num_labels=2, num_prototypes=4, num_slots_per_class=2, input_size=[3, 64, 64]
    )
    model = ProtoPoolForImageClassification(config).eval()
    with torch.no_grad():
        model.head.slot_logits.fill_(-5.0)
        for c, p, s in [(0, 0, 0), (0, 1, 1), (1, 2, 0), (1, 2, 1)]:
            model.head.slot_logits[c, p, s] = 5.0
    model.harden_assignment()
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(8)]
    data = datasets.Dataset.from_dict({"image": images, "label": [0, 1] * 4})
    with torch.no_grad():
        predicted = model(torch.stack([EvalTransform(config)(image) for image in images])).logits.argmax(dim=1)
    assert set(predicted.tolist()) == {0, 1}  # both kinds of image are among the explained ones
    report = evaluate_interpretability(model, data, localisation="upsampled", deletion_repeats=1)
    curve = report.localisations["upsampled"].deletion_curve
    assert len(curve) == 3 and report.localisations["upsampled"].deletion_gain is not None


# --------------------------------------------------------------------------- bad input


def test_bad_arguments_are_named(dataset):
    model = make_model(("object",) * 4, dataset)
    with pytest.raises(ValueError, match=rf"masks has 2 entries but its dataset has {len(POSITIONS)} rows"):
        evaluate_interpretability(model, dataset, masks=[np.ones((SIZE, SIZE), bool)] * 2)

    with pytest.raises(ValueError, match="Unknown mask rule 'mnist'"):
        evaluate_interpretability(model, dataset, masks="mnist")
    with pytest.raises(ValueError, match="localisation must be one or more of"):
        evaluate_interpretability(model, dataset, localisation="saliency")
    with pytest.raises(ValueError, match="max_images must be a positive int, got 0"):
        evaluate_interpretability(model, dataset, max_images=0)
    with pytest.raises(ValueError, match=r"mask function's output for masks\[0\] has shape \(3,\)"):
        evaluate_interpretability(model, dataset, masks=lambda image: np.ones(3, bool), localisation="upsampled")

    def no_forward(*args, **kwargs):
        raise AssertionError("the annotations are checked before any forward pass")

    model.forward = no_forward  # mask arrays and keypoints are checked before any work
    with pytest.raises(ValueError, match=r"masks\[0\] has shape \(5, 5\).*96x96"):
        evaluate_interpretability(model, dataset, masks=[np.ones((5, 5), bool)] * len(POSITIONS))
    outside = PartAnnotations.from_rows(
        [{"head": (120.0, 10.0)}] * len(POSITIONS), names=PART_NAMES, source="parts.json"
    )
    with pytest.raises(ValueError, match=r"parts.json: row 0, part 'head' at \(x, y\) = \(120.0, 10.0\) lies outside"):
        evaluate_interpretability(model, dataset, parts=outside)
    with pytest.raises(ValueError, match=r"unknown part names \['wing'\]"):
        PartAnnotations.from_rows([{"wing": (1, 2)}], names=PART_NAMES)


def test_the_docs_example_runs_and_prints_the_known_values(capsys):
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "metrics.md").read_text()
    snippet = text.split("## A model whose answers are known")[1].split("```python\n")[1].split("```")[0]
    exec(compile(snippet, "docs/metrics.md", "exec"), {})
    assert capsys.readouterr().out.split() == ["0.0", "1.0"]
