"""Property-based tests (hypothesis): config validation and forward-pass invariants over random shapes.

Config: any mix of values of any type for the config's fields gives a valid config or a `ValueError` that names one
of the fields, never another exception; a valid config survives a JSON round trip.

Forward (the pure `ProtoPoolHead` on random feature maps, plus a few whole models): for batch 1..5, map sizes,
P, S, D, C and assignment scales, the outputs are finite and of the documented shapes; in eval one image gives the
same logits alone as inside any batch; the focal similarity φ(mixed min) − φ(mixed mean) lies in [0, log(1/ε)]
(φ decreases, and the assignment mixes min ≤ mean with non-negative weights, so mixed min ≤ mixed mean); the loss
terms are finite and within their bounds, and so are the gradients.

The examples are derandomised (the same ones every run) and few enough to keep the file fast; raise `max_examples`
locally to search harder.
"""

from __future__ import annotations

import inspect
import json
import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protopool_hf import ProtoPoolConfig
from protopool_hf.layers import focal_similarity, slot_assignment
from protopool_hf.losses import (
    LossWeights,
    cluster_loss,
    l1_off_class_loss,
    mixup_cross_entropy,
    orthogonality_loss,
    separation_loss,
    weighted_total,
)
from protopool_hf.modeling_protopool import ProtoPoolHead


FAST = {"deadline": None, "database": None, "derandomize": True, "suppress_health_check": [HealthCheck.too_slow]}
TOLERANCE = 1e-5

# --------------------------------------------------------------------------- config validation

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.lists(st.integers(-2, 300), max_size=4),
    st.lists(st.floats(allow_nan=True), max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
POSITIVE_INT = st.one_of(st.integers(-2, 40), JUNK)
POSITIVE_FLOAT = st.one_of(st.floats(-1, 2000), st.sampled_from([0.0, 1e-8, float("inf"), float("nan")]), JUNK)
RGB = st.one_of(st.lists(st.floats(-1, 1), min_size=3, max_size=3), st.lists(st.floats(0, 2), max_size=4), JUNK)
FIELDS = {
    "backbone": st.one_of(st.sampled_from(["test_resnet", "test_vit", "resnet18.tv_in1k", "RESNET50", "nope"]), JUNK),
    "backbone_pretrained": st.one_of(st.booleans(), JUNK),
    "backbone_kwargs": st.one_of(st.dictionaries(st.sampled_from(["drop_path_rate", "in_chans"]), JUNK), JUNK),
    "backbone_start_weights": st.one_of(st.sampled_from(["hf-hub:timm/resnet18.tv_in1k", "file:w.pth", None]), JUNK),
    "feature_stage": st.one_of(st.integers(-5, 5), JUNK),
    "num_prototypes": POSITIVE_INT,
    "num_slots_per_class": POSITIVE_INT,
    "prototype_dim": POSITIVE_INT,
    "gumbel_scale_epochs": POSITIVE_INT,
    "similarity_epsilon": POSITIVE_FLOAT,
    "gumbel_tau": POSITIVE_FLOAT,
    "gumbel_scale_max": POSITIVE_FLOAT,
    "cluster_weight": POSITIVE_FLOAT,
    "separation_weight": POSITIVE_FLOAT,
    "orthogonality_weight": POSITIVE_FLOAT,
    "l1_weight": POSITIVE_FLOAT,
    "background_weight": POSITIVE_FLOAT,
    "background_margin": POSITIVE_FLOAT,
    "last_layer_correct_connection": st.one_of(
        st.floats(-20, 20), st.sampled_from([float("inf"), float("nan")]), JUNK
    ),
    "last_layer_incorrect_connection": st.one_of(st.floats(-20, 20), st.sampled_from([float("-inf")]), JUNK),
    "input_size": st.one_of(st.lists(st.integers(-1, 300), min_size=3, max_size=3), JUNK),
    "image_mean": RGB,
    "image_std": RGB,
    "interpolation": st.one_of(st.sampled_from(["bilinear", "bicubic", "cubic", "BILINEAR"]), JUNK),
    "crop_pct": st.one_of(st.floats(-0.5, 1.5), JUNK),
    "crop_mode": st.one_of(st.sampled_from(["center", "squash", "crop"]), JUNK),
    "projection_input_size": st.one_of(st.lists(st.integers(1, 300), min_size=3, max_size=3), JUNK),
    "projection_dataset": st.one_of(st.text(max_size=8), JUNK),
    "num_labels": POSITIVE_INT,
    "id2label": st.one_of(st.dictionaries(st.integers(0, 4), st.text(max_size=4), max_size=5), JUNK),
}
# Fields whose bad value is reported under another name: an empty id2label means num_labels = 0.
ALSO_NAMED = {"id2label": ("num_labels",)}


@settings(max_examples=300, **FAST)
@given(
    st.sets(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=3).flatmap(
        lambda chosen: st.fixed_dictionaries({name: FIELDS[name] for name in chosen})
    )
)
def test_config_is_valid_or_a_value_error_naming_a_field(tiny_config, changes):
    try:
        config = tiny_config(**changes)
    except ValueError as error:
        message = str(error)
    else:
        message = None
    if message is not None:
        names = [n for field in changes for n in (field, *ALSO_NAMED.get(field, ()))]
        assert any(name in message for name in names), f"{message!r} names none of {sorted(changes)}"
        return
    for field, value in changes.items():
        if field not in ("num_labels", "id2label", "backbone_kwargs"):
            assert getattr(config, field) == (list(value) if isinstance(value, list | tuple) else value)
    again = ProtoPoolConfig.from_dict(json.loads(config.to_json_string()))
    assert again.to_dict() == config.to_dict()


# --------------------------------------------------------------------------- the head on random feature maps


@st.composite
def head_cases(draw):
    slots = draw(st.integers(1, 3))
    return {
        "batch": draw(st.integers(1, 5)),
        "classes": draw(st.integers(1, 4)),
        "slots": slots,
        "prototypes": draw(st.integers(slots + 1, slots + 6)),
        "dim": draw(st.integers(1, 8)),
        "channels": draw(st.integers(1, 8)),
        "height": draw(st.integers(1, 6)),
        "width": draw(st.integers(1, 6)),
        "epsilon": draw(st.sampled_from([1e-4, 1e-8, 1e-2, 0.5])),
        "scale": 10 ** draw(st.floats(-2, 4)),
        "feature_scale": draw(st.sampled_from([0.0, 1.0, 30.0])),
        "hard": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


def _head(case) -> tuple[ProtoPoolHead, torch.Tensor]:
    generator = torch.Generator().manual_seed(case["seed"])
    torch.manual_seed(case["seed"])
    head = ProtoPoolHead(
        case["channels"],
        num_classes=case["classes"],
        num_prototypes=case["prototypes"],
        num_slots_per_class=case["slots"],
        prototype_dim=case["dim"],
        similarity_epsilon=case["epsilon"],
    )
    head.gumbel_scale.fill_(case["scale"])
    with torch.no_grad():  # a trained-looking last layer: own slots positive, off-class weights small
        head.last_layer.weight.add_(0.1 * torch.randn(head.last_layer.weight.shape, generator=generator))
    shape = (case["batch"], case["channels"], case["height"], case["width"])
    return head, case["feature_scale"] * torch.randn(shape, generator=generator)


def _check_output(out, case) -> None:
    n, c, p, s = case["batch"], case["classes"], case["prototypes"], case["slots"]
    assert out.logits.shape == (n, c) and out.min_distances.shape == (n, p)
    assert out.similarities.shape == (n, c, s) and out.slot_assignment.shape == (c, p, s)
    for tensor in (out.logits, out.min_distances, out.similarities, out.slot_assignment):
        assert torch.isfinite(tensor).all()
    assert out.min_distances.min() >= 0
    assert out.slot_assignment.min() >= 0
    torch.testing.assert_close(out.slot_assignment.sum(dim=1), torch.ones(c, s), atol=TOLERANCE, rtol=0)
    assert out.similarities.min() >= -TOLERANCE
    assert out.similarities.max() <= math.log(1 / case["epsilon"]) + TOLERANCE


def _assert_same_logits(alone, batched, distance_change: float, weight: torch.Tensor, epsilon: float) -> None:
    """Logits of the same images computed in two batches agree to 1e-5, plus what float32 rounding allows.

    A conv kernel may round the latent map differently for another batch size (1 ulp), which moves the distances
    by `distance_change`. φ'(d) = 1/(d + 1) − 1/(d + ε) is up to 1/ε (1e4 for ε = 1e-4) near d = 0, so a similarity
    may move by up to 2·Δd/(mixed min − Δd + ε) (at most its range log(1/ε)), and a logit by Σ |w| times that.
    """
    assert distance_change <= TOLERANCE  # the distances themselves are batch independent to rounding
    mixed_min = torch.einsum("np,cps->ncs", batched.min_distances, batched.slot_assignment).flatten(1)
    room = (mixed_min - distance_change + epsilon).clamp_min(1e-30)
    per_slot = (2 * distance_change / room).clamp_max(math.log(1 / epsilon))
    slack = per_slot @ weight.abs().T + TOLERANCE
    assert ((alone - batched.logits).abs() <= slack).all(), (alone - batched.logits).abs().max()


@settings(max_examples=150, **FAST)
@given(head_cases())
def test_head_outputs_are_finite_shaped_bounded_and_batch_independent(case):
    head, features = _head(case)
    if case["hard"]:
        head.hard_assignment.fill_(True)
    head.eval()
    with torch.no_grad():
        out = head(features)
        _check_output(out, case)
        if case["hard"]:
            assert set(out.slot_assignment.unique().tolist()) <= {0.0, 1.0}
        distances = head.distances(features)
        alone = torch.cat([head(features[i : i + 1]).logits for i in range(case["batch"])])
        change = max((head.distances(features[i : i + 1])[0] - distances[i]).abs().max() for i in range(len(features)))
        _assert_same_logits(alone, out, float(change), head.last_layer.weight, case["epsilon"])
        order = torch.randperm(case["batch"], generator=torch.Generator().manual_seed(case["seed"]))
        permuted = head(features[order]).logits[torch.argsort(order)]
        change = (head.distances(features[order])[torch.argsort(order)] - distances).abs().max()
        _assert_same_logits(permuted, out, float(change), head.last_layer.weight, case["epsilon"])


@settings(max_examples=150, **FAST)
@given(head_cases(), st.floats(0, 1))
def test_training_pass_loss_terms_and_gradients_are_finite_and_bounded(case, lam):
    head, features = _head(case)
    head.train()
    out = head(features)  # a Gumbel-softmax sample of the assignment
    _check_output(out, case)
    generator = torch.Generator().manual_seed(case["seed"] + 1)
    labels = torch.randint(case["classes"], (case["batch"],), generator=generator)
    labels_b = torch.randint(case["classes"], (case["batch"],), generator=generator)
    class_assignment = out.slot_assignment[labels]
    terms = {
        "cross_entropy": mixup_cross_entropy(out.logits, labels, labels_b, lam),
        "cluster": cluster_loss(out.min_distances, class_assignment, case["slots"]),
        "separation": separation_loss(out.min_distances, class_assignment, case["slots"]),
        "orthogonality": orthogonality_loss(head.slot_logits),
        "l1": l1_off_class_loss(head.last_layer.weight, case["slots"]),
    }
    for name, value in terms.items():
        assert value.shape == () and torch.isfinite(value), name
    assert terms["cross_entropy"] >= 0 and terms["l1"] >= 0
    assert 0 <= terms["cluster"] <= out.min_distances.max() + TOLERANCE
    assert 0 <= terms["separation"] <= out.min_distances.max() + TOLERANCE
    # Σ of a Gram matrix of unit vectors is ‖Σ u‖² ∈ [0, S²]: the term lies in [−1, S − 1].
    assert -1 - TOLERANCE <= terms["orthogonality"] <= case["slots"] - 1 + TOLERANCE
    weighted_total(terms, LossWeights()).backward()
    for name, parameter in head.named_parameters():
        assert parameter.grad is None or torch.isfinite(parameter.grad).all(), name


@settings(max_examples=200, **FAST)
@given(
    st.integers(1, 4),
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(2, 7),
    st.floats(-8, 6),
    st.sampled_from([1e-4, 1e-8, 0.1]),
    st.sampled_from(["softmax", "hard"]),
    st.integers(0, 2**16),
)
def test_focal_similarity_lies_between_zero_and_log_one_over_epsilon(n, c, s, p, magnitude, epsilon, mode, seed):
    generator = torch.Generator().manual_seed(seed)
    min_distances = (10**magnitude) * torch.rand(n, p, generator=generator)
    min_distances[:, 0] = 0  # an exact match
    mean_distances = min_distances + (10**magnitude) * torch.rand(n, p, generator=generator)
    logits = torch.randn(c, p, s, generator=generator)
    assignment = slot_assignment(logits, 10 ** (magnitude / 2), gumbel_tau=0.5, mode=mode)
    similarity = focal_similarity(min_distances, mean_distances, assignment, epsilon)
    assert similarity.shape == (n, c, s) and torch.isfinite(similarity).all()
    assert similarity.min() >= -TOLERANCE
    assert similarity.max() <= math.log(1 / epsilon) + TOLERANCE


# --------------------------------------------------------------------------- whole models


@settings(max_examples=6, **FAST)
@given(
    st.sampled_from(["test_resnet", "test_convnext"]),
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(1, 2),
    st.integers(1, 4),
    st.integers(1, 6),
    st.sampled_from([64, 72, 96]),
    st.sampled_from([64, 80]),
)
def test_whole_model_invariants(tiny_model, backbone, batch, classes, slots, extra_prototypes, dim, height, width):
    model = tiny_model(
        backbone=backbone,
        num_labels=classes,
        num_prototypes=slots + extra_prototypes,
        num_slots_per_class=slots,
        prototype_dim=dim,
        input_size=[3, height, width],
    ).eval()
    config = model.config
    x = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        out = model(x)
        case = {"batch": batch, "classes": classes, "prototypes": slots + extra_prototypes, "slots": slots}
        _check_output(out, {**case, "epsilon": config.similarity_epsilon})
        distances = model.prototype_distances(x)
        alone = torch.cat([model(x[i : i + 1]).logits for i in range(batch)])
        change = max((model.prototype_distances(x[i : i + 1])[0] - distances[i]).abs().max() for i in range(batch))
        _assert_same_logits(alone, out, float(change), model.head.last_layer.weight, config.similarity_epsilon)
    labels = torch.arange(batch) % classes
    loss = model.train()(x, labels=labels)
    assert torch.isfinite(loss.loss) and all(torch.isfinite(v) for v in loss.loss_terms.values())


def test_every_config_field_is_fuzzed():
    """A new config field must be fuzzed too: add it to FIELDS."""
    own = set(inspect.signature(ProtoPoolConfig.__init__).parameters) - {"self", "kwargs", "protopool_version"}
    assert sorted(own - set(FIELDS)) == []
