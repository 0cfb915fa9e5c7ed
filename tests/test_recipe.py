"""protopool_hf.recipe: the recipe's checks, its phases' TrainingArguments, group lrs and loss weights."""

from __future__ import annotations

from pathlib import Path

import pytest

from protopool_hf.recipe import ProtoPoolRecipe, RecipeResult


def test_recipe_checks_its_arguments(tmp_path: Path):
    with pytest.raises(ValueError, match="warmup_epochs"):
        ProtoPoolRecipe(warmup_epochs=-1)
    with pytest.raises(ValueError, match="warmup_epochs \\+ joint_epochs"):
        ProtoPoolRecipe(warmup_epochs=0, joint_epochs=0)
    with pytest.raises(ValueError, match="eval_strategy"):
        ProtoPoolRecipe(eval_strategy="sometimes")
    with pytest.raises(ValueError, match="training_args may not set"):
        ProtoPoolRecipe(training_args={"seed": 3})
    recipe = ProtoPoolRecipe(output_dir=str(tmp_path), use_cpu=True)
    args = recipe.training_arguments("joint")
    assert (args.num_train_epochs, args.load_best_model_at_end, args.metric_for_best_model) == (21, True, "accuracy")
    assert (args.weight_decay, args.max_grad_norm, args.seed) == (1e-3, 0.0, 1)
    assert Path(args.output_dir) == tmp_path / "joint"
    assert not recipe.training_arguments("warmup").load_best_model_at_end
    assert recipe.training_arguments("finetune", evaluate=False).eval_strategy == "no"
    assert (recipe.epoch_offset("joint"), recipe.epoch_offset("finetune")) == (9, 30)
    with pytest.raises(ValueError, match="finetune_learning_rate must be > 0"):
        ProtoPoolRecipe(finetune_learning_rate=0.0)
    with pytest.raises(ValueError, match="backbone_learning_rate must be > 0"):
        ProtoPoolRecipe(backbone_learning_rate=-1e-4)


def test_each_phase_loss_is_set_by_the_recipe():
    recipe = ProtoPoolRecipe()
    assert recipe.phase_loss_weights("warmup") == recipe.phase_loss_weights("joint") == {}
    finetune = recipe.phase_loss_weights("finetune")
    assert finetune == {
        "cluster_weight": 0.0, "separation_weight": 0.0, "orthogonality_weight": 0.0, "background_weight": 0.0,
    }  # fmt: skip
    finetune["cluster_weight"] = 1.0  # a copy: the recipe's own stays
    assert recipe.phase_loss_weights("finetune")["cluster_weight"] == 0.0
    with pytest.raises(ValueError, match="Unknown phase 'projection'"):
        recipe.phase_loss_weights("projection")
    assert RecipeResult(model=None, output_dir="run", metrics={}).projection is None
