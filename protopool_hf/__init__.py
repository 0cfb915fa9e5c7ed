"""protopool-hf: the ProtoPool interpretable image classifier on any timm backbone, for transformers and the Hub.

Importing the package registers `ProtoPoolConfig` with `AutoConfig` and `ProtoPoolForImageClassification` with
`AutoModel` and `AutoModelForImageClassification`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .configuration_protopool import PRESETS, ProtoPoolConfig, __version__
from .modeling_protopool import ProtoPoolForImageClassification, ProtoPoolOutput, ProtoPoolPreTrainedModel


__all__ = [
    "PRESETS",
    "ProtoPoolConfig",
    "ProtoPoolForImageClassification",
    "ProtoPoolOutput",
    "ProtoPoolPreTrainedModel",
    "__version__",
]

AutoConfig.register("protopool", ProtoPoolConfig, exist_ok=True)
AutoModel.register(ProtoPoolConfig, ProtoPoolForImageClassification, exist_ok=True)
AutoModelForImageClassification.register(ProtoPoolConfig, ProtoPoolForImageClassification, exist_ok=True)
# `save_pretrained` then copies the configuration and modeling code next to the weights (trust_remote_code).
ProtoPoolConfig.register_for_auto_class()
ProtoPoolForImageClassification.register_for_auto_class("AutoModelForImageClassification")
