"""protopool-hf: the ProtoPool interpretable image classifier on any timm backbone, for transformers and the Hub.

Importing the package is cheap: it imports neither torch nor transformers, and every public name below is imported
from its module on first use (`_EXPORTS`, the one list of them). The package still registers `ProtoPoolConfig` with
`AutoConfig` and `ProtoPoolForImageClassification` with `AutoModel` and `AutoModelForImageClassification`: at once
when transformers' auto classes are already imported, else as soon as they are (or as soon as our configuration or
model module is), through a one-shot import hook (`_RegistrationHook`). So `import protopool_hf` followed by
`AutoConfig.for_model("protopool")` works in either import order, and `protopool-hf --help` answers without torch.
"""

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable
from importlib import import_module
from types import ModuleType
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    from .callbacks import GumbelScheduleCallback, ProjectionCallback, WarmupCallback
    from .card import render_model_card
    from .configuration_protopool import PRESETS, ProtoPoolConfig, __version__
    from .convert import convert_original_checkpoint
    from .explanation import Explanation, explain
    from .export import export_onnx
    from .hub import push_to_hub, save_model_folder
    from .interpretability import evaluate_interpretability
    from .metrics import InterpretabilityReport
    from .modeling_protopool import ProtoPoolForImageClassification, ProtoPoolOutput, ProtoPoolPreTrainedModel
    from .phases import protopool_param_groups
    from .projection import ProjectionResult, project_prototypes
    from .recipe import ProtoPoolRecipe
    from .trainer import ProtoPoolTrainer
    from .training import train_protopool

# Public name -> the module that defines it, imported on first access.
_EXPORTS = {
    "GumbelScheduleCallback": "callbacks",
    "ProjectionCallback": "callbacks",
    "WarmupCallback": "callbacks",
    "render_model_card": "card",
    "PRESETS": "configuration_protopool",
    "ProtoPoolConfig": "configuration_protopool",
    "__version__": "configuration_protopool",
    "convert_original_checkpoint": "convert",
    "Explanation": "explanation",
    "explain": "explanation",
    "export_onnx": "export",
    "push_to_hub": "hub",
    "save_model_folder": "hub",
    "evaluate_interpretability": "interpretability",
    "InterpretabilityReport": "metrics",
    "ProtoPoolForImageClassification": "modeling_protopool",
    "ProtoPoolOutput": "modeling_protopool",
    "ProtoPoolPreTrainedModel": "modeling_protopool",
    "protopool_param_groups": "phases",
    "ProjectionResult": "projection",
    "project_prototypes": "projection",
    "ProtoPoolRecipe": "recipe",
    "ProtoPoolTrainer": "trainer",
    "train_protopool": "training",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


# ---------------------------------------------------------------------------- Auto-class registration
def _register_config() -> None:
    from transformers import AutoConfig

    from .configuration_protopool import ProtoPoolConfig

    AutoConfig.register("protopool", ProtoPoolConfig, exist_ok=True)
    # `save_pretrained` then copies the configuration and modeling code next to the weights (trust_remote_code).
    ProtoPoolConfig.register_for_auto_class()


def _register_model() -> None:
    from transformers import AutoModel, AutoModelForImageClassification

    from .configuration_protopool import ProtoPoolConfig
    from .modeling_protopool import ProtoPoolForImageClassification

    AutoModel.register(ProtoPoolConfig, ProtoPoolForImageClassification, exist_ok=True)
    AutoModelForImageClassification.register(ProtoPoolConfig, ProtoPoolForImageClassification, exist_ok=True)
    ProtoPoolForImageClassification.register_for_auto_class("AutoModelForImageClassification")


# Each registration runs once, after the first of its modules has been executed: transformers' auto module (the
# user reaches for the Auto classes) or ours (the user builds a config or model, whose save must know its auto class).
_REGISTER_AFTER: dict[str, Callable[[], None]] = {
    "transformers.models.auto.configuration_auto": _register_config,
    f"{__name__}.configuration_protopool": _register_config,
    "transformers.models.auto.modeling_auto": _register_model,
    f"{__name__}.modeling_protopool": _register_model,
}


def _run_registration(register: Callable[[], None]) -> None:
    for name in [name for name, function in _REGISTER_AFTER.items() if function is register]:
        del _REGISTER_AFTER[name]
    if not _REGISTER_AFTER and _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)
    register()


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the wrapped loader, then the registration that waited for this module."""

    def __init__(self, loader: Any, register: Callable[[], None]) -> None:
        self._loader = loader
        self._register = register

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        if self._register in _REGISTER_AFTER.values():
            _run_registration(self._register)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, is_package, resource readers...
        return getattr(self._loader, name)


class _RegistrationHook(importlib.abc.MetaPathFinder):
    """A `sys.meta_path` finder that only wraps the loaders of the modules in `_REGISTER_AFTER`."""

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> Any:
        register = _REGISTER_AFTER.get(fullname)
        if register is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader, register)
                return spec
        return None


_HOOK = _RegistrationHook()
for _register in dict.fromkeys(_REGISTER_AFTER.values()):
    if any(name in sys.modules for name, function in _REGISTER_AFTER.items() if function is _register):
        _run_registration(_register)
if _REGISTER_AFTER:
    sys.meta_path.insert(0, _HOOK)
del _register
