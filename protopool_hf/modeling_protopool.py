"""ProtoPool as a transformers model: a timm backbone with a prototype-pool head.

ProtoPool: Rymarczyk et al., "Interpretable Image Classification with Differentiable Prototypes Assignment",
ECCV 2022 (https://arxiv.org/abs/2112.02902).

Shape alphabet: N batch, C classes, P prototypes, S slots per class, D prototype dim, H, W feature-map size.

This file is what `save_pretrained` copies for `trust_remote_code`: its import chain holds only torch, timm,
transformers and the package's configuration, layers, losses and backbone modules.
"""

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .backbone import backbone_feature_map, create_backbone, feature_channels
from .configuration_protopool import ProtoPoolConfig
from .layers import HeadOutput, ProtoPoolHead, squared_l2_distances
from .losses import LossWeights, all_loss_terms, weighted_total


__all__ = ["ProtoPoolForImageClassification", "ProtoPoolOutput", "ProtoPoolPreTrainedModel", "image_processor_dict"]

_PIL_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


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
            for name in ("projection_image_index", "projection_row", "projection_col", "projection_label"):
                init.constant_(getattr(module, name), -1)
            init.constant_(module.projection_distance, float("nan"))
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
        folder, the tensors and the fix. `ignore_mismatched_sizes=True` keeps transformers' behaviour for shapes.
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
        return (model, info) if with_info else model


class ProtoPoolForImageClassification(ProtoPoolPreTrainedModel):
    """ProtoPool image classifier: any timm backbone, a shared prototype pool, Gumbel-softmax slot assignment.

    The same class serves `AutoModel` and `AutoModelForImageClassification`.

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
        self.post_init()

    # ------------------------------------------------------------------ forward
    def feature_map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(N, 3, H_in, W_in)` images -> `(N, C_feat, H, W)` backbone feature map (NCHW)."""
        return backbone_feature_map(self.backbone, pixel_values, self.config.feature_stage)

    def latent_map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(N, 3, H_in, W_in)` images -> `(N, D, H, W)` latent map in (0, 1), float32."""
        return self.head.latent(self.feature_map(pixel_values))

    def prototype_distances(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(N, 3, H_in, W_in)` images -> `(N, P, H, W)` squared distances to every prototype, float32."""
        return squared_l2_distances(self.latent_map(pixel_values), self.head.prototypes.float())

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
    @torch.no_grad()
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
        head = self.head
        for buffer, value in (
            (head.projection_image_index, image_index),
            (head.projection_row, row),
            (head.projection_col, col),
            (head.projection_distance, distance),
            (head.projection_label, label),
        ):
            buffer.copy_(torch.as_tensor(value).to(buffer))
        self.config.projection_dataset = dataset_name
        self.config.projection_input_size = list(input_size) if input_size is not None else None

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


def image_processor_dict(config: ProtoPoolConfig) -> dict[str, Any]:
    """A stock transformers image processor config equal to timm's eval transform for this model.

    `crop_mode="center"`: `ConvNextImageProcessorPil`, which resizes the shortest edge to H / crop_pct and crops the
    centre H × H. `crop_mode="squash"`: `ViTImageProcessorPil`, which resizes to H × W. Then rescale to [0, 1] and
    normalise. With `AutoImageProcessor.from_pretrained(folder, backend="pil")` this is bit-exact with
    `timm.data.create_transform(**config.data_config(), is_training=False)` for square inputs (squash: crop_pct 1);
    transformers' default torchvision backend is within one grey level. Where the resized image exceeds the crop by
    an odd number of pixels, transformers floors the crop offset and timm rounds it, so such images come out shifted
    by one pixel: a stock processor cannot express timm's rounding.
    """
    data = config.data_config()
    _, height, width = data["input_size"]
    if data["crop_mode"] == "squash":
        processor: dict[str, Any] = {
            "image_processor_type": "ViTImageProcessorPil",
            "size": {"height": height, "width": width},
        }
    else:
        processor = {
            "image_processor_type": "ConvNextImageProcessorPil",
            "size": {"shortest_edge": height},
            "crop_pct": data["crop_pct"],
        }
    return {
        **processor,
        "resample": _PIL_RESAMPLE[data["interpolation"]],
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(data["mean"]),
        "image_std": list(data["std"]),
        "do_convert_rgb": True,
    }
