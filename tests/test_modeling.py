import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification, pipeline

from protopool_hf import ProtoPoolForImageClassification, ProtoPoolOutput
from protopool_hf.backbone import leading_stage_parameters
from protopool_hf.layers import slot_class_identity
from protopool_hf.modeling_protopool import ProtoPoolHead


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


def test_saved_folder_is_safetensors_with_code_auto_map_and_preprocessor(tiny_model, tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= files
    code = {"configuration_protopool.py", "modeling_protopool.py", "layers.py", "losses.py", "backbone.py"}
    assert code | {"gumbel.py", "loading.py", "preprocessing.py"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    config = json.loads((tmp_path / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForImageClassification"}
    assert config["input_size"] == [3, 160, 160] and config["image_mean"] == [0.5, 0.5, 0.5]
    assert isinstance(AutoModel.from_pretrained(tmp_path), ProtoPoolForImageClassification)


def test_remote_code_loads_in_a_fresh_process_without_the_package(tiny_model, tmp_path):
    model = tiny_model().eval()
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        np.save(tmp_path / "expected.npy", model(x).logits.numpy())
    np.save(tmp_path / "x.npy", x.numpy())
    model.save_pretrained(tmp_path / "model")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["protopool_hf"] = None  # the package is not importable in this process
        import numpy as np, torch
        from transformers import AutoModel, AutoModelForImageClassification
        try:
            import protopool_hf
        except ImportError:
            pass
        else:
            raise SystemExit("protopool_hf should not be importable here")
        folder = r"{tmp_path / "model"}"
        x = torch.from_numpy(np.load(r"{tmp_path / "x.npy"}"))
        expected = np.load(r"{tmp_path / "expected.npy"}")
        for auto in (AutoModelForImageClassification, AutoModel):
            model = auto.from_pretrained(folder, trust_remote_code=True).eval()
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            with torch.no_grad():
                np.testing.assert_allclose(model(x).logits.numpy(), expected, atol=1e-6)
        print("REMOTE-OK")
        """
    )
    env_home = tmp_path / "hf"
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(env_home), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        timeout=300,
    )
    assert "REMOTE-OK" in result.stdout, result.stderr[-3000:]


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
