"""ProtoPool as a transformers model: a timm backbone with a prototype-pool head.

ProtoPool: Rymarczyk et al., "Interpretable Image Classification with Differentiable Prototypes Assignment",
ECCV 2022 (https://arxiv.org/abs/2112.02902).

Shape alphabet: N batch, C classes, P prototypes, S slots per class, D prototype dim, H, W feature-map size.

This file is what `save_pretrained` copies for `trust_remote_code`: its import chain holds only torch, timm,
transformers and the package's configuration, layers, losses, backbone and preprocessing modules.
"""

import json
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .backbone import backbone_feature_map, create_backbone, feature_channels, set_backbone_data_config
from .configuration_protopool import ProtoPoolConfig
from .layers import HeadOutput, ProtoPoolHead
from .losses import LossWeights, all_loss_terms, weighted_total
from .preprocessing import image_processor_dict
from .provenance import PROVENANCE_BUFFERS, Provenance, clear_provenance, write_provenance


__all__ = [
    "GumbelScheduleWarning",
    "ProtoPoolForImageClassification",
    "ProtoPoolOutput",
    "ProtoPoolPreTrainedModel",
    "image_processor_dict",
]


class GumbelScheduleWarning(UserWarning):
    """A model is trained in Gumbel mode while nothing moves its assignment scale."""


@dataclass
class ProtoPoolOutput(ModelOutput):
    """Output of [`ProtoPoolForImageClassification`].

    Attributes:
        loss: scalar total loss, when `labels` were given.
        logits: `(N, C)` class scores.
        min_distances: `(N, P)` min squared distance of each prototype over the feature map.
        slot_assignment: `(C, P, S)` the assignment of slots to prototypes used in this pass.
        similarities: `(N, C, S)` focal similarity of every class slot (the last layer's input).
        loss_terms: unweighted terms `cross_entropy`, `cluster`, `separation`, `orthogonality`, `l1`, when `labels`
            were given.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    min_distances: torch.Tensor | None = None
    slot_assignment: torch.Tensor | None = None
    similarities: torch.Tensor | None = None
    loss_terms: dict[str, torch.Tensor] | None = None


class ProtoPoolPreTrainedModel(PreTrainedModel):
    """Holds the class attributes and the weight initialisation shared by ProtoPool models."""

    config_class = ProtoPoolConfig
    config: ProtoPoolConfig
    base_model_prefix = "protopool"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    # timm does not support model parallelism: keep the head whole.
    _no_split_modules = ["ProtoPoolHead"]
    # `from_pretrained(..., dtype=torch.bfloat16 / float16)` casts the backbone only: the head's weights and buffers
    # (prototypes, Gumbel scale) stay float32, as its distances and φ are computed in float32. A regex on the names
    # of the floating-point tensors only: transformers would turn the bool and integer buffers into float32 too.
    _keep_in_fp32_modules_strict = [
        r"^head\.(add_on|prototypes|slot_logits|last_layer|gumbel_scale|projection_distance)"
    ]
    supports_gradient_checkpointing = True
    # Trainer must not pass `num_items_in_batch` to forward.
    accepts_loss_kwargs = False
    model_tags = ["protopool", "prototype-network", "interpretability", "timm"]

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Initialise only ProtoPool's own head; timm modules keep their weights (pretrained or timm-initialised).

        The `transformers.initialization` functions skip tensors already loaded from a checkpoint.
        """
        if isinstance(module, ProtoPoolHead):
            init.kaiming_normal_(module.add_on[0].weight, mode="fan_out", nonlinearity="relu")
            init.zeros_(module.add_on[0].bias)
            init.uniform_(module.prototypes, 0.0, 1.0)
            init.xavier_normal_(module.slot_logits)
            init.copy_(module.last_layer.weight, module.initial_last_layer())
            init.ones_(module.gumbel_scale)
            init.zeros_(module.hard_assignment)
            for buffer, _, empty in PROVENANCE_BUFFERS.values():
                init.constant_(getattr(module, buffer), empty)
        elif hasattr(module, "init_non_persistent_buffers"):
            # timm's relative-position indices, rope tables, blur filters are not in the checkpoint.
            module.init_non_persistent_buffers()

    def _set_gradient_checkpointing(self, enable: bool = True, *args: Any, **kwargs: Any) -> None:
        self.backbone.set_grad_checkpointing(enable)
        # transformers reads the state from a `gradient_checkpointing` attribute (`is_activation_checkpointing`, and
        # the Trainer's DDP `find_unused_parameters`); timm's flag is named `grad_checkpointing`.
        self.gradient_checkpointing = enable

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any, **kwargs: Any) -> Any:
        """`PreTrainedModel.from_pretrained`, strict: weights only from safetensors, every tensor present, shapes equal.

        transformers re-initialises a missing tensor with only a log line, and names mismatched shapes only in its
        log; pickle-based `pytorch_model.bin` files can run code. Here each of these raises an error that names the
        folder, the tensors and the fix. `ignore_mismatched_sizes=True` keeps transformers' behaviour for shapes, the
        fine-tuning path of the HF guides (`num_labels=4, id2label=..., ignore_mismatched_sizes=True`): when head
        tensors are re-initialised, the assignment restarts soft at s = 1 and the projection provenance is cleared,
        with a warning, since neither describes the new head.
        """
        source = os.fspath(pretrained_model_name_or_path)
        if kwargs.get("use_safetensors") is False or kwargs.get("weights_only") is False:
            raise ValueError(
                f"ProtoPool models load weights only from model.safetensors (pickle-based files can run code); "
                f"got use_safetensors/weights_only=False for {source!r}."
            )
        kwargs["use_safetensors"] = True
        with_info = kwargs.pop("output_loading_info", False)
        lenient = kwargs.pop("ignore_mismatched_sizes", False)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path,
                *model_args,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
                **kwargs,
            )
        except SafetensorError as error:
            raise ValueError(
                f"Cannot read the weights of {source!r} ({error}): its model.safetensors is truncated or corrupt, "
                "e.g. by an interrupted download or copy. Download it again (force_download=True) or save the model "
                "again."
            ) from error
        except OSError as error:
            if "no file named model.safetensors" not in str(error):
                raise
            raise OSError(
                f"{source!r} holds no model.safetensors. ProtoPool models load weights only from safetensors, never "
                "from pickle-based files (pytorch_model.bin), whose loading can run code. Convert trusted weights: "
                "model.save_pretrained(folder) writes model.safetensors."
            ) from error
        problems = []
        if info["missing_keys"]:
            problems.append(f"missing tensors {sorted(info['missing_keys'])}")
        if info["mismatched_keys"] and not lenient:
            shapes = ", ".join(
                f"{key}: checkpoint {tuple(a)} vs config {tuple(b)}" for key, a, b in sorted(info["mismatched_keys"])
            )
            problems.append(f"tensors whose shapes differ from what config.json implies ({shapes})")
        if problems:
            raise ValueError(
                f"The weights of {source!r} do not match its config.json: {'; '.join(problems)}. The config's sizes "
                "(num_labels, num_prototypes, num_slots_per_class, prototype_dim, backbone) must be those the "
                "weights were saved with: restore the config.json saved with these weights."
            )
        reinitialised = sorted(key for key, *_ in info["mismatched_keys"] if key.startswith("head."))
        if reinitialised:
            model.restart_head(reinitialised, source)
        return (model, info) if with_info else model


class ProtoPoolForImageClassification(ProtoPoolPreTrainedModel):
    """ProtoPool image classifier: any timm backbone, a shared prototype pool, Gumbel-softmax slot assignment.

    The same class serves `AutoModel` and `AutoModelForImageClassification`. `model.backbone` is the timm model
    without its classifier; with `config.feature_stage=k` it is truncated after stage k (later stages, final norm
    and head removed), so its `forward_features` and `num_features` no longer describe the full network: use
    `model.feature_map`. For timm's data helpers the model carries a `pretrained_cfg` with the config's
    preprocessing (see [`ProtoPoolForImageClassification.pretrained_cfg`]).

    Args:
        config: the [`ProtoPoolConfig`].

    Example:
        ```python
        >>> import torch
        >>> from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification
        >>> config = ProtoPoolConfig(backbone="test_resnet", num_labels=3, num_prototypes=6, num_slots_per_class=2)
        >>> model = ProtoPoolForImageClassification(config).eval()
        >>> out = model(torch.randn(2, 3, 160, 160), labels=torch.tensor([0, 2]))
        >>> out.logits.shape, out.min_distances.shape, sorted(out.loss_terms)
        (torch.Size([2, 3]), torch.Size([2, 6]), ['cluster', 'cross_entropy', 'l1', 'orthogonality', 'separation'])
        ```
    """

    def __init__(self, config: ProtoPoolConfig) -> None:
        super().__init__(config)
        _record_preprocessing(config)
        # `from_pretrained` builds on the meta device: the checkpoint holds the weights, so never download them.
        pretrained = config.backbone_pretrained and torch.empty(0).device.type != "meta"
        self.backbone = create_backbone(
            config.backbone,
            pretrained=pretrained,
            feature_stage=config.feature_stage,
            input_size=config.data_config()["input_size"],
            require_spatial_map=True,
            **config.backbone_kwargs,
        )
        if pretrained:
            for tensor in (*self.backbone.parameters(), *self.backbone.buffers()):
                tensor._is_hf_initialized = True
        self.head = ProtoPoolHead(
            feature_channels(self.backbone, config.feature_stage),
            num_classes=config.num_labels,
            num_prototypes=config.num_prototypes,
            num_slots_per_class=config.num_slots_per_class,
            prototype_dim=config.prototype_dim,
            epsilon=config.similarity_epsilon,
            tau=config.gumbel_tau,
            correct_connection=config.last_layer_correct_connection,
            incorrect_connection=config.last_layer_incorrect_connection,
        )
        # Whether `set_gumbel_scale` was called, and whether `train()` already checked (once) that something sets it.
        self._gumbel_scale_set = False
        self._scale_checked = False
        self.post_init()
        self._sync_backbone_pretrained_cfg()

    # ------------------------------------------------------------------ timm interop
    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """The timm pretrained config of this model: the backbone's, with the preprocessing of `config.data_config()`.

        `timm.data.resolve_data_config(model=model)` and `timm.data.resolve_model_data_config(model)` read it, so
        they return the model's input size, mean, std, interpolation, crop_pct and crop_mode (not timm's ImageNet
        defaults). Reading it also brings `model.backbone.pretrained_cfg` in step with the config. The backbone's
        test-time size and crop are dropped: the config's preprocessing is the only one.
        """
        backbone_cfg = self._sync_backbone_pretrained_cfg()
        return {
            **backbone_cfg,
            "num_classes": self.config.num_labels,
            "classifier": "head.last_layer",
            "first_conv": f"backbone.{first_conv}" if (first_conv := backbone_cfg.get("first_conv")) else None,
        }

    @property
    def default_cfg(self) -> dict[str, Any]:
        """Alias of `pretrained_cfg` (timm's older name)."""
        return self.pretrained_cfg

    def _sync_backbone_pretrained_cfg(self) -> dict[str, Any]:
        return set_backbone_data_config(self.backbone, self.config.data_config())

    # ------------------------------------------------------------------ forward
    def feature_map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(N, 3, H_in, W_in)` images -> `(N, C_feat, H, W)` backbone feature map (NCHW)."""
        return backbone_feature_map(self.backbone, pixel_values, self.config.feature_stage)

    def latent_map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(N, 3, H_in, W_in)` images -> `(N, D, H, W)` latent map in (0, 1), float32."""
        return self.head.latent(self.feature_map(pixel_values))

    def prototype_distances(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(N, 3, H_in, W_in)` images -> `(N, P, H, W)` squared distances to every prototype, float32.

        As in the forward pass, the distances are computed in float32 even under bf16/fp16 autocast (the backbone
        still runs under it).
        """
        return self.head.distances(self.feature_map(pixel_values))

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> ProtoPoolOutput:
        """Classify `(N, 3, H_in, W_in)` images; with `labels` `(N,)`, also return the loss and its terms.

        Args:
            pixel_values: normalised images.
            labels: class indices in `[0, C)`.
            **kwargs: ignored (Trainer and pipelines may pass extra keys).

        Returns:
            A [`ProtoPoolOutput`].
        """
        head_out = self.head(self.feature_map(pixel_values))
        loss = loss_terms = None
        if labels is not None:
            loss_terms = self.loss_terms(head_out, labels)
            loss = weighted_total(loss_terms, self.loss_weights)
        return ProtoPoolOutput(
            loss=loss,
            logits=head_out.logits,
            min_distances=head_out.min_distances,
            slot_assignment=head_out.slot_assignment,
            similarities=head_out.similarities,
            loss_terms=loss_terms,
        )

    # ------------------------------------------------------------------ loss
    @property
    def loss_weights(self) -> LossWeights:
        """The loss weights from the config."""
        return LossWeights(
            cluster=self.config.cluster_weight,
            separation=self.config.separation_weight,
            orthogonality=self.config.orthogonality_weight,
            l1=self.config.l1_weight,
        )

    def loss_terms(
        self,
        outputs: HeadOutput | ProtoPoolOutput,
        labels: torch.Tensor,
        labels_b: torch.Tensor | None = None,
        lam: float = 1.0,
    ) -> dict[str, torch.Tensor]:
        """The unweighted loss terms of a forward pass, as the official code computes them.

        Args:
            outputs: the head's or the model's output for the batch.
            labels: `(N,)` class indices of the (original, unmixed) images; cluster and separation use them.
            labels_b: `(N,)` the second labels of a mixup batch; CE is then λ·CE(y_a) + (1 − λ)·CE(y_b).
            lam: the mixup coefficient λ.

        Returns:
            `{"cross_entropy", "cluster", "separation", "orthogonality", "l1"}` scalars.
        """
        labels = self._check_labels(labels)
        head = self.head
        return all_loss_terms(
            outputs.logits, outputs.min_distances, outputs.slot_assignment, head.slot_logits,
            head.last_layer.weight, labels, labels_b, lam,
        )  # fmt: skip

    def _check_labels(self, labels: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(labels, device=self.head.prototypes.device).long()
        if labels.ndim != 1:
            raise ValueError(f"`labels` must be a 1-D tensor of class indices, got shape {tuple(labels.shape)}.")
        if torch.compiler.is_compiling():
            # No Python branch on a value under torch.compile / torch.export: an assertion op in the graph.
            in_range = ((labels >= 0) & (labels < self.config.num_labels)).all()
            torch._assert_async(in_range, f"`labels` outside [0, {self.config.num_labels}) for this model's classes")
            return labels
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.config.num_labels):
            bad = labels[(labels < 0) | (labels >= self.config.num_labels)].unique().tolist()
            raise ValueError(
                f"`labels` holds {bad}, outside [0, {self.config.num_labels}) for this model's "
                f"{self.config.num_labels} classes: check the dataset's label column against the config's id2label."
            )
        return labels

    # ------------------------------------------------------------------ assignment
    @property
    def gumbel_scale(self) -> float:
        """The current assignment scale s."""
        return float(self.head.gumbel_scale)

    def set_gumbel_scale(self, scale: float) -> None:
        """Set the assignment scale s (> 0) multiplying the slot logits; saved with the model."""
        scale = float(scale)
        if not scale > 0:
            raise ValueError(f"The Gumbel scale must be > 0, got {scale}. s = 1 is the official plain-softmax path.")
        self.head.gumbel_scale.fill_(scale)
        self._gumbel_scale_set = True

    def train(self, mode: bool = True) -> "ProtoPoolForImageClassification":
        """`nn.Module.train`; warns once when training starts in Gumbel mode while the scale was never set.

        A soft assignment trained at the initial s = 1 that nothing raises never becomes one-hot, so the prototypes
        the classes use stay blurred. The stock `Trainer` calls `model.train()` after its callbacks' `on_train_begin`,
        where [`GumbelScheduleCallback`] sets the scale, so a Trainer with that callback does not warn. The check
        lives here, not in `forward`, which stays free of branches on tensor values.

        Args:
            mode: training (True) or evaluation (False) mode.

        Returns:
            The model.
        """
        super().train(mode)
        if not mode or self._scale_checked or self.head.gumbel_scale.is_meta or self.head.hard_assignment.is_meta:
            return self
        self._scale_checked = True  # once: the Trainer calls train() at every step, and reading s may sync a GPU
        if self._scale_never_set():
            warnings.warn(
                "Training a ProtoPool model in Gumbel mode at the initial assignment scale s=1, which nothing sets: "
                "the assignment stays soft. Add protopool_hf.GumbelScheduleCallback() to the Trainer's callbacks (or "
                "call model.set_gumbel_scale(s); harden the assignment for last-layer fine-tuning).",
                GumbelScheduleWarning,
                stacklevel=2,
            )
        return self

    def _scale_never_set(self) -> bool:
        """Soft assignment at s = 1 that `set_gumbel_scale` never touched (a loaded s != 1 was set by training)."""
        if self._gumbel_scale_set:
            return False
        return not bool(self.head.hard_assignment) and float(self.head.gumbel_scale) == 1.0

    def harden_assignment(self) -> None:
        """From now on every mode uses one_hot(argmax over the pool of the slot logits); the logits are kept."""
        self.head.hard_assignment.fill_(True)

    @property
    def is_assignment_hard(self) -> bool:
        """Whether `harden_assignment()` was called."""
        return bool(self.head.hard_assignment)

    @torch.no_grad()
    def slot_assignment(self) -> torch.Tensor:
        """The deterministic `(C, P, S)` assignment: softmax at the current scale, or one-hot once hardened."""
        return self.head.assignment(mode="softmax")

    @torch.no_grad()
    def class_to_prototypes(self) -> torch.Tensor:
        """`(C, S)` prototype id of every class slot: the argmax over the pool of the slot logits."""
        return self.head.slot_logits.argmax(dim=1)

    # ------------------------------------------------------------------ projection provenance
    def set_projection_provenance(
        self,
        image_index: torch.Tensor,
        row: torch.Tensor,
        col: torch.Tensor,
        distance: torch.Tensor,
        label: torch.Tensor,
        dataset_name: str | None = None,
        input_size: list[int] | None = None,
    ) -> None:
        """Record where each prototype was projected: `(P,)` image index, feature-map row/col, distance, class."""
        values = (image_index, row, col, distance, label)
        tensors = {name: torch.as_tensor(value) for name, value in zip(PROVENANCE_BUFFERS, values, strict=True)}
        write_provenance(self, Provenance(**tensors, dataset_name=dataset_name, input_size=input_size))

    def clear_projection_provenance(self) -> None:
        """Forget where the prototypes were projected: buffers back to -1 / nan, config fields to None."""
        clear_provenance(self)

    @torch.no_grad()
    def restart_head(self, reinitialised: list[str], source: str = "the checkpoint") -> None:
        """After head tensors were re-initialised: a soft assignment at s = 1, no projection provenance, a warning.

        `from_pretrained(..., ignore_mismatched_sizes=True)` calls it when it re-initialises head tensors (new
        `num_labels`, ...): a hardened assignment would turn the new random slot logits into a one-hot choice that
        cross-entropy cannot train, and the old provenance (image indices, labels, dataset) no longer describes the
        head.

        Args:
            reinitialised: the names of the re-initialised tensors, for the warning.
            source: the checkpoint's name, for the warning.
        """
        self.head.hard_assignment.fill_(False)
        self.head.gumbel_scale.fill_(1.0)
        self._gumbel_scale_set = self._scale_checked = False
        self.clear_projection_provenance()
        warnings.warn(
            f"{source}: the head tensors {reinitialised} were re-initialised (ignore_mismatched_sizes=True), so the "
            "slot assignment restarts soft at scale s=1 and the projection provenance was cleared. Train the new "
            "head with protopool_hf.GumbelScheduleCallback, then project the prototypes again.",
            UserWarning,
            stacklevel=3,
        )

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """`PreTrainedModel.save_pretrained`, plus the `auto_map` for remote code and `preprocessor_config.json`."""
        self.config.auto_map = {
            "AutoConfig": "configuration_protopool.ProtoPoolConfig",
            "AutoModel": "modeling_protopool.ProtoPoolForImageClassification",
            "AutoModelForImageClassification": "modeling_protopool.ProtoPoolForImageClassification",
        }
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            path = os.path.join(save_directory, "preprocessor_config.json")
            with open(path + ".tmp", "w") as handle:
                json.dump(image_processor_dict(self.config), handle, indent=2, sort_keys=True)
            os.replace(path + ".tmp", path)


def _record_preprocessing(config: ProtoPoolConfig) -> None:
    """Write timm's resolved preprocessing into the config's empty fields, so the saved config is self-contained."""
    data = config.data_config()
    config.input_size = list(data["input_size"])
    config.image_mean = list(data["mean"])
    config.image_std = list(data["std"])
    config.interpolation = data["interpolation"]
    config.crop_pct = data["crop_pct"]
    config.crop_mode = data["crop_mode"]
