"""Tests of protopool_hf.torch_utils: eval-mode switching and the label-range check shared by the package."""

import pytest
import torch
from torch import nn

from protopool_hf.torch_utils import check_labels, evaluating, unwrap_model


def test_evaluating_restores_every_submodule_mode_and_grad_mode():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.BatchNorm1d(2))
    model[2].eval()  # a frozen submodule (e.g. a backbone in warm-up) stays in eval mode afterwards
    with evaluating(model) as inside:
        assert inside is model
        assert not any(module.training for module in model.modules())
        assert not torch.is_grad_enabled()
    assert [module.training for module in model.modules()] == [True, True, True, False]
    assert torch.is_grad_enabled()


def test_evaluating_restores_modes_after_an_error():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    with pytest.raises(RuntimeError, match="boom"), evaluating(model):
        raise RuntimeError("boom")
    assert all(module.training for module in model.modules())


def test_check_labels_accepts_the_range_and_names_what_is_outside():
    check_labels(torch.tensor([0, 1, 2]), 3)
    check_labels(torch.zeros(0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"^`labels` holds \[-1, 3\], outside \[0, 3\) for this model's 3 classes"):
        check_labels(torch.tensor([3, 0, -1, 3]), 3)
    with pytest.raises(ValueError, match=r"^`labels` of batch 2 holds \[7\] \(samples at index \[12\]\)"):
        check_labels(torch.tensor([0, 7]), 3, name="`labels` of batch 2", index=[11, 12])
    check_labels(torch.tensor([0, 70]), None)  # no class count: only negatives are refused
    with pytest.raises(ValueError, match=r"negative labels \[-1\] \(samples at index \[5\]\).*unlabelled"):
        check_labels(torch.tensor([-1, 4]), None, index=torch.tensor([5, 6]))


@pytest.mark.slow
def test_check_labels_under_torch_compile_is_an_assertion_in_the_graph():
    compiled = torch.compile(lambda labels: check_labels(labels, 3) or labels + 1, backend="eager", fullgraph=True)
    assert compiled(torch.tensor([0, 2])).tolist() == [1, 3]
    with pytest.raises(RuntimeError, match=r"outside \[0, 3\)"):
        compiled(torch.tensor([0, 3]))


def test_unwrap_model():
    inner = nn.Linear(2, 2)
    assert unwrap_model(nn.DataParallel(nn.DataParallel(inner))) is inner and unwrap_model(inner) is inner
