import math
import subprocess
import sys

import pytest
import torch

from protopool_hf.layers import (
    focal_similarity,
    log_similarity,
    slot_assignment,
    slot_class_identity,
    squared_l2_distances,
)


def test_distances_equal_a_brute_force_loop():
    torch.manual_seed(0)
    latent, prototypes = torch.rand(2, 5, 3, 4), torch.rand(7, 5)
    expected = torch.empty(2, 7, 3, 4)
    for n in range(2):
        for p in range(7):
            for h in range(3):
                for w in range(4):
                    expected[n, p, h, w] = ((latent[n, :, h, w] - prototypes[p]) ** 2).sum()
    torch.testing.assert_close(squared_l2_distances(latent, prototypes), expected, atol=1e-6, rtol=1e-5)


def test_distances_are_clamped_at_zero():
    latent = torch.full((1, 3, 1, 1), 0.3)
    assert squared_l2_distances(latent, latent[:, :, 0, 0]).min() == 0


def test_log_similarity_matches_its_formula():
    d = torch.tensor([0.0, 0.5, 10.0])
    expected = torch.tensor([math.log(1 / 1e-4), math.log(1.5 / (0.5 + 1e-4)), math.log(11 / (10 + 1e-4))])
    torch.testing.assert_close(log_similarity(d, 1e-4), expected)


def test_focal_similarity_mixes_slots_in_distance_space():
    min_d, mean_d = torch.tensor([[1.0, 3.0]]), torch.tensor([[2.0, 5.0]])
    assignment = torch.tensor([[[0.25], [0.75]]])  # C=1, P=2, S=1
    mixed_min, mixed_mean = 0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * 5
    expected = math.log((mixed_min + 1) / (mixed_min + 1e-4)) - math.log((mixed_mean + 1) / (mixed_mean + 1e-4))
    out = focal_similarity(min_d, mean_d, assignment, 1e-4)
    assert out.shape == (1, 1, 1)
    assert out.item() == pytest.approx(expected, rel=1e-6)


def test_assignment_modes():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 2)
    for mode in ("gumbel", "softmax", "hard"):
        a = slot_assignment(logits, 2.0, gumbel_tau=0.5, mode=mode)
        assert a.shape == (3, 5, 2)
        torch.testing.assert_close(a.sum(dim=1), torch.ones(3, 2))
    torch.testing.assert_close(
        slot_assignment(logits, 2.0, gumbel_tau=0.5, mode="softmax"), torch.softmax(logits * 2, 1)
    )
    hard = slot_assignment(logits, 2.0, gumbel_tau=0.5, mode="hard")
    assert torch.equal(hard.argmax(1), logits.argmax(1))
    assert set(hard.unique().tolist()) == {0.0, 1.0}
    with pytest.raises(ValueError, match="Unknown assignment mode 'argmax'"):
        slot_assignment(logits, 1.0, gumbel_tau=0.5, mode="argmax")


def test_slot_class_identity():
    identity = slot_class_identity(2, 3)
    assert identity.tolist() == [[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]]


def test_the_maths_imports_without_transformers():
    script = (
        "import sys; sys.modules['transformers'] = None\n"
        "import protopool_hf.layers, protopool_hf.losses\n"
        "assert not any(name.startswith('transformers') for name in sys.modules if sys.modules[name] is not None)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
