import pytest
import torch
import torch.nn.functional as F

from protopool_hf.losses import (
    BACKGROUND_BELOW,
    LossWeights,
    all_loss_terms,
    background_cells,
    background_loss,
    cluster_loss,
    l1_off_class_loss,
    mixup_cross_entropy,
    orthogonality_loss,
    separation_loss,
    weighted_total,
)


# Two images, P=4 prototypes, C=2 classes, S=2 slots. Class 0 uses prototypes {0, 1}, class 1 uses {2, 3}.
MIN_DISTANCES = torch.tensor([[0.5, 0.2, 0.1, 0.9], [0.3, 0.4, 0.8, 0.6]])
ASSIGNMENT = torch.zeros(2, 4, 2)
ASSIGNMENT[0, 0, 0] = ASSIGNMENT[0, 1, 1] = ASSIGNMENT[1, 2, 0] = ASSIGNMENT[1, 3, 1] = 1.0
LABELS = torch.tensor([0, 1])


def test_cluster_takes_the_closest_of_the_class_prototypes():
    # image 0 (class 0): min(0.5, 0.2) = 0.2; image 1 (class 1): min(0.8, 0.6) = 0.6
    assert cluster_loss(MIN_DISTANCES, ASSIGNMENT[LABELS], 2).item() == pytest.approx((0.2 + 0.6) / 2)


def test_separation_takes_the_closest_of_the_other_prototypes():
    # image 0: min over {2, 3} = 0.1; image 1: min over {0, 1} = 0.3
    assert separation_loss(MIN_DISTANCES, ASSIGNMENT[LABELS], 2).item() == pytest.approx((0.1 + 0.3) / 2)


def test_cluster_gradient_flows_to_distances_not_to_the_assignment():
    distances = MIN_DISTANCES.clone().requires_grad_()
    assignment = ASSIGNMENT.clone().requires_grad_()
    cluster_loss(distances, assignment[LABELS], 2).backward()
    assert distances.grad[0, 1] == 0.5 and distances.grad[1, 3] == 0.5
    assert assignment.grad is None or not assignment.grad.any()


def test_orthogonality_is_the_official_mean_cosine_minus_one():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 4)
    cos = F.cosine_similarity(logits.unsqueeze(2), logits.unsqueeze(3), dim=1)  # (C, S, S), diagonal included
    expected = cos.sum() / (3 * 4) - 1
    assert orthogonality_loss(logits).item() == pytest.approx(expected.item(), abs=1e-6)
    orthogonal = torch.zeros(1, 4, 2)
    orthogonal[0, 0, 0] = orthogonal[0, 1, 1] = 1.0
    assert orthogonality_loss(orthogonal).item() == pytest.approx(0.0, abs=1e-7)
    identical = torch.ones(1, 4, 2)
    assert orthogonality_loss(identical).item() == pytest.approx(1.0)


def test_l1_counts_only_off_class_weights():
    weight = torch.tensor([[1.0, 1.0, -0.5, 0.25], [2.0, 0.0, 1.0, 1.0]])  # C=2, S=2
    assert l1_off_class_loss(weight, 2).item() == pytest.approx(0.5 + 0.25 + 2.0)


def test_mixup_cross_entropy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    a, b = torch.tensor([0, 1]), torch.tensor([1, 1])
    expected = 0.3 * F.cross_entropy(logits, a) + 0.7 * F.cross_entropy(logits, b)
    assert mixup_cross_entropy(logits, a, b, 0.3).item() == pytest.approx(expected.item())
    assert mixup_cross_entropy(logits, a).item() == pytest.approx(F.cross_entropy(logits, a).item())


def test_weighted_total_subtracts_separation():
    terms = {name: torch.tensor(1.0) for name in ("cross_entropy", "cluster", "separation", "orthogonality", "l1")}
    assert weighted_total(terms, LossWeights()).item() == pytest.approx(1 + 0.8 - 0.08 + 1.0 + 1e-4)
    with pytest.raises(ValueError, match="All loss weights are zero"):
        weighted_total({"l1": torch.tensor(1.0)}, LossWeights(l1=0.0))


def official_orthogonality(slot_logits: torch.Tensor) -> torch.Tensor:
    """The official form: cosines of the broadcast (C, P, S, S) pairs over P, summed, / (C·S) − 1 (float64)."""
    theta = slot_logits.double()
    num_classes, _, num_slots = theta.shape
    cosines = F.cosine_similarity(theta.unsqueeze(2), theta.unsqueeze(-1), dim=1)  # (C, S, S)
    return cosines.sum() / (num_classes * num_slots) - 1


def test_orthogonality_gram_form_matches_the_official_formula_at_the_cub_setting():
    # The Gram form never materialises the (C, P, S, S) tensor of the official code: check the value at full size.
    torch.manual_seed(0)
    logits = torch.nn.init.xavier_normal_(torch.empty(200, 202, 10))
    expected = official_orthogonality(logits).item()
    assert abs(expected) > 1e-4  # random slots are not exactly orthogonal: a term stuck at 0 fails below
    # 200·10·10 cosines summed in float32, each off by a few ulps, then divided by C·S = 2000.
    assert orthogonality_loss(logits).item() == pytest.approx(expected, rel=0, abs=1e-5)
    # Known values: identical slots give S − 1; slots on disjoint prototypes give 0 (only the diagonal is left).
    same = torch.rand(3, 7, 1).expand(3, 7, 4)
    assert orthogonality_loss(same).item() == pytest.approx(3.0, abs=1e-5)
    disjoint = torch.eye(7)[:, :4].expand(3, 7, 4)
    assert orthogonality_loss(disjoint).item() == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- the background term (not in the official method)
def test_background_cells_follow_the_object_share_of_each_cell():
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, :4, :4] = True  # cell (0, 0) of a 2×2 map is all object
    mask[0, 4, 4] = True  # cell (1, 1): 1 of 16 pixels, 6 % < BACKGROUND_BELOW
    mask[0, 0, 4:6] = True  # cell (0, 1): 2 of 16 pixels, 12.5 % >= BACKGROUND_BELOW
    assert 1 / 16 < BACKGROUND_BELOW <= 2 / 16
    assert background_cells(mask, (2, 2)).tolist() == [[[False, False], [True, True]]]
    # A size that does not divide the input: the cells of adaptive average pooling (they overlap by one pixel here).
    mask = torch.zeros(1, 5, 5, dtype=torch.bool)
    mask[0, 2, :] = True  # the middle row belongs to both rows of cells
    assert background_cells(mask, (2, 1)).tolist() == [[[False], [False]]]


def test_background_loss_by_hand():
    # N=3, P=2, a 1×2 map: left cell background, right cell object (image 0 and 1); image 2 is all object.
    distances = torch.tensor(
        [
            [[[1.0, 4.0]], [[5.0, 2.0]]],  # p0 nearer the background (hinge 4 − 1 + m), p1 nearer the object
            [[[3.0, 3.0]], [[9.0, 0.5]]],  # a tie (hinge m), far enough (hinge 0)
            [[[0.0, 0.0]], [[0.0, 0.0]]],  # no background cell: left out
        ]
    )
    mask = torch.zeros(3, 4, 4, dtype=torch.bool)
    mask[:, :, 2:] = True
    mask[2] = True
    margin = 0.5
    expected = (max(4 - 1 + margin, 0) + max(2 - 5 + margin, 0) + margin + max(0.5 - 9 + margin, 0)) / 4
    assert background_loss(distances, mask, margin).item() == pytest.approx(expected)
    # The gradient pulls the nearest object patch in and pushes the nearest background patch out, only where violated.
    distances.requires_grad_()
    background_loss(distances, mask, margin).backward()
    assert distances.grad[0, 0].tolist() == [[-0.25, 0.25]] and not distances.grad[0, 1].any()
    assert not distances.grad[2].any()
    # No image with both kinds of cells: 0, not nan.
    assert background_loss(distances[2:], mask[2:], margin).item() == 0.0


def test_background_term_joins_the_terms_only_with_a_mask():
    logits, labels = torch.randn(2, 2), torch.tensor([0, 1])
    distances = torch.rand(2, 4, 2, 2)
    args = (logits, distances.flatten(2).amin(2), ASSIGNMENT, ASSIGNMENT, torch.zeros(2, 4), labels)
    assert "background" not in all_loss_terms(*args)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, :2] = True
    terms = all_loss_terms(*args, distances=distances, object_mask=mask, background_margin=0.3)
    assert terms["background"] == background_loss(distances, mask, 0.3)
    # It counts in the total with its own weight, and the default weight (0) leaves it out.
    without = {k: v for k, v in terms.items() if k != "background"}
    assert weighted_total(terms, LossWeights()) == weighted_total(without, LossWeights())
    total = weighted_total(terms, LossWeights(background=2.0))
    assert total == pytest.approx(weighted_total(without, LossWeights()) + 2.0 * terms["background"])
