"""The timm backbone: creation, pruning of unused modules, and one NCHW feature map whatever the model emits.

Every timm model can be a ProtoPool backbone. Its feature map comes from `forward_features` (the last map: after
EfficientNet's `conv_head`, after a ViT's final norm) or, with `feature_stage=k`, from `forward_intermediates` at
stage `k`. Outputs are brought to NCHW:

- NCHW CNNs are used as they are;
- NHWC models (`model.output_fmt == "NHWC"`: MambaOut, Swin) are permuted;
- token models (ViT, DeiT, EVA) drop their prefix tokens (class, register, distillation) and are reshaped to the patch
  grid.

Modules that the forward never uses (a ConvNeXt's head norm, a ViT's `fc_norm`, MambaOut's pre-logits) are replaced
by `nn.Identity`, so every trainable parameter gets a gradient and DDP needs no `find_unused_parameters`. Which
modules are unused is found by a forward and backward pass on the meta device, which costs no compute.
"""

import pickle
import re
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn


__all__ = [
    "backbone_feature_map",
    "create_backbone",
    "feature_channels",
    "leading_stage_parameters",
    "set_backbone_data_config",
    "timm_pretrained_cfg",
]


def create_backbone(
    name: str,
    *,
    pretrained: bool = False,
    feature_stage: int | None = None,
    input_size: tuple[int, int, int] | None = None,
    require_spatial_map: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Create a timm model as a feature extractor, with the modules its features never use removed.

    Args:
        name: a timm model name, optionally with a pretrained tag (`"resnet50.tv_in1k"`).
        pretrained: load timm's pretrained weights (a local file through
            `pretrained_cfg_overlay={"file": path}` in `kwargs` works offline).
        feature_stage: `None` for `forward_features`; an int for that stage of `forward_intermediates`.
        input_size: `(3, H, W)` used to probe which modules the forward uses; defaults to timm's input size.
        require_spatial_map: refuse a 1×1 feature map at `input_size` (ProtoPool compares prototypes with every
            position of the map: with one position the min distance is the mean and nothing can be learned).
        **kwargs: passed to `timm.create_model`.

    Returns:
        The timm model, without classifier and pooling (`num_classes=0, global_pool=""`).

    Raises:
        ValueError: a keyword timm's model does not take, an unreadable weights file, or (with
            `require_spatial_map`) a 1×1 feature map.
    """
    import timm

    weights_file = (kwargs.get("pretrained_cfg_overlay") or {}).get("file") if pretrained else None
    if weights_file is not None:
        _check_weights_file(weights_file, name)
    kwargs = {"num_classes": 0, "global_pool": "", **kwargs}
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as error:
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(error))
        if unexpected is None:
            raise
        raise ValueError(
            f"`backbone_kwargs` key {unexpected.group(1)!r} is not an argument of timm's {name!r} "
            f"({str(error).splitlines()[0]}): remove it, or use a keyword of timm.create_model or of the model class."
        ) from None
    except (pickle.UnpicklingError, EOFError, KeyError, RuntimeError) as error:
        unreadable = isinstance(error, RuntimeError) and (
            "weights_only" in str(error) or isinstance(error.__cause__, pickle.UnpicklingError)
        )
        if weights_file is None or (isinstance(error, RuntimeError) and not unreadable):
            raise
        # timm's own message advises weights_only=False, which would run code from the file: never repeat it.
        raise ValueError(
            f"Cannot read the pretrained weights file {str(weights_file)!r} for backbone {name!r}: it is damaged or "
            "holds pickled objects other than tensors, which are refused because loading them can run code. Pass a "
            ".safetensors file, or a .pth/.bin file holding only the backbone's state dict "
            "(torch.save(model.state_dict(), path))."
        ) from None
    if feature_stage is not None:
        _prune_after_stage(model, feature_stage)
    probe_kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg_overlay", "checkpoint_path")}
    # The probe needs autograd even when the model is built under `no_grad` or `inference_mode`.
    with torch.inference_mode(False), torch.enable_grad(), torch.device("meta"):
        probe = timm.create_model(name, pretrained=False, **probe_kwargs)
        if feature_stage is not None:
            _prune_after_stage(probe, feature_stage)
    size = input_size or tuple(probe.pretrained_cfg.get("input_size", (3, 224, 224)))
    with torch.inference_mode(False), torch.enable_grad():
        unused, called, map_size = _probe_usage(probe, feature_stage, size)
    if require_spatial_map and map_size == (1, 1):
        raise ValueError(_one_position_message(probe, name, feature_stage, size))
    _remove_unused_modules(model, unused, called)
    return model


def feature_channels(model: nn.Module, feature_stage: int | None = None) -> int:
    """The channel count of the feature map, from timm's metadata (`num_features` or `feature_info`)."""
    if feature_stage is None:
        return int(model.num_features)
    return int(model.feature_info[_stage_index(model, feature_stage)]["num_chs"])


def leading_stage_parameters(model: nn.Module, num_stages: int) -> list[str]:
    """Names of the parameters of the stem and the first `num_stages` stages (timm's `feature_info`).

    Stage k is `feature_info[k]`, as in `feature_stage`; the parameters registered before stage 0's module (a CNN's
    stem, a ViT's patch and position embeddings) belong to stage 0. Used to freeze the early, generic layers.

    Args:
        model: a model from `create_backbone`.
        num_stages: how many stages, from the first; 0 gives no names.

    Returns:
        Parameter names of `model`, in registration order.

    Example:
        ```python
        >>> from protopool_hf.backbone import create_backbone, leading_stage_parameters
        >>> backbone = create_backbone("test_resnet")
        >>> names = leading_stage_parameters(backbone, 1)  # the stem: stage 0 of a ResNet is its stem's activation
        >>> names[0], names[-1], len(names)
        ('conv1.0.weight', 'bn1.bias', 9)

        ```
    """
    stages = len(model.feature_info)
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or not 0 <= num_stages <= stages:
        raise ValueError(
            f"The number of leading stages must be an int in 0..{stages} for this backbone, got {num_stages!r}."
        )
    if num_stages == 0:
        return []
    last = model.feature_info[num_stages - 1]["module"]
    names: list[str] = []
    seen_last = False
    for module_name, module in model.named_modules():  # pre-order: the registration (and forward) order of timm models
        inside_last = module_name == last or module_name.startswith(last + ".")
        if seen_last and not inside_last:
            break
        seen_last = seen_last or inside_last
        prefix = f"{module_name}." if module_name else ""
        names.extend(prefix + name for name, _ in module.named_parameters(recurse=False))
    if not seen_last:
        raise ValueError(
            f"{type(model).__name__} has no module {last!r} (its feature_info[{num_stages - 1}]): a backbone cut at "
            "`feature_stage` has only the stages up to that one."
        )
    return names


def set_backbone_data_config(model: nn.Module, data_config: dict[str, Any]) -> dict[str, Any]:
    """Put a model's preprocessing into a timm backbone's `pretrained_cfg` (and `default_cfg`), for timm's helpers.

    `timm.data.resolve_model_data_config(backbone)` then returns `data_config`'s input size, mean, std,
    interpolation, crop_pct and crop_mode; the backbone's test-time size and crop are dropped.

    Args:
        model: a model from `create_backbone`.
        data_config: the model's timm data config (`ProtoPoolConfig.data_config()`).

    Returns:
        A copy of the new `pretrained_cfg`.
    """
    cfg = {
        **(getattr(model, "pretrained_cfg", None) or {}),
        **data_config,
        "input_size": tuple(data_config["input_size"]),
        "test_input_size": None,
        "test_crop_pct": None,
    }
    model.pretrained_cfg = cfg
    model.default_cfg = cfg
    return dict(cfg)


def timm_pretrained_cfg(backbone: nn.Module, data_config: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """The timm pretrained config of a ProtoPool model: its backbone's, with the model's preprocessing.

    `timm.data.resolve_data_config(model=model)` and `timm.data.resolve_model_data_config(model)` read it, so they
    return the model's input size, mean, std, interpolation, crop_pct and crop_mode (not timm's ImageNet defaults).
    It also brings `backbone.pretrained_cfg` in step with `data_config` (see `set_backbone_data_config`): the
    backbone's test-time size and crop are dropped, the model's preprocessing is the only one.

    Args:
        backbone: the model's backbone, from `create_backbone`.
        data_config: the model's timm data config (`ProtoPoolConfig.data_config()`).
        num_classes: C, the model's classes.

    Returns:
        The config, with the model's classifier (`head.last_layer`) and the backbone's first convolution.
    """
    backbone_cfg = set_backbone_data_config(backbone, data_config)
    return {
        **backbone_cfg,
        "num_classes": num_classes,
        "classifier": "head.last_layer",
        "first_conv": f"backbone.{first_conv}" if (first_conv := backbone_cfg.get("first_conv")) else None,
    }


def backbone_feature_map(
    model: nn.Module, pixel_values: torch.Tensor, feature_stage: int | None = None
) -> torch.Tensor:
    """Run the backbone and return its feature map as NCHW.

    Args:
        model: a model from `create_backbone`.
        pixel_values: `(N, 3, H_in, W_in)` images.
        feature_stage: as given to `create_backbone`.

    Returns:
        `(N, C_feat, H, W)` feature map.
    """
    if feature_stage is not None:
        index = _stage_index(model, feature_stage)
        return model.forward_intermediates(pixel_values, indices=[index], intermediates_only=True, output_fmt="NCHW")[
            -1
        ]
    features = model.forward_features(pixel_values)
    if features.ndim == 3:  # (N, L, C) tokens
        return _tokens_to_map(model, features, pixel_values.shape[-2:])
    if getattr(model, "output_fmt", "NCHW") == "NHWC":
        return features.permute(0, 3, 1, 2)
    return features


# ---------------------------------------------------------------------------- helpers
def _stage_index(model: nn.Module, feature_stage: int) -> int:
    count = len(model.feature_info)
    index = feature_stage if feature_stage >= 0 else count + feature_stage
    if not 0 <= index < count:
        raise ValueError(
            f"`feature_stage`={feature_stage} is out of range for this backbone, which has {count} stages "
            f"(use 0..{count - 1}, or a negative index from the end)."
        )
    return index


def _prune_after_stage(model: nn.Module, feature_stage: int) -> None:
    if not hasattr(model, "forward_intermediates"):
        raise ValueError(
            f"`feature_stage` needs a timm backbone with `forward_intermediates`; {type(model).__name__} has none. "
            "Leave `feature_stage=None` to use the last feature map."
        )
    index = _stage_index(model, feature_stage)
    model.prune_intermediate_layers([index], prune_norm=True, prune_head=True)


def _tokens_to_map(model: nn.Module, tokens: torch.Tensor, image_hw: torch.Size) -> torch.Tensor:
    tokens = tokens[:, getattr(model, "num_prefix_tokens", 0) :]
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is not None:
        height = image_hw[0] // patch[0]
    else:
        height = round(tokens.shape[1] ** 0.5)
    if height == 0 or tokens.shape[1] % height:
        raise ValueError(
            f"Cannot reshape {tokens.shape[1]} tokens of {type(model).__name__} to a grid for an input of "
            f"{tuple(image_hw)}: use an input size that is a multiple of the patch size."
        )
    return tokens.unflatten(1, (height, tokens.shape[1] // height)).permute(0, 3, 1, 2)


def _probe_usage(
    probe: nn.Module, feature_stage: int | None, size: tuple[int, ...]
) -> tuple[set[str], set[str], tuple[int, int]]:
    """Names of the parameters that get no gradient and of the modules the forward calls, and the map's (H, W).

    Runs on the meta device.
    """
    params = dict(probe.named_parameters())
    called: set[str] = set()
    hooks = [
        module.register_forward_pre_hook(lambda *_, name=name: called.add(name))
        for name, module in probe.named_modules()
    ]
    try:
        # Two images: BatchNorm refuses one value per channel on a 1×1 map.
        features = backbone_feature_map(probe, torch.empty(2, *size, device="meta"), feature_stage)
    finally:
        for hook in hooks:
            hook.remove()
    map_size = (int(features.shape[-2]), int(features.shape[-1]))
    if not params:
        return set(), called, map_size
    grads = torch.autograd.grad(features.sum(), list(params.values()), allow_unused=True)
    return {name for name, grad in zip(params, grads, strict=True) if grad is None}, called, map_size


def _one_position_message(probe: nn.Module, name: str, feature_stage: int | None, size: tuple[int, ...]) -> str:
    """The error for a 1×1 feature map, suggesting the latest stage whose map has more than one position."""
    height, width = size[-2:]
    stages = [
        index
        for index, info in enumerate(getattr(probe, "feature_info", None) or [])
        if isinstance(info, dict) and (height // info.get("reduction", 1)) * (width // info.get("reduction", 1)) > 1
    ]
    stage = f"feature_stage={feature_stage}" if feature_stage is not None else "its last feature map"
    hint = f"an earlier `feature_stage` (e.g. {stages[-1]}) or " if stages else ""
    return (
        f"Backbone {name!r} makes a 1×1 feature map from {height}×{width} images ({stage}): every prototype's min "
        "distance then equals its mean distance, the similarities are 0 and the model cannot learn. Use "
        f"{hint}a larger image size (`input_size`)."
    )


_SAFETENSORS_HEADER = struct.Struct("<Q")


def _check_weights_file(path: str | Path, name: str) -> None:
    """Refuse a pretrained weights file that is missing or in no checkpoint format, before timm reads it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"The pretrained weights file {str(path)!r} for backbone {name!r} does not exist: pass the path of a "
            ".safetensors or .pth file of the backbone's weights."
        )
    with open(path, "rb") as handle:
        head = handle.read(9)
    is_zip = head.startswith(b"PK\x03\x04")  # torch.save's format (and numpy's .npz)
    is_pickle = head[:1] == b"\x80"  # torch.save's legacy format
    is_safetensors = len(head) == 9 and head[8:9] == b"{" and _SAFETENSORS_HEADER.unpack(head[:8])[0] > 1
    if not (is_zip or is_pickle or is_safetensors):
        raise ValueError(
            f"The pretrained weights file {str(path)!r} for backbone {name!r} is neither a PyTorch checkpoint nor a "
            f"safetensors file (it starts with {head!r}): pass a .safetensors file, or a .pth/.bin file written by "
            "torch.save(model.state_dict(), path)."
        )


def _remove_unused_modules(model: nn.Module, unused: set[str], called: set[str]) -> None:
    """Replace the largest never-called modules whose parameters are all unused by `nn.Identity`; freeze the rest."""
    if not unused:
        return
    replaced: list[str] = []
    for module_name, module in model.named_modules():
        if not module_name or any(module_name.startswith(prefix + ".") for prefix in replaced):
            continue
        names = [f"{module_name}.{n}" for n, _ in module.named_parameters()]
        if names and module_name not in called and all(n in unused for n in names):
            parent_name, _, child = module_name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, nn.Identity())
            replaced.append(module_name)
    for name, param in model.named_parameters():
        if name in unused:
            param.requires_grad_(False)
