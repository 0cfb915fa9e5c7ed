"""protopool_hf.gumbel: the slot assignment's Gumbel scale and hardening, kept through saving and loading.

The warning for a scale nothing sets is tested with the Trainer in test_hf_interop.py.
"""

import pytest
import torch

from protopool_hf import ProtoPoolForImageClassification


def test_gumbel_scale_and_hard_assignment_are_saved(tiny_model, tmp_path):
    model = tiny_model()
    assert model.gumbel_scale == 1.0 and not model.is_assignment_hard
    model.set_gumbel_scale(577.35)
    model.harden_assignment()
    out = model.train()(torch.randn(1, 3, 160, 160))
    hard = torch.nn.functional.one_hot(model.head.slot_logits.argmax(1), 6).permute(0, 2, 1).float()
    assert torch.equal(out.slot_assignment, hard)  # hard in every mode, logits kept
    model.save_pretrained(tmp_path)
    reloaded = ProtoPoolForImageClassification.from_pretrained(tmp_path)
    assert reloaded.gumbel_scale == pytest.approx(577.35) and reloaded.is_assignment_hard
    assert torch.equal(reloaded.class_to_prototypes(), model.class_to_prototypes())
