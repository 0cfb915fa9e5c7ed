"""ProtoPool as a transformers model: a timm backbone with a prototype-pool head.

ProtoPool: Rymarczyk et al., "Interpretable Image Classification with Differentiable Prototypes Assignment",
ECCV 2022 (https://arxiv.org/abs/2112.02902).

Shape alphabet: N batch, C classes, P prototypes, S slots per class, D prototype dim, H, W feature-map size.

The method, as [`ProtoPoolHead.forward`] computes it on the backbone's feature map:

1. add-on: a 1×1 convolution and a sigmoid make a `(N, D, H, W)` latent map;
2. squared L2 distances of every latent patch to each of the P prototypes of the pool shared by all classes;
3. each prototype's min and mean distance over the map, `(N, P)`;
4. slot assignment: each of the S slots of each class is a distribution A over the pool, `(C, P, S)`
   (Gumbel-softmax in training, softmax in eval, one-hot once hardened);
5. slot mixing and focal similarity: the min and mean distances mixed by A, then φ(mixed min) − φ(mixed mean)
   with φ(d) = log((d + 1) / (d + ε)), `(N, C, S)`;
6. last layer: C·S slot similarities -> C logits, without bias.

The pure maths is in `layers.py` and the loss terms in `losses.py` (both torch only). This file, with its import
chain (configuration, layers, losses, gumbel, backbone, preprocessing, loading), is what `save_pretrained` copies for
`trust_remote_code`: it imports only torch, timm, transformers and those modules.
"""

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .backbone import (
    backbone_feature_map,
    create_backbone,
    feature_channels,
    set_backbone_data_config,
    timm_pretrained_cfg,
)
from .configuration_protopool import ProtoPoolConfig
from .gumbel import GumbelScheduleMixin
from .layers import focal_similarity, slot_assignment, slot_class_identity, squared_l2_distances
from .loading import StrictLoadingMixin
from .losses import LossWeights, all_loss_terms, weighted_total
from .provenance import PROVENANCE_BUFFERS, Provenance, clear_provenance, register_provenance_buffers, write_provenance
from .torch_utils import check_labels


__all__ = [
    "ProtoPoolForImageClassification",
    "ProtoPoolHead",
    "ProtoPoolOutput",
    "ProtoPoolPreTrainedModel",
]


@dataclass
class ProtoPoolOutput(ModelOutput):
    """Output of [`ProtoPoolHead`] and [`ProtoPoolForImageClassification`].

    Attributes:
        loss: scalar total loss, when `labels` were given to the model.
        logits: `(N, C)` class scores.
        min_distances: `(N, P)` min squared distance of each prototype over the feature map.
        slot_assignment: `(C, P, S)` the assignment of slots to prototypes used in this pass.
        similarities: `(N, C, S)` focal similarity of every class slot (the last layer's input).
        distances: `(N, P, H, W)` squared distance of every latent patch to every prototype (float32); φ of it is
            each prototype's activation map.
        loss_terms: unweighted terms `cross_entropy`, `cluster`, `separation`, `orthogonality`, `l1` (and
            `background` with an object mask and a background weight), when `labels` were given to the model.

    Example:
        ```python
        >>> import torch
        >>> from protopool_hf.modeling_protopool import ProtoPoolOutput
        >>> out = ProtoPoolOutput(logits=torch.zeros(2, 3))
        >>> out.to_tuple()[0].shape, out.loss is None
        (torch.Size([2, 3]), True)

        ```
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    min_distances: torch.Tensor | None = None
    slot_assignment: torch.Tensor | None = None
    similarities: torch.Tensor | None = None
    distances: torch.Tensor | None = None
    loss_terms: dict[str, torch.Tensor] | None = None


class ProtoPoolHead(nn.Module):
    """Prototype-pool head: add-on, a pool of P prototypes shared by C classes of S slots, last layer.

    Its `forward` reads as the method (see the module docstring); distances and φ are computed in float32 even under
    bf16/fp16 autocast or a half-precision model.

    Args:
        in_channels: channels of the backbone feature map.
        num_classes: C.
        num_prototypes: P.
        num_slots_per_class: S.
        prototype_dim: D.
        similarity_epsilon: ε of φ.
        gumbel_tau: Gumbel-softmax temperature τ.
        correct_connection: initial last-layer weight from a slot to its own class (official 1).
        incorrect_connection: initial last-layer weight from a slot to the other classes (official 0).

    Example:
        ```python
        >>> import torch
        >>> from protopool_hf.modeling_protopool import ProtoPoolHead
        >>> head = ProtoPoolHead(16, num_classes=3, num_prototypes=6, num_slots_per_class=2, prototype_dim=8)
        >>> out = head(torch.randn(2, 16, 4, 4))
        >>> out.logits.shape, out.min_distances.shape, out.similarities.shape, out.distances.shape
        (torch.Size([2, 3]), torch.Size([2, 6]), torch.Size([2, 3, 2]), torch.Size([2, 6, 4, 4]))

        ```
    """

    def __init__(
        self,
        in_channels: int,
        *,
        num_classes: int,
        num_prototypes: int,
        num_slots_per_class: int,
        prototype_dim: int,
        similarity_epsilon: float = 1e-4,
        gumbel_tau: float = 0.5,
        correct_connection: float = 1.0,
        incorrect_connection: float = 0.0,
    ) -> None:
        super().__init__()
        self.correct_connection = correct_connection
        self.incorrect_connection = incorrect_connection
        self.num_classes = num_classes
        self.num_prototypes = num_prototypes
        self.num_slots_per_class = num_slots_per_class
        self.similarity_epsilon = similarity_epsilon
        self.gumbel_tau = gumbel_tau
        self.add_on = nn.Sequential(nn.Conv2d(in_channels, prototype_dim, kernel_size=1), nn.Sigmoid())
        self.prototypes = nn.Parameter(torch.empty(num_prototypes, prototype_dim))
        self.slot_logits = nn.Parameter(torch.empty(num_classes, num_prototypes, num_slots_per_class))
        self.last_layer = nn.Linear(num_classes * num_slots_per_class, num_classes, bias=False)
        self.register_buffer("gumbel_scale", torch.ones(()))
        self.register_buffer("hard_assignment", torch.zeros((), dtype=torch.bool))
        # Provenance of projected prototypes (-1 / nan: never projected): projection_image_index, _row, _col, ...
        register_provenance_buffers(self, num_prototypes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation: Kaiming add-on, U[0, 1) prototypes, Xavier Θ, 1/0 last layer (by default)."""
        nn.init.kaiming_normal_(self.add_on[0].weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.add_on[0].bias)
        nn.init.uniform_(self.prototypes, 0.0, 1.0)
        nn.init.xavier_normal_(self.slot_logits)
        with torch.no_grad():
            self.last_layer.weight.copy_(self.initial_last_layer())

    def initial_last_layer(self) -> torch.Tensor:
        """The `(C, C·S)` initial last-layer weight: `correct_connection` on a slot's own class, else `incorrect_...`."""
        identity = slot_class_identity(self.num_classes, self.num_slots_per_class)
        return identity * self.correct_connection + (1 - identity) * self.incorrect_connection

    def forward(self, features: torch.Tensor) -> ProtoPoolOutput:
        """Classify a batch of backbone feature maps `(N, C_feat, H, W)`; the output has no loss."""
        with torch.autocast(device_type=features.device.type, enabled=False):
            latent = self.latent(features)  # (N, D, H, W) add-on, in (0, 1)
            distance_map = squared_l2_distances(latent, self.prototypes.float())  # (N, P, H, W)
            distances = distance_map.flatten(2)  # (N, P, H·W)
            min_distances = distances.amin(dim=2)  # (N, P)
            mean_distances = distances.mean(dim=2)  # (N, P)
            assignment = self.assignment()  # (C, P, S)
            # (N, C, S): slots mixed in distance space by A, then φ(mixed min) − φ(mixed mean).
            similarities = focal_similarity(min_distances, mean_distances, assignment.float(), self.similarity_epsilon)
            logits = F.linear(similarities.flatten(1), self.last_layer.weight.float())  # (N, C)
        return ProtoPoolOutput(
            logits=logits,
            min_distances=min_distances,
            slot_assignment=assignment,
            similarities=similarities,
            distances=distance_map,
        )

    def latent(self, features: torch.Tensor) -> torch.Tensor:
        """`(N, C_feat, H, W)` backbone features -> `(N, D, H, W)` latent map in (0, 1), float32."""
        conv = self.add_on[0]
        with torch.autocast(device_type=features.device.type, enabled=False):
            # Explicit float32 weights: a model cast to bf16 / fp16 (`.to(dtype)`) still computes the head in float32.
            return self.add_on[1](F.conv2d(features.float(), conv.weight.float(), conv.bias.float()))

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """`(N, C_feat, H, W)` backbone features -> `(N, P, H, W)` squared distances, float32."""
        with torch.autocast(device_type=features.device.type, enabled=False):
            return squared_l2_distances(self.latent(features), self.prototypes.float())

    def assignment(self, mode: str | None = None) -> torch.Tensor:
        """The `(C, P, S)` assignment: Gumbel in training, softmax in eval, one-hot once hardened.

        The `hard_assignment` buffer picks between the one-hot and the soft assignment with `torch.where`, never with
        a Python branch on its value, so `torch.compile(fullgraph=True)`, `torch.export` and the ONNX exporter see one
        graph for both states. `torch.where` copies the selected elements: the soft assignment is bit-for-bit
        `softmax(Θ·s)` and the hard one `one_hot(argmax_P Θ)`; slot logits get a zero gradient once hardened.
        """
        if mode is None:
            mode = "gumbel" if self.training else "softmax"
        soft = slot_assignment(self.slot_logits, self.gumbel_scale, gumbel_tau=self.gumbel_tau, mode=mode)
        if mode == "hard":
            return soft
        hard = slot_assignment(self.slot_logits, self.gumbel_scale, gumbel_tau=self.gumbel_tau, mode="hard")
        return torch.where(self.hard_assignment, hard, soft)


class ProtoPoolPreTrainedModel(StrictLoadingMixin, PreTrainedModel):
    """Holds the class attributes, the weight initialisation and the loading policy shared by ProtoPool models.

    Example:
        ```python
        >>> from protopool_hf import ProtoPoolForImageClassification
        >>> from protopool_hf.modeling_protopool import ProtoPoolPreTrainedModel
        >>> issubclass(ProtoPoolForImageClassification, ProtoPoolPreTrainedModel)
        True

        ```
    """

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
        self.gradient_checkpointing = enable  # what transformers reads (timm's flag is `grad_checkpointing`)


class ProtoPoolForImageClassification(GumbelScheduleMixin, ProtoPoolPreTrainedModel):
    """ProtoPool image classifier: any timm backbone, a shared prototype pool, Gumbel-softmax slot assignment.

    The same class serves `AutoModel` and `AutoModelForImageClassification`. As in timm, `forward_features` maps
    images to the backbone's feature map and `forward_head` the feature map to the output; `forward` runs both and
    adds the loss. `model.backbone` is the timm model without its classifier; with `config.feature_stage=k` it is
    truncated after stage k (later stages, final norm and head removed), so its own `forward_features` and
    `num_features` no longer describe the full network: use `model.forward_features`. For timm's data helpers the
    model carries a `pretrained_cfg` with the config's preprocessing (see
    [`ProtoPoolForImageClassification.pretrained_cfg`]). Constructing a model leaves the caller's config untouched:
    the model works on a copy, `model.config`.

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
        config = copy.deepcopy(config)  # timm's resolved preprocessing fills its empty fields: never the caller's
        data = config.data_config()  # input_size, mean, std, interpolation, crop_pct, crop_mode
        data["image_mean"], data["image_std"] = data.pop("mean"), data.pop("std")
        for field, value in data.items():
            setattr(config, field, list(value) if isinstance(value, tuple) else value)
        super().__init__(config)
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
            similarity_epsilon=config.similarity_epsilon,
            gumbel_tau=config.gumbel_tau,
            correct_connection=config.last_layer_correct_connection,
            incorrect_connection=config.last_layer_incorrect_connection,
        )
        self.post_init()
        set_backbone_data_config(self.backbone, self.config.data_config())

    # ------------------------------------------------------------------ forward
    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(N, 3, H_in, W_in)` images -> `(N, C_feat, H, W)` backbone feature map (NCHW)."""
        return backbone_feature_map(self.backbone, pixel_values, self.config.feature_stage)

    def forward_head(self, features: torch.Tensor) -> ProtoPoolOutput:
        """`(N, C_feat, H, W)` feature map -> [`ProtoPoolOutput`] without loss (see [`ProtoPoolHead`])."""
        return self.head(features)

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        mixup_labels: torch.Tensor | None = None,
        mixup_lambda: float = 1.0,
        object_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> ProtoPoolOutput:
        """Classify `(N, 3, H_in, W_in)` images; with `labels` `(N,)`, also return the loss and its terms.

        The loss is the one every training phase optimises: CE + w_clst·cluster − w_sep·separation + w_orth·orth +
        w_l1·L1 (+ w_bg·background, with an object mask), with the weights of the config (`cluster_weight`, ...; a
        weight of 0 leaves its term out).

        Args:
            pixel_values: normalised images; for mixup, the mixed batch λ·x + (1 − λ)·x[perm].
            labels: class indices in `[0, C)` (of the unmixed images: cluster and separation use them).
            mixup_labels: `(N,)` the labels of the images mixed in, y[perm]; CE is then
                λ·CE(labels) + (1 − λ)·CE(mixup_labels). `ProtoPoolTrainer` passes them when it mixes.
            mixup_lambda: λ, the weight of `labels` in a mixed batch.
            object_mask: `(N, H_in, W_in)` object pixels, for the background term (`config.background_weight`).
            **kwargs: ignored (Trainer and pipelines may pass extra keys).

        Returns:
            A [`ProtoPoolOutput`].
        """
        if mixup_labels is not None and labels is None:
            raise ValueError("`mixup_labels` came without `labels`: pass the labels of the unmixed images too.")
        output = self.forward_head(self.forward_features(pixel_values))
        if labels is None:
            return output
        # In float32 under autocast too, as the head (and as the loss a Trainer computes outside the forward).
        with torch.autocast(device_type=output.logits.device.type, enabled=False):
            loss_terms = self.loss_terms(output, labels, mixup_labels, mixup_lambda, object_mask)
            loss = weighted_total(loss_terms, self.loss_weights)
        return ProtoPoolOutput(
            loss=loss,
            logits=output.logits,
            min_distances=output.min_distances,
            slot_assignment=output.slot_assignment,
            similarities=output.similarities,
            distances=output.distances,
            loss_terms=loss_terms,
        )

    def latent_map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(N, 3, H_in, W_in)` images -> `(N, D, H, W)` latent map in (0, 1), float32."""
        return self.head.latent(self.forward_features(pixel_values))

    def prototype_distances(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(N, 3, H_in, W_in)` images -> `(N, P, H, W)` squared distances to every prototype, float32.

        As in the forward pass, the distances are computed in float32 even under bf16/fp16 autocast (the backbone
        still runs under it).
        """
        return self.head.distances(self.forward_features(pixel_values))

    # ------------------------------------------------------------------ loss
    @property
    def loss_weights(self) -> LossWeights:
        """The loss weights from the config."""
        return LossWeights(
            cluster=self.config.cluster_weight,
            separation=self.config.separation_weight,
            orthogonality=self.config.orthogonality_weight,
            l1=self.config.l1_weight,
            background=self.config.background_weight,
        )

    def loss_terms(
        self,
        outputs: ProtoPoolOutput,
        labels: torch.Tensor,
        mixup_labels: torch.Tensor | None = None,
        mixup_lambda: float = 1.0,
        object_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The unweighted loss terms of a forward pass, as the official code computes them (`losses.all_loss_terms`).

        Args:
            outputs: the head's or the model's output for the batch.
            labels: `(N,)` class indices of the (original, unmixed) images; cluster and separation use them.
            mixup_labels: `(N,)` the labels of the images mixed in; CE is then λ·CE(labels) + (1 − λ)·CE(mixup_labels).
            mixup_lambda: the mixup coefficient λ.
            object_mask: `(N, H_in, W_in)` object pixels: adds the `background` term when its weight is not 0.

        Returns:
            The terms by name (`losses.LOSS_TERM_NAMES`), unweighted.
        """
        labels = self._check_labels(labels)
        head, config = self.head, self.config
        mask = object_mask if config.background_weight else None
        return all_loss_terms(
            outputs.logits, outputs.min_distances, outputs.slot_assignment, head.slot_logits, head.last_layer.weight,
            labels, mixup_labels, mixup_lambda, outputs.distances, mask, config.background_margin,
        )  # fmt: skip

    def _check_labels(self, labels: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(labels, device=self.head.prototypes.device).long()
        if labels.ndim != 1:
            raise ValueError(f"`labels` must be a 1-D tensor of class indices, got shape {tuple(labels.shape)}.")
        check_labels(labels, self.config.num_labels)  # an assertion op in the graph under torch.compile
        return labels

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

    # ------------------------------------------------------------------ timm interop
    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """Timm's pretrained config with the config's preprocessing, for timm's data helpers (`timm_pretrained_cfg`)."""
        return timm_pretrained_cfg(self.backbone, self.config.data_config(), self.config.num_labels)

    default_cfg = pretrained_cfg  # timm's older name
