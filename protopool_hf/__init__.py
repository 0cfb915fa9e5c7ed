"""protopool-hf: the ProtoPool interpretable image classifier on any timm backbone, for transformers and the Hub.

Importing the package registers `ProtoPoolConfig` with `AutoConfig` and `ProtoPoolForImageClassification` with
`AutoModel` and `AutoModelForImageClassification`. The training, projection, picture and Hub tools are imported on
first use (they pull in `Trainer`, PIL and `huggingface_hub`), so `import protopool_hf` stays as light as the model.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .configuration_protopool import PRESETS, ProtoPoolConfig, __version__
from .modeling_protopool import ProtoPoolForImageClassification, ProtoPoolOutput, ProtoPoolPreTrainedModel


if TYPE_CHECKING:
    from .callbacks import GumbelScheduleCallback, ProjectionCallback, WarmupCallback
    from .convert import convert_original_checkpoint
    from .explain import Explanation, explain
    from .export import export_onnx
    from .hub import push_to_hub, render_model_card, save_model_folder
    from .projection import ProjectionResult, project_prototypes
    from .training import ProtoPoolRecipe, ProtoPoolTrainer, protopool_param_groups, train_protopool

__all__ = [
    "PRESETS",
    "Explanation",
    "GumbelScheduleCallback",
    "ProjectionCallback",
    "ProjectionResult",
    "ProtoPoolConfig",
    "ProtoPoolForImageClassification",
    "ProtoPoolOutput",
    "ProtoPoolPreTrainedModel",
    "ProtoPoolRecipe",
    "ProtoPoolTrainer",
    "WarmupCallback",
    "__version__",
    "convert_original_checkpoint",
    "explain",
    "export_onnx",
    "project_prototypes",
    "protopool_param_groups",
    "push_to_hub",
    "render_model_card",
    "save_model_folder",
    "train_protopool",
]

# Public name -> the module that defines it, imported on first access.
_LAZY = {
    "GumbelScheduleCallback": "callbacks",
    "ProjectionCallback": "callbacks",
    "WarmupCallback": "callbacks",
    "convert_original_checkpoint": "convert",
    "Explanation": "explain",
    "explain": "explain",
    "export_onnx": "export",
    "push_to_hub": "hub",
    "render_model_card": "hub",
    "save_model_folder": "hub",
    "ProjectionResult": "projection",
    "project_prototypes": "projection",
    "ProtoPoolRecipe": "training",
    "ProtoPoolTrainer": "training",
    "protopool_param_groups": "training",
    "train_protopool": "training",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'protopool_hf' has no attribute {name!r}")


AutoConfig.register("protopool", ProtoPoolConfig, exist_ok=True)
AutoModel.register(ProtoPoolConfig, ProtoPoolForImageClassification, exist_ok=True)
AutoModelForImageClassification.register(ProtoPoolConfig, ProtoPoolForImageClassification, exist_ok=True)
# `save_pretrained` then copies the configuration and modeling code next to the weights (trust_remote_code).
ProtoPoolConfig.register_for_auto_class()
ProtoPoolForImageClassification.register_for_auto_class("AutoModelForImageClassification")
