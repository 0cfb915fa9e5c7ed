"""The example scripts' own logic: the demo's `--set` overrides and the head-only experiment protocol."""

import sys
from pathlib import Path

import pytest
import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import demo
import head_experiments


def test_demo_overrides_parse_json_and_name_bad_fields():
    settings = demo.apply_overrides(
        demo.DemoSettings(), ["image_size=64", "backbone_learning_rate=null", "augment_scale=[0.5, 1.0]"]
    )
    assert (settings.image_size, settings.backbone_learning_rate, settings.augment_scale) == (64, None, [0.5, 1.0])
    with pytest.raises(ValueError, match="unknown field 'image'"):
        demo.apply_overrides(demo.DemoSettings(), ["image=64"])
    with pytest.raises(ValueError, match="the value must be JSON"):
        demo.apply_overrides(demo.DemoSettings(), ["learning_rate=fast"])


def synthetic_features(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 8, 3, 3) maps where class c lights channel c at one random cell: a task a prototype head can solve."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    maps = 0.1 * torch.randn(n, 8, 3, 3, generator=generator)
    cells = torch.randint(0, 9, (n,), generator=generator)
    maps.view(n, 8, 9)[torch.arange(n), labels, cells] += 3.0
    return maps.half(), labels


def test_head_only_protocol_learns_projects_and_fine_tunes():
    features = {"train": synthetic_features(512, 0), "test": synthetic_features(128, 1)}
    settings = head_experiments.HeadSettings(
        num_prototypes=8, num_slots_per_class=2, prototype_dim=8, epochs=10, batch_size=16, correct_connection=10.0,
        ft_epochs=2,
    )  # fmt: skip
    result = head_experiments.run_head(features, settings)
    assert result["soft"] > 0.9  # the main phase learns the task
    assert result["fine_tuned"] > 0.5  # after projection and fine-tuning still far above chance (0.25)
    assert 2 <= result["prototypes_used"] <= 8
    assert result["correct_connection"] == 10.0  # the settings are recorded with the result
