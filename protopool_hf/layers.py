"""The ProtoPool head in pure torch: distances, slot assignment, focal similarity, last layer.

Shape alphabet: N batch, C classes, P prototypes, S slots per class, D prototype dim, H, W feature-map size.

The numerics follow the official code (gmum/ProtoPool @ 2bd4288, notes §1.4–1.6):

- squared L2 distances, clamped at 0, between every latent 1×1 patch and every prototype;
- per prototype, the min and the mean distance over locations;
- slots mixed in distance space, `einsum("np,cps->ncs")`, with the assignment A (C, P, S);
- focal similarity φ(mixed min) − φ(mixed mean), φ(d) = log((d + 1) / (d + ε));
- a last layer C·S -> C without bias, 1 for a class's own slots and 0 elsewhere.

Distances and φ are computed in float32 even under autocast (in bf16 a min distance of 0.027 comes out anywhere
from 0 to 0.4).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .provenance import register_provenance_buffers


__all__ = [
    "HeadOutput",
    "ProtoPoolHead",
    "focal_similarity",
    "log_similarity",
    "slot_assignment",
    "slot_class_identity",
    "squared_l2_distances",
]


def squared_l2_distances(latent: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance of every latent patch to every prototype, clamped at 0.

    Args:
        latent: `(N, D, H, W)` latent map.
        prototypes: `(P, D)` prototype vectors.

    Returns:
        `(N, P, H, W)` distances ‖z − p‖², computed as Σz² − 2⟨z, p⟩ + ‖p‖² like the official code.
    """
    z_sq = latent.pow(2).sum(dim=1, keepdim=True)  # (N, 1, H, W)
    cross = torch.einsum("ndhw,pd->nphw", latent, prototypes)
    p_sq = prototypes.pow(2).sum(dim=1)[None, :, None, None]  # (1, P, 1, 1)
    return F.relu(z_sq - 2 * cross + p_sq)


def log_similarity(distances: torch.Tensor, epsilon: float) -> torch.Tensor:
    """φ(d) = log((d + 1) / (d + ε)): from log(1/ε) at d = 0 down towards 0 as d grows."""
    return torch.log((distances + 1) / (distances + epsilon))


def focal_similarity(
    min_distances: torch.Tensor, mean_distances: torch.Tensor, assignment: torch.Tensor, epsilon: float
) -> torch.Tensor:
    """Focal similarity of every (class, slot): φ(mixed min distance) − φ(mixed mean distance).

    Args:
        min_distances: `(N, P)` minimum over locations of each prototype's distance.
        mean_distances: `(N, P)` mean over locations.
        assignment: `(C, P, S)` distribution of each slot over the pool.
        epsilon: ε of φ.

    Returns:
        `(N, C, S)` similarities.
    """
    mixed_min = torch.einsum("np,cps->ncs", min_distances, assignment)
    mixed_mean = torch.einsum("np,cps->ncs", mean_distances, assignment)
    return log_similarity(mixed_min, epsilon) - log_similarity(mixed_mean, epsilon)


def slot_assignment(
    slot_logits: torch.Tensor, scale: float | torch.Tensor, *, tau: float, mode: str = "softmax"
) -> torch.Tensor:
    """The assignment A (C, P, S) of every slot to the pool: each (class, slot) column sums to 1 over P.

    Args:
        slot_logits: `(C, P, S)` assignment logits Θ.
        scale: the Gumbel scale s multiplying the logits (> 0).
        tau: Gumbel-softmax temperature, used by `mode="gumbel"` only.
        mode: `"gumbel"` samples `gumbel_softmax(Θ·s, tau)` (training); `"softmax"` is the deterministic
            `softmax(Θ·s)` (eval; s = 1 is the official `gumbel_scale=0` path); `"hard"` is one_hot(argmax_P Θ).

    Returns:
        `(C, P, S)` assignment.
    """
    if mode == "hard":
        index = slot_logits.argmax(dim=1)  # (C, S)
        return F.one_hot(index, slot_logits.shape[1]).permute(0, 2, 1).to(slot_logits.dtype)
    if mode == "gumbel":
        return F.gumbel_softmax(slot_logits * scale, tau=tau, hard=False, dim=1)
    if mode == "softmax":
        return torch.softmax(slot_logits * scale, dim=1)
    raise ValueError(f"Unknown assignment mode {mode!r}: use 'gumbel', 'softmax' or 'hard'.")


def slot_class_identity(num_classes: int, num_slots: int, device: torch.device | None = None) -> torch.Tensor:
    """`(C, C·S)` matrix with 1 where slot column j = c·S + s belongs to class c, else 0."""
    classes = torch.arange(num_classes, device=device)
    return (classes[:, None] == torch.arange(num_classes * num_slots, device=device)[None, :] // num_slots).float()


@dataclass
class HeadOutput:
    """What the head computes for a batch.

    Attributes:
        logits: `(N, C)` class scores.
        min_distances: `(N, P)` minimum squared distance of each prototype over the map.
        similarities: `(N, C, S)` focal similarity of every slot.
        slot_assignment: `(C, P, S)` the assignment used in this pass.
        distances: `(N, P, H, W)` squared distance of every latent patch to every prototype (float32); φ of it is
            each prototype's activation map.
    """

    logits: torch.Tensor
    min_distances: torch.Tensor
    similarities: torch.Tensor
    slot_assignment: torch.Tensor
    distances: torch.Tensor | None = None


class ProtoPoolHead(nn.Module):
    """Prototype-pool head: add-on, a pool of P prototypes shared by C classes of S slots, last layer.

    Args:
        in_channels: channels of the backbone feature map.
        num_classes: C.
        num_prototypes: P.
        num_slots_per_class: S.
        prototype_dim: D.
        epsilon: ε of φ.
        tau: Gumbel-softmax temperature.
        correct_connection: initial last-layer weight from a slot to its own class (official 1).
        incorrect_connection: initial last-layer weight from a slot to the other classes (official 0).

    Example:
        ```python
        >>> import torch
        >>> from protopool_hf.layers import ProtoPoolHead
        >>> head = ProtoPoolHead(16, num_classes=3, num_prototypes=6, num_slots_per_class=2, prototype_dim=8)
        >>> out = head(torch.randn(2, 16, 4, 4))
        >>> out.logits.shape, out.min_distances.shape, out.similarities.shape
        (torch.Size([2, 3]), torch.Size([2, 6]), torch.Size([2, 3, 2]))
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
        epsilon: float = 1e-4,
        tau: float = 0.5,
        correct_connection: float = 1.0,
        incorrect_connection: float = 0.0,
    ) -> None:
        super().__init__()
        self.correct_connection = correct_connection
        self.incorrect_connection = incorrect_connection
        self.num_classes = num_classes
        self.num_prototypes = num_prototypes
        self.num_slots_per_class = num_slots_per_class
        self.epsilon = epsilon
        self.tau = tau
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

    # ------------------------------------------------------------------ pieces
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
        soft = slot_assignment(self.slot_logits, self.gumbel_scale, tau=self.tau, mode=mode)
        if mode == "hard":
            return soft
        hard = slot_assignment(self.slot_logits, self.gumbel_scale, tau=self.tau, mode="hard")
        return torch.where(self.hard_assignment, hard, soft)

    def forward(self, features: torch.Tensor) -> HeadOutput:
        """Classify a batch of backbone feature maps `(N, C_feat, H, W)`."""
        with torch.autocast(device_type=features.device.type, enabled=False):
            distance_map = self.distances(features)  # (N, P, H, W)
            distances = distance_map.flatten(2)  # (N, P, H·W)
            min_distances = distances.amin(dim=2)
            mean_distances = distances.mean(dim=2)
            assignment = self.assignment()
            similarities = focal_similarity(min_distances, mean_distances, assignment.float(), self.epsilon)
            logits = F.linear(similarities.flatten(1), self.last_layer.weight.float())
        return HeadOutput(
            logits=logits,
            min_distances=min_distances,
            similarities=similarities,
            slot_assignment=assignment,
            distances=distance_map,
        )
