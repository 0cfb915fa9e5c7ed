"""Configuration of ProtoPool models.

ProtoPool: Rymarczyk et al., "Interpretable Image Classification with Differentiable Prototypes Assignment",
ECCV 2022 (https://arxiv.org/abs/2112.02902).

The config is the single source of truth: every constructor argument of the model, every loss weight and every
schedule constant lives here, and is checked here.
"""

import copy
import difflib
import math
import os
from collections.abc import Mapping
from typing import Any

from transformers import PretrainedConfig

from .preprocessing import CROP_MODES, INTERPOLATIONS, OFFICIAL_PREPROCESSING


__all__ = ["PRESETS", "ProtoPoolConfig"]

__version__ = "0.1.0"

# Named recipes, kept as data: the official README's training commands (gmum/ProtoPool @ 2bd4288, README.md:
# --num_descriptive 10, --num_prototypes 202 / 195, --proto_depth 256 / 128, ResNet-50 from iNaturalist for CUB)
# as in the paper's results (Rymarczyk et al., ECCV 2022: 202 prototypes on CUB-200-2011, 195 on Stanford Cars).
PRESETS: dict[str, dict[str, Any]] = {
    "cub200": {
        "backbone": "resnet50",
        "num_labels": 200,
        "num_prototypes": 202,
        "num_slots_per_class": 10,
        "prototype_dim": 256,
        **OFFICIAL_PREPROCESSING,
    },
    "cars196": {
        "backbone": "resnet50.tv_in1k",
        "num_labels": 196,
        "num_prototypes": 195,
        "num_slots_per_class": 10,
        "prototype_dim": 128,
        **OFFICIAL_PREPROCESSING,
    },
}

_POSITIVE_INTS = ("num_prototypes", "num_slots_per_class", "prototype_dim", "gumbel_scale_epochs")
_POSITIVE_FLOATS = ("similarity_epsilon", "gumbel_tau", "gumbel_scale_max")
_NON_NEGATIVE_FLOATS = (
    "cluster_weight",
    "separation_weight",
    "orthogonality_weight",
    "l1_weight",
    "background_weight",
    "background_margin",
)
_INTERPOLATIONS = tuple(INTERPOLATIONS)
_CROP_MODES = CROP_MODES


class ProtoPoolConfig(PretrainedConfig):
    r"""Configuration of a [`ProtoPoolForImageClassification`]: a timm backbone with a prototype-pool head.

    Shape alphabet: C classes (`num_labels`), P prototypes, S slots per class, D prototype dim.

    Args:
        backbone (`str`, *optional*, defaults to `"resnet50"`):
            Any timm model name (`timm.list_models()`), optionally with a pretrained tag (`"resnet50.tv_in1k"`).
        backbone_pretrained (`bool`, *optional*, defaults to `False`):
            Load timm's pretrained weights when the model is built from this config (never in `from_pretrained`,
            whose checkpoint already holds them).
        backbone_kwargs (`dict`, *optional*):
            Extra keyword arguments for `timm.create_model`, e.g. `{"pretrained_cfg_overlay": {"file": path}}` to
            load pretrained weights from a local file, or `{"drop_path_rate": 0.1}`. Local paths are never saved
            (see `to_dict`).
        backbone_start_weights (`str`, *optional*):
            Where the backbone's start weights came from, recorded when the config is saved (`to_dict`):
            `"hf-hub:<repo id>"`, `"url:<url>"`, `"file:<file name>"` (a local file, not shipped), `"state_dict"`,
            or `None` (timm's random initialisation). Read it through `start_weights_source()`.
        feature_stage (`int`, *optional*):
            `None` uses the backbone's last feature map (`forward_features`). An integer `k` uses the output of
            stage `k` (timm's `forward_intermediates` indexing, negative counts from the end) and drops the later
            stages, for small inputs where the last map would be tiny.
        num_prototypes (`int`, *optional*, defaults to 202): P, the size of the shared prototype pool.
        num_slots_per_class (`int`, *optional*, defaults to 10): S, the slots of each class. P > S is required.
        prototype_dim (`int`, *optional*, defaults to 256): D, the channels of the latent map and the prototypes.
        similarity_epsilon (`float`, *optional*, defaults to 1e-4): ε in φ(d) = log((d + 1) / (d + ε)), in (0, 1).
        gumbel_tau (`float`, *optional*, defaults to 0.5): temperature of the training-time Gumbel-softmax.
        gumbel_scale_max (`float`, *optional*, defaults to 1000.0): final assignment scale s of the schedule.
        gumbel_scale_epochs (`int`, *optional*, defaults to 30): T, the epochs over which s rises as
            s_max·sqrt((e + 1) / T).
        cluster_weight (`float`, *optional*, defaults to 0.8): weight of the cluster term.
        separation_weight (`float`, *optional*, defaults to 0.08): weight of the separation term (subtracted).
        orthogonality_weight (`float`, *optional*, defaults to 1.0): weight of the slot orthogonality term.
        l1_weight (`float`, *optional*, defaults to 1e-4): weight of the L1 penalty on off-class last-layer weights.
        background_weight (`float`, *optional*, defaults to 0.0): weight of the background term, which needs object
            masks in the batch (`object_mask`, see `make_transforms(object_mask=...)`) and is not in the official
            method (0 = off): each prototype's nearest background patch is pushed `background_margin` farther than
            its nearest object patch (`losses.background_loss`).
        background_margin (`float`, *optional*, defaults to 1.0): the squared-distance margin of the background term.
        last_layer_correct_connection (`float`, *optional*, defaults to 1.0): initial last-layer weight from each
            slot to its own class (the official 1). The last layer stays frozen until fine-tuning, so this is the
            scale of the logits in the main phase: with few slots per class a larger value (e.g. 10) lets the
            cross-entropy fall faster (docs/performance.md).
        last_layer_incorrect_connection (`float`, *optional*, defaults to 0.0): initial last-layer weight from each
            slot to the other classes (the official 0; ProtoPNet uses -0.5).
        input_size (`list[int]`, *optional*): `[3, H, W]` model input; `None` takes timm's value for the backbone.
        image_mean (`list[float]`, *optional*): normalisation mean; `None` takes timm's.
        image_std (`list[float]`, *optional*): normalisation std; `None` takes timm's.
        interpolation (`str`, *optional*): resize interpolation, one of `protopool_hf.preprocessing.INTERPOLATIONS`
            (what transformers' default image processor applies); `None` takes timm's.
        crop_pct (`float`, *optional*): eval crop fraction (resize to H / crop_pct, then crop H); `None` takes timm's.
        crop_mode (`str`, *optional*): `"center"` resizes the shorter side and crops the centre (timm's default);
            `"squash"` resizes to H × W without keeping the aspect ratio, as the official code; `None` takes timm's.
        projection_dataset (`str`, *optional*): name or fingerprint of the dataset the prototypes were projected on.
        projection_input_size (`list[int]`, *optional*): input size used during that projection.
        protopool_version (`str`, *optional*): the protopool-hf version that wrote this config (set automatically).

    Example:
        ```python
        >>> from protopool_hf import ProtoPoolConfig
        >>> config = ProtoPoolConfig(backbone="test_resnet", num_labels=3, num_prototypes=6, num_slots_per_class=2)
        >>> config.num_prototypes, config.data_config()["input_size"]
        (6, (3, 160, 160))
        >>> ProtoPoolConfig.from_preset("cub200").num_prototypes
        202

        ```
    """

    model_type = "protopool"
    # Extra output tensors stay out of `EvalPrediction.predictions`, so `compute_metrics` sees plain logits.
    keys_to_ignore_at_inference = ["min_distances", "slot_assignment", "loss_terms", "similarities", "distances"]

    def __init__(
        self,
        backbone: str = "resnet50",
        backbone_pretrained: bool = False,
        backbone_kwargs: dict[str, Any] | None = None,
        backbone_start_weights: str | None = None,
        feature_stage: int | None = None,
        num_prototypes: int = 202,
        num_slots_per_class: int = 10,
        prototype_dim: int = 256,
        similarity_epsilon: float = 1e-4,
        gumbel_tau: float = 0.5,
        gumbel_scale_max: float = 1000.0,
        gumbel_scale_epochs: int = 30,
        cluster_weight: float = 0.8,
        separation_weight: float = 0.08,
        orthogonality_weight: float = 1.0,
        l1_weight: float = 1e-4,
        background_weight: float = 0.0,
        background_margin: float = 1.0,
        last_layer_correct_connection: float = 1.0,
        last_layer_incorrect_connection: float = 0.0,
        input_size: list[int] | None = None,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        interpolation: str | None = None,
        crop_pct: float | None = None,
        crop_mode: str | None = None,
        projection_dataset: str | None = None,
        projection_input_size: list[int] | None = None,
        protopool_version: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.backbone = backbone
        self.backbone_pretrained = backbone_pretrained
        if backbone_kwargs is not None and not isinstance(backbone_kwargs, Mapping):
            raise ValueError(
                f"`backbone_kwargs` must be a dict of timm.create_model arguments or None, got {backbone_kwargs!r}."
            )
        self.backbone_kwargs = dict(backbone_kwargs) if backbone_kwargs else {}
        self.backbone_start_weights = backbone_start_weights
        self.feature_stage = feature_stage
        self.num_prototypes = num_prototypes
        self.num_slots_per_class = num_slots_per_class
        self.prototype_dim = prototype_dim
        self.similarity_epsilon = similarity_epsilon
        self.gumbel_tau = gumbel_tau
        self.gumbel_scale_max = gumbel_scale_max
        self.gumbel_scale_epochs = gumbel_scale_epochs
        self.cluster_weight = cluster_weight
        self.separation_weight = separation_weight
        self.orthogonality_weight = orthogonality_weight
        self.l1_weight = l1_weight
        self.background_weight = background_weight
        self.background_margin = background_margin
        self.last_layer_correct_connection = last_layer_correct_connection
        self.last_layer_incorrect_connection = last_layer_incorrect_connection
        self.input_size = _as_list("input_size", input_size)
        self.image_mean = _as_list("image_mean", image_mean)
        self.image_std = _as_list("image_std", image_std)
        self.interpolation = interpolation
        self.crop_pct = crop_pct
        self.crop_mode = crop_mode
        self.projection_dataset = projection_dataset
        self.projection_input_size = _as_list("projection_input_size", projection_input_size)
        self.protopool_version = protopool_version or __version__
        _check_label_arguments(kwargs)
        super().__init__(**kwargs)
        self.validate_protopool()

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ProtoPoolConfig":
        """Build the config of a paper setting (`"cub200"` or `"cars196"`), with any field overridden.

        Args:
            name: a key of `PRESETS`.
            **overrides: config fields that replace the preset's values.

        Returns:
            The config.
        """
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}: choose one of {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> "ProtoPoolConfig":
        """`PretrainedConfig.from_dict`, where `num_labels`, `id2label` and `label2id` arguments replace the saved labels.

        transformers builds the config from the saved `id2label` plus the `num_labels` argument and sets an
        `id2label` argument only afterwards, unchecked; here the arguments take the saved labels' place before the
        label checks run, so `from_pretrained(folder, num_labels=4, id2label=..., ignore_mismatched_sizes=True)`
        works and a bad `id2label` argument is refused. `num_labels` alone keeps the saved names when the count is
        unchanged and otherwise names the classes `LABEL_i`, as transformers does.
        """
        if not any(key in kwargs for key in ("num_labels", "id2label", "label2id")):
            return super().from_dict(config_dict, **kwargs)
        config_dict = dict(config_dict)
        if "id2label" in kwargs:
            id2label = kwargs.pop("id2label")
            config_dict["id2label"] = id2label
            label2id = kwargs.pop("label2id", None)
            if label2id is None and isinstance(id2label, Mapping):
                label2id = {name: int(index) for index, name in id2label.items() if isinstance(index, int | str)}
            config_dict["label2id"] = label2id
        elif "num_labels" in kwargs:
            saved = config_dict.get("id2label")
            if saved is None or len(saved) != kwargs["num_labels"]:
                config_dict.pop("id2label", None)
                config_dict.pop("label2id", None)
        if "label2id" in kwargs:
            config_dict["label2id"] = kwargs.pop("label2id")
        if "num_labels" in kwargs:
            config_dict["num_labels"] = kwargs.pop("num_labels")
        return super().from_dict(config_dict, **kwargs)

    # ------------------------------------------------------------------ validation
    def validate_protopool(self) -> None:
        """Check every ProtoPool field; raise `ValueError` naming the field, the value and the allowed range."""
        if not isinstance(self.backbone, str) or not self.backbone:
            raise ValueError(f"`backbone` must be a timm model name (a non-empty str), got {self.backbone!r}.")
        self.check_backbone_exists()
        for name in ("backbone_pretrained",):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be a bool, got {getattr(self, name)!r}.")
        if not isinstance(self.backbone_kwargs, dict):
            raise ValueError(f"`backbone_kwargs` must be a dict or None, got {self.backbone_kwargs!r}.")
        if self.backbone_start_weights is not None and not isinstance(self.backbone_start_weights, str):
            raise ValueError(
                f"`backbone_start_weights` must be None or a str such as 'hf-hub:timm/resnet50.a1_in1k', got "
                f"{self.backbone_start_weights!r}."
            )
        if self.feature_stage is not None and (
            isinstance(self.feature_stage, bool) or not isinstance(self.feature_stage, int)
        ):
            raise ValueError(f"`feature_stage` must be None or an int stage index, got {self.feature_stage!r}.")
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive int (>= 1), got {value!r}.")
        for name in _POSITIVE_FLOATS:
            value = getattr(self, name)
            if not _is_real(value) or not value > 0 or not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}.")
        for name in _NON_NEGATIVE_FLOATS:
            value = getattr(self, name)
            if not _is_real(value) or not value >= 0 or not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
        for name in ("last_layer_correct_connection", "last_layer_incorrect_connection"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
        if not self.last_layer_correct_connection > self.last_layer_incorrect_connection:
            raise ValueError(
                f"`last_layer_correct_connection` ({self.last_layer_correct_connection}) must be larger than "
                f"`last_layer_incorrect_connection` ({self.last_layer_incorrect_connection}): otherwise a class's own "
                "slots lower its logit."
            )
        if not self.similarity_epsilon < 1:
            raise ValueError(
                f"`similarity_epsilon` must be in (0, 1), got {self.similarity_epsilon}: with ε >= 1, "
                "φ(d) = log((d + 1) / (d + ε)) is no longer positive and every similarity flips its sign."
            )
        if self.num_prototypes <= self.num_slots_per_class:
            raise ValueError(
                f"`num_prototypes` ({self.num_prototypes}) must be larger than `num_slots_per_class` "
                f"({self.num_slots_per_class}): the separation term uses the P - S prototypes a class does not use. "
                "Raise `num_prototypes` or lower `num_slots_per_class`."
            )
        if self.input_size is not None and (
            len(self.input_size) != 3 or not all(isinstance(v, int) and v > 0 for v in self.input_size)
        ):
            raise ValueError(
                f"`input_size` must be [channels, height, width] of positive ints, got {self.input_size}."
            )
        if self.input_size is not None and self.input_size[0] != 3:
            raise ValueError(
                f"`input_size` must have 3 channels (ProtoPool takes RGB images), got {self.input_size}: use "
                f"[3, {self.input_size[1]}, {self.input_size[2]}]; greyscale images are converted to RGB by the "
                "image processor and make_transforms."
            )
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if value is not None and (len(value) != 3 or not all(_is_real(v) and math.isfinite(v) for v in value)):
                raise ValueError(f"`{name}` must be three finite numbers (one per RGB channel), got {value!r}.")
        if self.image_std is not None and not all(v > 0 for v in self.image_std):
            raise ValueError(f"`image_std` must be > 0 for every channel, got {self.image_std!r}.")
        if self.interpolation is not None and self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"`interpolation` must be one of {_INTERPOLATIONS}, got {self.interpolation!r}.")
        if self.crop_pct is not None and (not _is_real(self.crop_pct) or not 0 < self.crop_pct <= 1):
            raise ValueError(f"`crop_pct` must be in (0, 1], got {self.crop_pct!r}.")
        if self.crop_mode is not None and self.crop_mode not in _CROP_MODES:
            raise ValueError(f"`crop_mode` must be one of {_CROP_MODES}, got {self.crop_mode!r}.")
        if getattr(self, "num_labels", 2) < 1:
            raise ValueError(f"`num_labels` must be >= 1, got {self.num_labels}.")

    def check_backbone_exists(self) -> None:
        """Raise `ValueError` with close timm names when `backbone` is not a timm model."""
        import timm

        architecture = self.backbone.split(".", 1)[0]
        if timm.is_model(architecture):
            return
        close = difflib.get_close_matches(architecture.lower(), timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean one of {close}?" if close else " See `timm.list_models()` for the names."
        raise ValueError(f"`backbone`={self.backbone!r} is not a timm model (timm {timm.__version__}).{hint}")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """`PretrainedConfig.to_dict`, made portable: what `save_pretrained` writes and `push_to_hub` uploads.

        A saved model's checkpoint holds the backbone's weights, so the dict records `backbone_pretrained=False` and
        `backbone_start_weights` (where the start weights came from), and drops the machine's local paths from
        `backbone_kwargs` (`checkpoint_path`, the `file` of `pretrained_cfg` / `pretrained_cfg_overlay`):
        `from_config(AutoConfig.from_pretrained(folder))` then builds offline on any machine. The config's own
        attributes are unchanged, so a model built from this object still loads its start weights.
        """
        output = super().to_dict()
        output["backbone_start_weights"] = self.start_weights_source()
        output["backbone_pretrained"] = False
        output["backbone_kwargs"] = _portable_backbone_kwargs(self.backbone_kwargs)
        return output

    def start_weights_source(self) -> str | None:
        """Where the backbone's start weights come (or came) from; the format of `backbone_start_weights`.

        From `backbone_kwargs` and timm's pretrained config when this config loads weights itself
        (`backbone_pretrained=True` or a `checkpoint_path`); else the recorded `backbone_start_weights`. A local
        file is named by its file name only.
        """
        kwargs = self.backbone_kwargs or {}
        if kwargs.get("checkpoint_path"):
            return f"file:{os.path.basename(os.fspath(kwargs['checkpoint_path']))}"
        if not self.backbone_pretrained:
            return self.backbone_start_weights
        cfg = dict(kwargs["pretrained_cfg"]) if isinstance(kwargs.get("pretrained_cfg"), Mapping) else {}
        cfg.update(kwargs.get("pretrained_cfg_overlay") or {})
        if cfg.get("state_dict") is not None:
            return "state_dict"
        if cfg.get("file"):
            return f"file:{os.path.basename(os.fspath(cfg['file']))}"
        if not cfg.get("hf_hub_id") and not cfg.get("url"):
            import timm

            default = timm.models.get_pretrained_cfg(self.backbone, allow_unregistered=True)
            cfg = {"hf_hub_id": default.hf_hub_id, "url": default.url} if default is not None else {}
        if cfg.get("hf_hub_id"):
            return f"hf-hub:{cfg['hf_hub_id']}"
        if cfg.get("url"):
            return f"url:{cfg['url']}"
        return f"timm:{self.backbone}"

    # ------------------------------------------------------------------ preprocessing
    def data_config(self) -> dict[str, Any]:
        """The preprocessing as a timm data config: `input_size`, `mean`, `std`, `interpolation`, `crop_pct`, `crop_mode`.

        Fields left `None` in this config are filled from timm's pretrained config of the backbone.
        """
        resolved = {}
        fields = (self.input_size, self.image_mean, self.image_std, self.interpolation, self.crop_pct, self.crop_mode)
        if None in fields:
            import timm
            from timm.data import resolve_data_config

            self.check_backbone_exists()
            pretrained_cfg = timm.models.get_pretrained_cfg(self.backbone, allow_unregistered=True)
            resolved = resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg else {})
        return {
            "input_size": tuple(self.input_size) if self.input_size is not None else tuple(resolved["input_size"]),
            "mean": tuple(self.image_mean) if self.image_mean is not None else tuple(resolved["mean"]),
            "std": tuple(self.image_std) if self.image_std is not None else tuple(resolved["std"]),
            "interpolation": self.interpolation or resolved["interpolation"],
            "crop_pct": float(self.crop_pct) if self.crop_pct is not None else float(resolved["crop_pct"]),
            "crop_mode": self.crop_mode
            or (resolved["crop_mode"] if resolved["crop_mode"] in _CROP_MODES else "center"),
        }


def _as_list(name: str, value: Any) -> list | None:
    """`list(value)`, or None; a `ValueError` naming the field when the value is not a sequence."""
    if value is None:
        return None
    if isinstance(value, str | bytes | Mapping):
        raise ValueError(f"`{name}` must be a list of numbers or None, got {value!r}.")
    try:
        return list(value)
    except TypeError:
        raise ValueError(f"`{name}` must be a list of numbers or None, got {value!r}.") from None


def _portable_backbone_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """`backbone_kwargs` without local paths: no `checkpoint_path`, no `file` (or `state_dict`) in the cfg dicts."""
    portable = {key: value for key, value in kwargs.items() if key != "checkpoint_path"}
    for key in ("pretrained_cfg", "pretrained_cfg_overlay"):
        value = portable.get(key)
        if isinstance(value, Mapping):
            value = {name: item for name, item in value.items() if name not in ("file", "state_dict")}
            if value:
                portable[key] = value
            else:
                del portable[key]
    return copy.deepcopy(portable)


_MAX_LABELS = 100_000


def _check_label_arguments(kwargs: dict[str, Any]) -> None:
    """Check `num_labels`, `id2label` and `label2id` before `PretrainedConfig` reads them (it raises TypeError)."""
    if "num_labels" in kwargs:
        value = kwargs["num_labels"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`num_labels` must be a positive int (>= 1), got {value!r}.")
        if value > _MAX_LABELS:  # checked before PretrainedConfig builds an id2label entry per class
            raise ValueError(
                f"`num_labels`={value} is more classes than a ProtoPool model can hold (at most {_MAX_LABELS}: its last "
                "layer alone has C·S × C weights): check the value, it is the number of classes."
            )
    for name in ("id2label", "label2id"):
        value = kwargs.get(name)
        if value is not None and not isinstance(value, Mapping):
            raise ValueError(f"`{name}` must be a dict (class index <-> class name) or None, got {value!r}.")
    id2label = kwargs.get("id2label")
    if id2label:
        for key in id2label:
            try:
                int(key)
            except (TypeError, ValueError):
                raise ValueError(
                    f"`id2label` keys must be class indices (ints, or strings of ints as in config.json), got {key!r}."
                ) from None
        indices = sorted(int(key) for key in id2label)
        if indices != list(range(len(id2label))):
            raise ValueError(
                f"`id2label` keys must be exactly the class indices 0..{len(id2label) - 1}, got {indices}: number the "
                "classes from 0 without gaps, e.g. id2label=dict(enumerate(class_names))."
            )
        num_labels = kwargs.get("num_labels")
        if num_labels is not None and num_labels != len(id2label):
            raise ValueError(
                f"`num_labels`={num_labels} but `id2label` names {len(id2label)} classes: give one name per class "
                "(or leave num_labels out: it is the length of id2label)."
            )


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
