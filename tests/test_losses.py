import pytest
import torch
import torch.nn.functional as F

from protopool_hf.losses import (
    LossWeights,
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
