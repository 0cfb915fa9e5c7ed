"""ONNX export of a ProtoPool model *with* its explanations: logits, slot similarities and prototype activation maps.

Shape alphabet: N batch, C classes, P prototypes, S slots per class, H, W feature-map size, H_in, W_in model input.

A prototype model's explanation is a plain forward output (no gradients), so the exported graph carries it: an
ONNX runtime without torch can say what the model predicts *and* which prototypes fired where. The graph takes
normalised `pixel_values (N, 3, H_in, W_in)` and returns

- `logits (N, C)`;
- `similarities (N, C, S)`: the focal similarity of every class slot (the last layer's input);
- `min_distances (N, P)`: each prototype's minimum squared distance over the feature map;
- `activations (N, P, H, W)`: each prototype's φ map, φ(d) = log((d + 1) / (d + ε)) of its squared distances.

The model's metadata props (`protopool.*`, all JSON strings) hold what a torch-free explainer needs: the class names,
the preprocessing (the model folder's `preprocessor_config.json`), each slot's prototype, the last-layer weights
and the projection's classes. `examples/onnx_explain.py` draws the "this looks like that" picture from them with
numpy and PIL alone.

torch's default (dynamo) exporter needs `onnxscript` (the `onnx` extra: `pip install "protopool-hf[onnx]"`).
"""

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .atomic import write_file
from .layers import log_similarity
from .preprocessing import image_processor_dict
from .provenance import read_provenance
from .torch_utils import evaluating


__all__ = ["OUTPUT_NAMES", "OnnxCheck", "check_onnx", "export_onnx", "onnx_metadata"]

INPUT_NAME = "pixel_values"
OUTPUT_NAMES = ("logits", "similarities", "min_distances", "activations")
METADATA_PREFIX = "protopool."
# Bump when the graph's outputs or the metadata keys change meaning.
FORMAT_VERSION = "1"


class _ExplainingGraph(nn.Module):
    """The exported forward: pixel values -> the four named outputs (the model's own head, nothing re-implemented)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        head = self.model.head
        out = head(self.model.forward_features(pixel_values))
        activations = log_similarity(out.distances, head.similarity_epsilon)
        return out.logits, out.similarities, out.min_distances, activations


def onnx_metadata(model: nn.Module) -> dict[str, str]:
    """The `protopool.*` metadata props of a model's ONNX file (every value a JSON string).

    Keys: `format_version`, `id2label` (C class names, in class order), `preprocessor_config` (what
    `save_pretrained` writes to `preprocessor_config.json`), `slot_prototypes` (`(C, S)` the prototype each slot
    uses: argmax over the pool), `hard_assignment`, `last_layer_weight` (`(C, C·S)` float32, little-endian, base64),
    `last_layer_shape`, `similarity_epsilon`, `prototype_labels` (`(P,)` the class of the image each prototype was
    projected on, -1 when never projected) and `config` (the model's config.json).
    """
    config = model.config
    head = model.head
    weight = head.last_layer.weight.detach().float().cpu().numpy().astype("<f4")
    props = {
        "format_version": FORMAT_VERSION,
        "id2label": [str(config.id2label[c]) for c in range(config.num_labels)],
        "preprocessor_config": image_processor_dict(config),
        "slot_prototypes": head.slot_logits.detach().argmax(dim=1).cpu().tolist(),
        "hard_assignment": bool(head.hard_assignment),
        "last_layer_weight": base64.b64encode(weight.tobytes()).decode("ascii"),
        "last_layer_shape": list(weight.shape),
        "similarity_epsilon": float(head.similarity_epsilon),
        "prototype_labels": read_provenance(model).label.tolist(),
        "config": config.to_dict(),
    }
    return {
        METADATA_PREFIX + key: value if key == "format_version" else json.dumps(value) for key, value in props.items()
    }


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    overwrite: bool = False,
) -> Path:
    """Export a ProtoPool model to ONNX with its explanations as outputs and its metadata as props.

    The model is exported in eval mode (its own mode is restored afterwards), in float32, with torch's default
    (dynamo) exporter. The file is written to a temporary name next to `path` and renamed, so no half-written file
    is left.

    Args:
        model: a `ProtoPoolForImageClassification` with float32 weights.
        path: the `.onnx` file to write.
        opset: the ONNX opset (default: the exporter's).
        dynamic_batch: a dynamic batch axis; otherwise the batch size is fixed at 1.
        overwrite: replace an existing file at `path`.

    Returns:
        The path written.

    Example:
        ```python
        >>> import tempfile
        >>> from pathlib import Path
        >>> from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification, export_onnx
        >>> from protopool_hf.export import check_onnx
        >>> config = ProtoPoolConfig(
        ...     backbone="test_resnet", num_labels=2, num_prototypes=4, num_slots_per_class=1, input_size=[3, 64, 64]
        ... )
        >>> model = ProtoPoolForImageClassification(config)
        >>> path = export_onnx(model, Path(tempfile.mkdtemp()) / "model.onnx")
        >>> check = check_onnx(model, path)  # onnxruntime against PyTorch, on two random images
        >>> check.batch_size, sorted(check.max_abs_diff), check.within(1e-4)
        (2, ['activations', 'logits', 'min_distances', 'similarities'], True)

        ```
    """
    path = Path(path)
    _check_exportable(model, path, overwrite)
    config = model.config
    _, height, width = config.input_size
    example = torch.randn(2 if dynamic_batch else 1, 3, height, width, device=next(model.parameters()).device)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    graph = _ExplainingGraph(model)
    with evaluating(graph):
        program = torch.onnx.export(
            graph,
            (example,),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            opset_version=opset,
            dynamic_shapes=dynamic_shapes,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    program.model.metadata_props.update(onnx_metadata(model))
    program.model.doc_string = (
        f"ProtoPool ({config.backbone}, {config.num_prototypes} prototypes, {config.num_labels} classes, "
        f"{config.num_slots_per_class} slots per class): outputs {', '.join(OUTPUT_NAMES)}."
    )
    return write_file(path, lambda temporary: program.save(str(temporary), external_data=False))


def _check_exportable(model: nn.Module, path: Path, overwrite: bool) -> None:
    """Raise one clear error before any work: wrong model, unusable path, non-float32 weights, missing onnxscript."""
    if not (hasattr(model, "head") and hasattr(model, "config") and hasattr(model, "forward_features")):
        raise ValueError(
            f"export_onnx needs a ProtoPoolForImageClassification, got {type(model).__name__}: load one with "
            "AutoModelForImageClassification.from_pretrained(folder)."
        )
    if path.suffix != ".onnx":
        raise ValueError(f"The ONNX file name must end in .onnx, got {str(path)!r}.")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"The folder of {str(path)!r} does not exist: create it first.")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{str(path)!r} already exists: pass overwrite=True (CLI: --overwrite) to replace it.")
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        names = sorted(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(
            f"export_onnx exports float32 models; this one has {', '.join(names)} weights: export model.float()."
        )
    try:
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ImportError(
            'ONNX export needs onnx and onnxscript: pip install "protopool-hf[onnx]" (or onnx onnxruntime onnxscript).'
        ) from error


@dataclass
class OnnxCheck:
    """How far onnxruntime's outputs are from PyTorch's on the same pixel values.

    Attributes:
        max_abs_diff: `{output name: max |onnx − torch|}` for each of the four outputs.
        batch_size: images compared.

    Example:
        ```python
        >>> from protopool_hf.export import OnnxCheck
        >>> diffs = {"logits": 2e-6, "similarities": 1e-6, "min_distances": 3e-5, "activations": 4e-4}
        >>> check = OnnxCheck(max_abs_diff=diffs, batch_size=2)
        >>> check.within(1e-4), check.within(1e-4, names=("logits", "activations"))
        (True, False)

        ```
    """

    max_abs_diff: dict[str, float]
    batch_size: int

    def within(self, atol: float, names: tuple[str, ...] = ("logits", "similarities")) -> bool:
        """Whether the named outputs agree within `atol` (absolute)."""
        return all(self.max_abs_diff[name] <= atol for name in names)


def check_onnx(model: nn.Module, path: str | os.PathLike, pixel_values: torch.Tensor | None = None) -> OnnxCheck:
    """Run an exported file in onnxruntime (CPU) and the model in PyTorch on the same input; compare the outputs.

    Args:
        model: the model that was exported.
        path: its ONNX file.
        pixel_values: `(N, 3, H_in, W_in)` input; by default 2 seeded random images of the config's size.

    Returns:
        The `OnnxCheck` of the four outputs.
    """
    import onnxruntime

    if pixel_values is None:
        _, height, width = model.config.input_size
        pixel_values = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    pixel_values = pixel_values.float().cpu()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ours = session.run(list(OUTPUT_NAMES), {INPUT_NAME: pixel_values.numpy()})
    graph = _ExplainingGraph(model)
    with evaluating(graph):
        reference = graph(pixel_values.to(next(model.parameters()).device))
    diffs = {
        name: float(np.max(np.abs(got - want.float().cpu().numpy())))
        for name, got, want in zip(OUTPUT_NAMES, ours, reference, strict=True)
    }
    return OnnxCheck(max_abs_diff=diffs, batch_size=int(pixel_values.shape[0]))
