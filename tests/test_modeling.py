"""protopool_hf.modeling_protopool: the head and the model: outputs and loss terms, assignment modes, initialisation,
labels, autocast, the pipeline, timm's forward_features / forward_head split."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, pipeline

from protopool_hf import ProtoPoolForImageClassification, ProtoPoolOutput
from protopool_hf.layers import slot_class_identity
from protopool_hf.losses import background_loss, weighted_total
from protopool_hf.modeling_protopool import ProtoPoolHead


def test_batch_size_one(tiny_model):
    model = tiny_model().eval()
    out = model(torch.randn(1, 3, 160, 160), labels=torch.tensor([1]))
    assert out.logits.shape == (1, 3) and out.min_distances.shape == (1, 6) and torch.isfinite(out.loss)


def test_output_and_loss_terms(tiny_model):
    model = tiny_model().train()
    out = model(torch.randn(2, 3, 160, 160), labels=torch.tensor([0, 1]))
    assert isinstance(out, ProtoPoolOutput)
    assert set(out.loss_terms) == {"cross_entropy", "cluster", "separation", "orthogonality", "l1"}
    terms = out.loss_terms
    expected = (
        terms["cross_entropy"]
        + 0.8 * terms["cluster"]
        - 0.08 * terms["separation"]
        + terms["orthogonality"]
        + 1e-4 * terms["l1"]
    )
    torch.testing.assert_close(out.loss, expected)
    assert terms["l1"].item() == 0.0  # off-class weights start at 0
    assert model.config.keys_to_ignore_at_inference == [
        "min_distances",
        "slot_assignment",
        "loss_terms",
        "similarities",
        "distances",
    ]


def test_background_term_with_an_object_mask_and_a_weight(tiny_model):
    """`object_mask` adds the background term only when the config's weight is not 0; the loss counts it once."""
    torch.manual_seed(0)
    pixels, labels = torch.randn(2, 3, 160, 160), torch.tensor([0, 1])
    mask = torch.zeros(2, 160, 160, dtype=torch.bool)
    mask[:, 40:120, 40:120] = True  # the middle of the map is object, its border background
    plain = tiny_model().eval()
    assert "background" not in plain(pixels, labels=labels, object_mask=mask).loss_terms  # weight 0: off

    model = tiny_model(background_weight=2.0, background_margin=0.5).eval()
    out = model(pixels, labels=labels, object_mask=mask)
    assert out.loss_terms["background"] == background_loss(out.distances, mask, 0.5)
    without = {name: value for name, value in out.loss_terms.items() if name != "background"}
    torch.testing.assert_close(
        out.loss, weighted_total(without, model.loss_weights) + 2.0 * out.loss_terms["background"]
    )
    # Without a mask in the batch there is nothing to compute it on.
    assert "background" not in model(pixels, labels=labels).loss_terms
    with pytest.raises(ValueError, match="background_weight"):
        tiny_model(background_weight=-1.0)


def test_labels_out_of_range_are_refused_with_a_clear_message(tiny_model):
    model = tiny_model()
    x = torch.randn(2, 3, 160, 160)
    with pytest.raises(ValueError, match=r"`labels` holds \[3\], outside \[0, 3\)"):
        model(x, labels=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"`labels` holds \[-1\]"):
        model(x, labels=torch.tensor([-1, 0]))


def test_eval_is_deterministic_softmax_and_scale_one_is_the_plain_softmax_path(tiny_model):
    model = tiny_model().eval()
    model.set_gumbel_scale(1.0)
    torch.testing.assert_close(model.deterministic_assignment(), torch.softmax(model.head.slot_logits, dim=1))
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(model(x).slot_assignment, torch.softmax(model.head.slot_logits, dim=1))
        torch.testing.assert_close(model(x).logits, model(x).logits)
    with pytest.raises(ValueError, match="The Gumbel scale must be > 0"):
        model.set_gumbel_scale(0.0)


def test_head_initialisation_follows_the_official_code(tiny_model):
    model = tiny_model()
    weight = model.head.last_layer.weight
    assert weight.shape == (3, 6) and weight.sum() == 6 and torch.equal(weight[1, 2:4], torch.ones(2))
    assert model.head.last_layer.bias is None
    assert model.head.prototypes.shape == (6, 8) and model.head.prototypes.min() >= 0


def test_last_layer_connections_come_from_the_config_and_trained_weights_survive_reloading(tiny_model, tmp_path):
    model = tiny_model(last_layer_correct_connection=10.0)
    weight = model.head.last_layer.weight
    assert torch.equal(weight[0], torch.tensor([10.0, 10.0, 0, 0, 0, 0]))
    with torch.no_grad():
        weight[2, 0] = -3.0  # as fine-tuning would
    model.save_pretrained(tmp_path)
    reloaded = ProtoPoolForImageClassification.from_pretrained(tmp_path)
    assert reloaded.config.last_layer_correct_connection == 10.0
    assert torch.equal(reloaded.head.last_layer.weight, weight)


def test_pipeline_returns_the_model_labels(tiny_model, tmp_path):
    model = tiny_model(id2label={0: "cat", 1: "dog", 2: "eel"}, label2id={"cat": 0, "dog": 1, "eel": 2})
    model.save_pretrained(tmp_path)
    classify = pipeline("image-classification", model=str(tmp_path))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (180, 180, 3), dtype=np.uint8))
    predictions = classify(image, top_k=3)
    assert {p["label"] for p in predictions} == {"cat", "dog", "eel"}
    assert sum(p["score"] for p in predictions) == pytest.approx(1.0, abs=1e-4)
    model.eval()
    with torch.no_grad():
        logits = model(AutoImageProcessor.from_pretrained(tmp_path)(image, return_tensors="pt")["pixel_values"]).logits
    assert predictions[0]["label"] == model.config.id2label[int(logits.argmax())]


def test_bf16_autocast_logits_match_float32(tiny_model):
    model = tiny_model().eval()
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        reference = model(x).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(x)
    assert mixed.logits.dtype == torch.float32 and mixed.min_distances.dtype == torch.float32
    torch.testing.assert_close(mixed.logits, reference, atol=1e-2, rtol=0)


# ---------------------------------------------------------------------------------------------- the head
def test_head_initialisation_and_modes():
    torch.manual_seed(0)
    head = ProtoPoolHead(4, num_classes=2, num_prototypes=5, num_slots_per_class=2, prototype_dim=3)
    assert torch.equal(head.last_layer.weight, slot_class_identity(2, 2))
    assert head.prototypes.min() >= 0 and head.prototypes.max() < 1
    assert head.gumbel_scale.item() == 1.0 and not head.hard_assignment
    features = torch.randn(1, 4, 3, 3)
    head.eval()
    first, second = head(features), head(features)
    torch.testing.assert_close(first.logits, second.logits)  # eval is deterministic
    head.train()
    torch.manual_seed(1)
    noisy = head(features)
    assert not torch.allclose(noisy.slot_assignment, first.slot_assignment)
    head.hard_assignment.fill_(True)
    assert set(head(features).slot_assignment.unique().tolist()) == {0.0, 1.0}


def test_last_layer_connections_set_its_initial_weights():
    head = ProtoPoolHead(
        4, num_classes=2, num_prototypes=5, num_slots_per_class=2, prototype_dim=3, correct_connection=10.0,
        incorrect_connection=-0.5,
    )  # fmt: skip
    assert head.last_layer.weight.tolist() == [[10, 10, -0.5, -0.5], [-0.5, -0.5, 10, 10]]
    features = torch.randn(3, 4, 2, 2)
    out = head.eval()(features)
    expected = out.similarities.sum(2) * 10.5 - 0.5 * out.similarities.sum((1, 2))[:, None]
    torch.testing.assert_close(out.logits, expected)


def test_head_works_at_batch_size_one_and_on_a_one_by_one_map():
    head = ProtoPoolHead(4, num_classes=2, num_prototypes=5, num_slots_per_class=2, prototype_dim=3).eval()
    out = head(torch.randn(1, 4, 1, 1))
    assert out.logits.shape == (1, 2) and out.min_distances.shape == (1, 5) and out.similarities.shape == (1, 2, 2)


def test_head_computes_in_float32_under_bf16_autocast():
    torch.manual_seed(0)
    head = ProtoPoolHead(8, num_classes=3, num_prototypes=6, num_slots_per_class=2, prototype_dim=4).eval()
    features = torch.randn(2, 8, 4, 4)
    reference = head(features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = head(features.bfloat16())
    assert mixed.logits.dtype == torch.float32 and mixed.min_distances.dtype == torch.float32
    torch.testing.assert_close(mixed.logits, reference.logits, atol=2e-2, rtol=0)


# ---------------------------------------------------------------------------------------------- the model
def test_constructing_a_model_leaves_the_callers_config_untouched(tiny_config):
    config = tiny_config()
    before = config.to_dict()
    model = ProtoPoolForImageClassification(config)
    assert config.to_dict() == before and config.input_size is None and config.image_mean is None
    assert model.config is not config
    assert model.config.input_size == [3, 160, 160] and model.config.crop_mode == "center"  # recorded in its copy


def test_forward_runs_forward_head_on_forward_features_and_returns_one_output_type(tiny_model):
    model = tiny_model().eval()
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        features = model.forward_features(x)
        head_out = model.forward_head(features)
        out = model(x)
        with_loss = model(x, labels=torch.tensor([0, 2]))
    assert type(head_out) is type(out) is type(with_loss) is ProtoPoolOutput
    assert head_out.loss is None and head_out.loss_terms is None and with_loss.loss is not None
    assert features.shape[:2] == (2, model.head.add_on[0].in_channels)
    for name in ("logits", "min_distances", "slot_assignment", "similarities", "distances"):
        assert torch.equal(getattr(out, name), getattr(head_out, name)), name
        assert torch.equal(getattr(with_loss, name), getattr(out, name)), name
    assert out.distances.shape == (2, 6, *features.shape[-2:])
    assert torch.equal(out.min_distances, out.distances.flatten(2).amin(2))
    assert list(with_loss.keys())[:2] == ["loss", "logits"]  # Trainer reads outputs[0] as the loss


def test_mixup_labels_without_labels_are_refused(tiny_model):
    with pytest.raises(ValueError, match="`mixup_labels` came without `labels`"):
        tiny_model()(torch.randn(2, 3, 160, 160), mixup_labels=torch.tensor([0, 1]), mixup_lambda=0.5)
