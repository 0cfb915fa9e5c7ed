"""Convert checkpoints of the official ProtoPool code (github.com/gmum/ProtoPool) and its iNaturalist backbone.

Shape alphabet: C classes, P prototypes, S slots per class, D prototype dim.

The official `main.py` saves `{"model_state_dict": model.state_dict(), "epoch": e}`. Its keys map to ours as

| official key | shape | ours |
|---|---|---|
| `features.<name>` | | `backbone.<name>` (timm ResNet / DenseNet / VGG names are the same) |
| `add_on_layers.0.weight`, `.bias` | (D, C_in, 1, 1), (D,) | `head.add_on.0.weight`, `.bias` |
| `prototype_vectors` | (P, D, 1, 1) | `head.prototypes` (P, D) |
| `proto_presence` | (C, P, S) | `head.slot_logits` |
| `last_layer.weight` | (C, C·S) | `head.last_layer.weight` |
| `ones` | (P, D, 1, 1) | dropped (a constant summation kernel) |
| `alfa` | (1, C, S) | dropped (never used by the official forward) |

Files are only ever read with `torch.load(..., weights_only=True)`: a checkpoint that needs arbitrary pickled
objects is refused, never executed.
"""

from __future__ import annotations

import copy
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .configuration_protopool import ProtoPoolConfig
from .modeling_protopool import ProtoPoolForImageClassification


__all__ = [
    "convert_original_checkpoint",
    "load_inaturalist_backbone",
    "load_original_state_dict",
    "original_checkpoint_sizes",
    "save_inaturalist_backbone",
    "to_original_state_dict",
]

#: The assignment scale the official code uses after training (`gumbel_scale=10e3` in fine-tuning and push).
OFFICIAL_FINAL_GUMBEL_SCALE = 1e4

_HEAD_KEYS = {
    "add_on_layers.0.weight": "head.add_on.0.weight",
    "add_on_layers.0.bias": "head.add_on.0.bias",
    "prototype_vectors": "head.prototypes",
    "proto_presence": "head.slot_logits",
    "last_layer.weight": "head.last_layer.weight",
}
_DROPPED_KEYS = ("ones", "alfa")
_CONFIG_FIELD = {
    "head.add_on.0.weight": "prototype_dim (D) or backbone (C_in, its feature channels)",
    "head.add_on.0.bias": "prototype_dim",
    "head.prototypes": "num_prototypes / prototype_dim",
    "head.slot_logits": "num_labels / num_prototypes / num_slots_per_class",
    "head.last_layer.weight": "num_labels / num_slots_per_class",
}


# ---------------------------------------------------------------------------------------------------- loading
def _safe_torch_load(path: str | os.PathLike) -> Any:
    """`torch.load` restricted to tensors and plain containers; pickled code is refused with a clear error."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {str(path)!r} does not exist or is not a file.")
    with open(path, "rb") as handle:
        head = handle.read(8)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save's zip or legacy pickle format
        raise ValueError(
            f"Checkpoint {str(path)!r} is not a PyTorch checkpoint (it starts with {head!r}, not torch.save's "
            "format): pass the .pth file the official main.py saved."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"Refused to load {str(path)!r}: it contains pickled objects other than tensors and plain containers, "
            "so loading it would run code from the file (torch.load(..., weights_only=True) rejected it: "
            f"{str(error).splitlines()[0]}). If you trust its origin, re-save only the state dict in a trusted "
            "environment: torch.save({'model_state_dict': state_dict}, path)."
        ) from error
    except (RuntimeError, KeyError, EOFError) as error:  # a damaged or truncated file
        raise ValueError(
            f"Could not read {str(path)!r} as a PyTorch checkpoint ({type(error).__name__}: {error}): it is damaged "
            "or truncated; pass the .pth file the official main.py saved."
        ) from error


def _unwrap_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """Take the state dict out of a checkpoint object and strip a DataParallel `module.` prefix."""
    if isinstance(obj, Mapping):
        for wrapper in ("model_state_dict", "state_dict"):
            if wrapper in obj and isinstance(obj[wrapper], Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(
            f"{source} is not a state dict: expected {{'model_state_dict': {{name: tensor}}}} or {{name: tensor}}, "
            f"got {type(obj).__name__}."
        )
    not_tensors = sorted(str(key) for key, value in obj.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise ValueError(
            f"{source}: these entries are not tensors: {not_tensors[:10]}. Expected a state dict, optionally "
            "wrapped as {'model_state_dict': ...} the way the official main.py saves it."
        )
    state = {str(key): value for key, value in obj.items()}
    if all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return state


def load_original_state_dict(path_or_state_dict: str | os.PathLike | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Read an official ProtoPool checkpoint (or take a state dict) and return its bare state dict.

    Accepts `{"model_state_dict": ...}` (what the official `main.py` writes), `{"state_dict": ...}` or a bare state
    dict, with or without a DataParallel `module.` prefix.

    Args:
        path_or_state_dict: a `.pth` file, or an already loaded checkpoint / state dict.

    Returns:
        `{official key: tensor}`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file holds pickled code (refused, never run) or is not a state dict.
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        return _unwrap_state_dict(_safe_torch_load(path_or_state_dict), f"Checkpoint {str(path_or_state_dict)!r}")
    return _unwrap_state_dict(path_or_state_dict, "The given state dict")


def original_checkpoint_sizes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Read C, P, S, D and the backbone's channel count off an official-layout state dict.

    Args:
        state_dict: official keys (`proto_presence`, `prototype_vectors`, `add_on_layers.0.weight`, ...).

    Returns:
        `{"num_labels": C, "num_prototypes": P, "num_slots_per_class": S, "prototype_dim": D,
        "backbone_channels": C_in}`.

    Raises:
        ValueError: a head tensor is missing, or the head tensors disagree with each other.
    """
    missing = [key for key in _HEAD_KEYS if key not in state_dict]
    if not any(key.startswith("features.") for key in state_dict):
        missing.append("features.* (the backbone)")
    if missing:
        hint = (
            " `last_layer.weight` exists only when the official code ran with --last_layer (both README commands "
            "use it; without it the official training crashes)."
            if "last_layer.weight" in missing
            else ""
        )
        raise ValueError(f"Not an official ProtoPool state dict: missing keys {missing}.{hint}")
    prototypes = state_dict["prototype_vectors"]
    presence = state_dict["proto_presence"]
    add_on = state_dict["add_on_layers.0.weight"]
    if prototypes.ndim != 4 or tuple(prototypes.shape[2:]) != (1, 1):
        raise ValueError(f"`prototype_vectors` must have shape (P, D, 1, 1), got {tuple(prototypes.shape)}.")
    if presence.ndim != 3:
        raise ValueError(f"`proto_presence` must have shape (C, P, S), got {tuple(presence.shape)}.")
    num_prototypes, prototype_dim = prototypes.shape[:2]
    num_classes, pool, num_slots = presence.shape
    expected = {
        "proto_presence": (num_classes, num_prototypes, num_slots),
        "add_on_layers.0.weight": (prototype_dim, add_on.shape[1] if add_on.ndim == 4 else -1, 1, 1),
        "add_on_layers.0.bias": (prototype_dim,),
        "last_layer.weight": (num_classes, num_classes * num_slots),
    }
    # The two tensors the conversion drops are checked when present.
    if "ones" in state_dict:
        expected["ones"] = (num_prototypes, prototype_dim, 1, 1)
    if "alfa" in state_dict:
        expected["alfa"] = (1, num_classes, num_slots)
    for key, shape in expected.items():
        if tuple(state_dict[key].shape) != shape:
            raise ValueError(
                f"Inconsistent official checkpoint: `{key}` has shape {tuple(state_dict[key].shape)}, but "
                f"`prototype_vectors` {tuple(prototypes.shape)} and `proto_presence` {tuple(presence.shape)} "
                f"imply {shape}."
            )
    return {
        "num_labels": int(num_classes),
        "num_prototypes": int(pool),
        "num_slots_per_class": int(num_slots),
        "prototype_dim": int(prototype_dim),
        "backbone_channels": int(add_on.shape[1]),
    }


# ---------------------------------------------------------------------------------------------------- conversion
def _check_config(sizes: dict[str, int], config: ProtoPoolConfig) -> None:
    fields = {
        "num_labels": ("proto_presence", "C"),
        "num_prototypes": ("prototype_vectors", "P"),
        "num_slots_per_class": ("proto_presence", "S"),
        "prototype_dim": ("prototype_vectors", "D"),
    }
    wrong = [
        f"config.{field}={getattr(config, field)} but the checkpoint's `{tensor}` has {letter}={sizes[field]}"
        for field, (tensor, letter) in fields.items()
        if getattr(config, field) != sizes[field]
    ]
    if wrong:
        fix = ", ".join(f"{field}={sizes[field]}" for field in fields)
        raise ValueError(f"The config does not match the checkpoint: {'; '.join(wrong)}. Build the config with {fix}.")


def _official_to_ours(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if "ones" in state_dict and not torch.all(state_dict["ones"] == 1):
        raise ValueError(
            "The checkpoint's `ones` tensor is not all ones: the official distances use it as a summation kernel, "
            "so this checkpoint's outputs cannot be reproduced. Was it edited?"
        )
    unexpected = sorted(
        key
        for key in state_dict
        if not key.startswith("features.") and key not in _HEAD_KEYS and key not in _DROPPED_KEYS
    )
    if unexpected:
        raise ValueError(
            f"Unexpected keys in the official checkpoint: {unexpected}. Only `features.*`, {sorted(_HEAD_KEYS)} "
            f"and {list(_DROPPED_KEYS)} are known."
        )
    ours = {
        "backbone." + key.removeprefix("features."): value
        for key, value in state_dict.items()
        if key.startswith("features.")
    }
    for official, key in _HEAD_KEYS.items():
        ours[key] = state_dict[official]
    ours["head.prototypes"] = ours["head.prototypes"].flatten(1)
    return ours


def convert_original_checkpoint(
    path_or_state_dict: str | os.PathLike | Mapping[str, Any],
    config: ProtoPoolConfig,
    gumbel_scale: float = OFFICIAL_FINAL_GUMBEL_SCALE,
) -> ProtoPoolForImageClassification:
    """Turn a checkpoint of the official ProtoPool code into a [`ProtoPoolForImageClassification`].

    With the same weights, the converted model in eval mode at `set_gumbel_scale(1.0)` gives the official
    `forward(x, gumbel_scale=0)` logits, min distances and loss terms; it is returned in eval mode at
    s = `gumbel_scale` (1e4, the official post-training value). The head's projection provenance is left empty
    (the official code does not save it).

    Args:
        path_or_state_dict: the official `best_model.pth` / `best_model_push.pth`, or its loaded contents
            (`{"model_state_dict": ...}` or a bare state dict, optionally with a `module.` prefix).
        config: the architecture to build. `backbone` must be the timm name of the official `--arch`
            (`resnet18/34/50/101/152`, `densenet121/161/169/201`, `vgg*`); `num_labels`, `num_prototypes`,
            `num_slots_per_class` and `prototype_dim` must match the checkpoint ([`original_checkpoint_sizes`]
            reads them). It is copied; `backbone_pretrained` is switched off in the copy, since the checkpoint holds
            the backbone weights.
        gumbel_scale: the assignment scale s the converted model starts at.

    Returns:
        The converted model, in eval mode.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: pickled code in the file (refused), missing or unexpected keys, or a shape that does not match
            the config (the message names the tensor, both shapes and the config field to change).

    Example:
        ```python
        >>> import torch
        >>> from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification
        >>> from protopool_hf.convert import convert_original_checkpoint, to_original_state_dict
        >>> config = ProtoPoolConfig(backbone="test_resnet", num_labels=3, num_prototypes=6, num_slots_per_class=2)
        >>> official = {"model_state_dict": to_original_state_dict(ProtoPoolForImageClassification(config))}
        >>> model = convert_original_checkpoint(official, config)
        >>> model.gumbel_scale, model.training
        (10000.0, False)

        ```
    """
    state_dict = load_original_state_dict(path_or_state_dict)
    sizes = original_checkpoint_sizes(state_dict)
    _check_config(sizes, config)
    ours = _official_to_ours(state_dict)

    config = copy.deepcopy(config)
    config.backbone_pretrained = False
    model = ProtoPoolForImageClassification(config)
    target = model.state_dict()

    backbone_target = {key for key in target if key.startswith("backbone.")}
    backbone_source = {key for key in ours if key.startswith("backbone.")}
    missing = sorted(backbone_target - backbone_source)
    unexpected = sorted(backbone_source - backbone_target)
    if missing or unexpected:
        raise ValueError(
            f"The checkpoint's backbone (`features.*`) does not fit config.backbone={config.backbone!r}: "
            f"{len(missing)} keys missing from the checkpoint {[key.removeprefix('backbone.') for key in missing[:8]]}, "
            f"{len(unexpected)} unexpected {[key.removeprefix('backbone.') for key in unexpected[:8]]}. "
            "Set config.backbone to the timm name of the official --arch (e.g. 'resnet50' for --arch resnet50 or "
            "--inat)."
        )
    for key, value in ours.items():
        expected = tuple(target[key].shape)
        if tuple(value.shape) != expected:
            official = next(
                (o for o, t in _HEAD_KEYS.items() if t == key), "features." + key.removeprefix("backbone.")
            )
            field = _CONFIG_FIELD.get(key, "backbone (the timm architecture must match the official --arch)")
            raise ValueError(
                f"Shape mismatch for `{official}` -> `{key}`: the checkpoint has {tuple(value.shape)}, the model "
                f"built from the config expects {expected}. Change config.{field}."
            )
    full = dict(target)
    for key, value in ours.items():
        full[key] = value.to(dtype=target[key].dtype)
    model.load_state_dict(full, strict=True)
    model.set_gumbel_scale(gumbel_scale)
    return model.eval()


def to_original_state_dict(model: ProtoPoolForImageClassification, use_thresh: bool = True) -> dict[str, torch.Tensor]:
    """Export a model's weights in the official `PrototypeChooser` layout (the reverse of the conversion).

    The official model has no counterpart for our Gumbel scale, hard-assignment flag or projection provenance;
    they are left out. Save the result as `torch.save({"model_state_dict": sd, "epoch": 0}, path)` to get a file
    the official `main.py --checkpoint` reads.

    Args:
        model: the model to export.
        use_thresh: add the official `alfa` (1, C, S) tensor (present when the official code ran with
            `--use_thresh`, as both README commands do). It is never used by the official forward; zeros.

    Returns:
        `{official key: tensor}`: `features.*`, `add_on_layers.0.*`, `prototype_vectors` (P, D, 1, 1), `ones`,
        `proto_presence` (C, P, S), `last_layer.weight` (C, C·S), and `alfa` when `use_thresh`.
    """
    ours = {key: value.detach().clone() for key, value in model.state_dict().items()}
    head = model.head
    official: dict[str, torch.Tensor] = {}
    if use_thresh:
        num_classes, _, num_slots = head.slot_logits.shape
        official["alfa"] = torch.zeros(1, num_classes, num_slots, dtype=head.slot_logits.dtype)
    official["proto_presence"] = ours["head.slot_logits"]
    official["prototype_vectors"] = ours["head.prototypes"][:, :, None, None].contiguous()
    official["ones"] = torch.ones_like(official["prototype_vectors"])
    for key, value in ours.items():
        if key.startswith("backbone."):
            official["features." + key.removeprefix("backbone.")] = value
    official["add_on_layers.0.weight"] = ours["head.add_on.0.weight"]
    official["add_on_layers.0.bias"] = ours["head.add_on.0.bias"]
    official["last_layer.weight"] = ours["head.last_layer.weight"]
    return official


# ---------------------------------------------------------------------------------------------------- iNaturalist
def load_inaturalist_backbone(path_or_state_dict: str | os.PathLike | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Remap the BBN iNaturalist-2017 ResNet-50 that the official code loads for CUB (`--inat`) to timm names.

    The file is `BBN.iNaturalist2017.res50.180epoch.best_model.pth` (distributed with ProtoTree). Its layer4 has
    two blocks plus BBN's two branch blocks; the official code keeps the conventional branch as the third block:
    `module.backbone.cb_block.*` -> `layer4.2.*`, drops `module.backbone.rb_block.*` and `module.classifier.*`, and
    strips `module.backbone.` from the rest. The result is checked against timm's `resnet50` (without `fc`).

    Args:
        path_or_state_dict: the BBN checkpoint file, or its loaded state dict.

    Returns:
        A timm `resnet50` state dict without `fc.*`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: pickled code in the file (refused), or keys/shapes that do not make a timm ResNet-50.
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        source = f"iNaturalist checkpoint {str(path_or_state_dict)!r}"
        obj = _safe_torch_load(path_or_state_dict)
    else:
        source, obj = "The given iNaturalist state dict", path_or_state_dict
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(value, torch.Tensor) for value in obj.values()):
        raise ValueError(f"{source} is not a state dict of tensors.")

    remapped: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in obj.items():
        if key.startswith("module.backbone.cb_block."):
            remapped["layer4.2." + key.removeprefix("module.backbone.cb_block.")] = value
        elif key.startswith(("module.backbone.rb_block.", "module.classifier.")):
            continue
        elif key.startswith("module.backbone."):
            remapped[key.removeprefix("module.backbone.")] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"{source}: keys outside module.backbone.* / module.classifier.*: {sorted(unknown)[:10]}. "
            "Expected the BBN iNaturalist-2017 ResNet-50 checkpoint."
        )

    import timm

    with torch.device("meta"):
        reference = timm.create_model("resnet50", pretrained=False, num_classes=0).state_dict()
    missing = sorted(set(reference) - set(remapped))
    unexpected = sorted(set(remapped) - set(reference))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not remap to a timm resnet50: missing {missing[:10]} ({len(missing)} in all), "
            f"unexpected {unexpected[:10]} ({len(unexpected)} in all)."
        )
    for key, value in remapped.items():
        if tuple(value.shape) != tuple(reference[key].shape):
            raise ValueError(
                f"{source}: `{key}` has shape {tuple(value.shape)}, timm resnet50 expects {tuple(reference[key].shape)}."
            )
    return {key: remapped[key].contiguous() for key in reference}


def save_inaturalist_backbone(
    path_or_state_dict: str | os.PathLike | Mapping[str, Any], output_path: str | os.PathLike
) -> Path:
    """Write the remapped iNaturalist ResNet-50 as a safetensors file that timm loads as pretrained weights.

    Use it through the config, which is how the `cub200` preset gets the official CUB backbone:
    `ProtoPoolConfig.from_preset("cub200", backbone_pretrained=True,
    backbone_kwargs={"pretrained_cfg_overlay": {"file": str(output_path)}})`.

    Args:
        path_or_state_dict: the BBN checkpoint file, or its loaded state dict.
        output_path: where to write, e.g. `resnet50_inat_bbn.safetensors`.

    Returns:
        The path written.
    """
    from safetensors.torch import save_file

    state = load_inaturalist_backbone(path_or_state_dict)
    output_path = Path(output_path).expanduser()
    output_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(output_path), metadata={"source": "BBN iNaturalist-2017 ResNet-50, remapped to timm names"})
    return output_path
