"""protopool_hf.backbone: every timm test model as a backbone, NCHW maps, pruning, feature stages, leading stages,
timm's initialisation, pretrained weights and buffers, activation checkpointing."""

import pytest
import timm
import torch
from transformers import AutoModelForImageClassification

from protopool_hf import ProtoPoolForImageClassification
from protopool_hf.backbone import leading_stage_parameters


TEST_BACKBONES = timm.list_models("test_*")


def parametrized_backbones(test) -> list[str]:
    """The `backbone` values a test is parametrized with (plain values or `pytest.param`s)."""
    marks = [m for m in test.pytestmark if m.name == "parametrize" and m.args[0] == "backbone"]
    return [value.values[0] if hasattr(value, "values") else value for mark in marks for value in mark.args[1]]


def test_every_timm_test_model_is_covered():
    # Whatever this timm version lists (18 in timm 1.0.x), every one runs through the per-backbone tests.
    listed = timm.list_models("test_*")
    assert {"test_resnet", "test_mambaout", "test_vit", "test_vit_relpos", "test_convnext"} <= set(listed)
    for test in (
        test_any_timm_backbone_trains_saves_and_reloads,
        test_leading_stages_are_exactly_what_each_stage_map_depends_on,
    ):
        assert sorted(parametrized_backbones(test)) == sorted(listed), test.__name__


@pytest.mark.parametrize("backbone", TEST_BACKBONES)
def test_any_timm_backbone_trains_saves_and_reloads(tiny_model, backbone, tmp_path):
    model = tiny_model(backbone=backbone, backbone_kwargs={"drop_path_rate": 0.1} if "vit" in backbone else None)
    size = model.config.input_size
    x = torch.randn(2, *size)
    out = model(x, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and out.min_distances.shape == (2, 6) and out.slot_assignment.shape == (3, 6, 2)
    out.loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing}"
    model.eval()
    with torch.no_grad():
        expected = model(x).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, expected, atol=1e-5, rtol=1e-5)


def test_feature_map_is_nchw_for_nhwc_and_token_backbones(tiny_model):
    for backbone, channels in (("test_mambaout", 64), ("test_vit", 64)):
        model = tiny_model(backbone=backbone).eval()
        features = model.forward_features(torch.randn(1, *model.config.input_size))
        assert features.shape[:2] == (1, channels) and features.shape[2] == features.shape[3] > 1


def test_unused_backbone_modules_are_removed(tiny_model):
    model = tiny_model(backbone="test_convnext")
    assert isinstance(model.backbone.head, torch.nn.Identity)  # the head norm is never used by forward_features
    assert all(p.requires_grad for p in model.parameters())


def test_earlier_feature_stage_gives_a_larger_map_and_drops_later_stages(tiny_model):
    last = tiny_model(backbone="test_convnext", input_size=[3, 64, 64])
    early = tiny_model(backbone="test_convnext", input_size=[3, 64, 64], feature_stage=1)
    x = torch.randn(2, 3, 64, 64)
    assert last.forward_features(x).shape[-1] == 2 and early.forward_features(x).shape[-1] == 8
    assert sum(p.numel() for p in early.backbone.parameters()) < sum(p.numel() for p in last.backbone.parameters())
    early(x, labels=torch.tensor([0, 1])).loss.backward()
    assert all(p.grad is not None for p in early.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="`feature_stage`=7 is out of range for this backbone, which has 4 stages"):
        tiny_model(backbone="test_convnext", feature_stage=7)


@pytest.mark.parametrize("backbone", TEST_BACKBONES)
def test_leading_stages_are_exactly_what_each_stage_map_depends_on(tiny_model, backbone):
    model = tiny_model(backbone=backbone)
    net = model.backbone
    params = dict(net.named_parameters())
    # One forward pass for all stage maps, one backward pass per map.
    num_stages = len(net.feature_info)
    maps = net.forward_intermediates(
        torch.randn(2, *model.config.input_size), indices=list(range(num_stages)), intermediates_only=True
    )
    assert len(maps) == num_stages
    for stages in range(1, num_stages + 1):
        net.zero_grad(set_to_none=True)
        maps[stages - 1].sum().backward(retain_graph=stages < num_stages)
        used = [name for name, param in params.items() if param.grad is not None]
        assert leading_stage_parameters(net, stages) == used, f"{backbone}: stages 0..{stages - 1}"
    assert leading_stage_parameters(net, 0) == []
    with pytest.raises(ValueError, match=f"an int in 0..{len(net.feature_info)} for this backbone, got 99"):
        leading_stage_parameters(net, 99)


def test_leading_stages_of_a_cut_backbone_stop_at_its_feature_stage(tiny_model):
    model = tiny_model(backbone="test_convnext", feature_stage=1)
    assert leading_stage_parameters(model.backbone, 2) == [name for name, _ in model.backbone.named_parameters()]
    with pytest.raises(ValueError, match="has only the stages up to that one"):
        leading_stage_parameters(model.backbone, 3)


def test_model_builds_under_no_grad(tiny_model):
    with torch.no_grad():
        model = tiny_model(backbone="test_convnext")
    assert isinstance(model.backbone.head, torch.nn.Identity)
    # Built under no_grad, the weights are still trainable leaves: a training step reaches every one of them.
    assert all(p.requires_grad and p.is_leaf for p in model.parameters())
    model.train()(torch.randn(2, 3, 160, 160), labels=torch.tensor([0, 1])).loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_post_init_keeps_timm_initialisation(tiny_model):
    torch.manual_seed(0)
    native = timm.create_model("test_resnet", num_classes=0)
    model = tiny_model()
    # transformers' default init would give every conv std 0.02; timm's own gives a fan-based std.
    stds = [m.weight.std().item() for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    native_stds = [m.weight.std().item() for m in native.modules() if isinstance(m, torch.nn.Conv2d)]
    assert stds == pytest.approx(native_stds, rel=0.3)
    assert not any(abs(s - 0.02) < 1e-3 for s in stds)


def test_pretrained_backbone_weights_from_a_local_file_survive_construction(tiny_config, tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("test_resnet", num_classes=0)
    weights = tmp_path / "weights.pth"
    torch.save(source.state_dict(), weights)
    config = tiny_config(backbone_pretrained=True, backbone_kwargs={"pretrained_cfg_overlay": {"file": str(weights)}})
    model = ProtoPoolForImageClassification(config)
    for name, tensor in source.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[name], tensor, msg=name)
    model.save_pretrained(tmp_path / "saved")
    weights.unlink()  # from_pretrained must not look for (or download) the pretrained weights again
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(reloaded.backbone.conv1[0].weight, source.conv1[0].weight)


def test_non_persistent_timm_buffers_are_restored(tiny_model, tmp_path):
    model = tiny_model(backbone="test_vit_relpos").eval()
    model.save_pretrained(tmp_path)
    reloaded = ProtoPoolForImageClassification.from_pretrained(tmp_path).eval()
    for (name, buffer), (_, expected) in zip(
        reloaded.backbone.named_buffers(), model.backbone.named_buffers(), strict=True
    ):
        assert torch.equal(buffer, expected), name


def test_activation_checkpointing_recomputes_the_stages_and_gives_the_same_gradients(tiny_model):
    x, labels = torch.randn(2, 3, 160, 160), torch.tensor([0, 1])
    runs = {}
    for checkpointing in (False, True):
        model = tiny_model(backbone="test_convnext").train()
        if checkpointing:
            model.activation_checkpointing_enable()  # the stock transformers 5 switch
            assert model.is_activation_checkpointing
            assert all(stage.grad_checkpointing for stage in model.backbone.stages)
        calls = []
        conv = next(m for m in model.backbone.stages[1].blocks.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        torch.manual_seed(1)  # the same Gumbel noise in both runs
        loss = model(x, labels=labels).loss
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        runs[checkpointing] = loss.detach(), grads, len(calls)
    (loss, grads, calls), (loss_ckpt, grads_ckpt, calls_ckpt) = runs[False], runs[True]
    # Checkpointing runs the blocks' layers again during backward, and changes nothing else.
    assert calls == 1 and calls_ckpt == 2
    model.activation_checkpointing_disable()
    assert not model.is_activation_checkpointing and not any(s.grad_checkpointing for s in model.backbone.stages)
    assert grads.keys() == grads_ckpt.keys() and "head.prototypes" in grads and len(grads) > 10
    # Same batch, same kernels, the forward recomputed: equal to float32 rounding.
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-4, atol=1e-6, msg=name)
