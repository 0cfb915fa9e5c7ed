"""The maths of the ProtoPool head as pure torch functions: distances, slot assignment, focal similarity.

Shape alphabet: N batch, C classes, P prototypes, S slots per class, D prototype dim, H, W feature-map size.

`modeling_protopool.ProtoPoolHead` composes them; they import nothing but torch. The numerics follow the official
code (gmum/ProtoPool @ 2bd4288):

- squared L2 distances, clamped at 0, between every latent 1×1 patch and every prototype;
- per prototype, the min and the mean distance over locations;
- slots mixed in distance space, `einsum("np,cps->ncs")`, with the assignment A (C, P, S);
- focal similarity φ(mixed min) − φ(mixed mean), φ(d) = log((d + 1) / (d + ε));
- a last layer C·S -> C without bias, 1 for a class's own slots and 0 elsewhere.

The head computes distances and φ in float32 even under autocast (in bf16 a min distance of 0.027 comes out
anywhere from 0 to 0.4).
"""

import torch
import torch.nn.functional as F


__all__ = [
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


def log_similarity(distances: torch.Tensor, similarity_epsilon: float) -> torch.Tensor:
    """φ(d) = log((d + 1) / (d + ε)): from log(1/ε) at d = 0 down towards 0 as d grows; ε is `similarity_epsilon`."""
    return torch.log((distances + 1) / (distances + similarity_epsilon))


def focal_similarity(
    min_distances: torch.Tensor, mean_distances: torch.Tensor, assignment: torch.Tensor, similarity_epsilon: float
) -> torch.Tensor:
    """Focal similarity of every (class, slot): φ(mixed min distance) − φ(mixed mean distance).

    Args:
        min_distances: `(N, P)` minimum over locations of each prototype's distance.
        mean_distances: `(N, P)` mean over locations.
        assignment: `(C, P, S)` distribution of each slot over the pool.
        similarity_epsilon: ε of φ.

    Returns:
        `(N, C, S)` similarities.
    """
    mixed_min = torch.einsum("np,cps->ncs", min_distances, assignment)
    mixed_mean = torch.einsum("np,cps->ncs", mean_distances, assignment)
    return log_similarity(mixed_min, similarity_epsilon) - log_similarity(mixed_mean, similarity_epsilon)


def slot_assignment(
    slot_logits: torch.Tensor, scale: float | torch.Tensor, *, gumbel_tau: float, mode: str = "softmax"
) -> torch.Tensor:
    """The assignment A (C, P, S) of every slot to the pool: each (class, slot) column sums to 1 over P.

    Args:
        slot_logits: `(C, P, S)` assignment logits Θ.
        scale: the Gumbel scale s multiplying the logits (> 0).
        gumbel_tau: Gumbel-softmax temperature τ, used by `mode="gumbel"` only.
        mode: `"gumbel"` samples `gumbel_softmax(Θ·s, τ)` (training); `"softmax"` is the deterministic
            `softmax(Θ·s)` (eval; s = 1 is the official `gumbel_scale=0` path); `"hard"` is one_hot(argmax_P Θ).

    Returns:
        `(C, P, S)` assignment.
    """
    if mode == "hard":
        index = slot_logits.argmax(dim=1)  # (C, S)
        return F.one_hot(index, slot_logits.shape[1]).permute(0, 2, 1).to(slot_logits.dtype)
    if mode == "gumbel":
        return F.gumbel_softmax(slot_logits * scale, tau=gumbel_tau, hard=False, dim=1)
    if mode == "softmax":
        return torch.softmax(slot_logits * scale, dim=1)
    raise ValueError(f"Unknown assignment mode {mode!r}: use 'gumbel', 'softmax' or 'hard'.")


def slot_class_identity(
    num_classes: int, num_slots_per_class: int, device: torch.device | None = None
) -> torch.Tensor:
    """`(C, C·S)` matrix with 1 where slot column j = c·S + s belongs to class c, else 0."""
    classes = torch.arange(num_classes, device=device)
    slot_class = torch.arange(num_classes * num_slots_per_class, device=device) // num_slots_per_class  # (C·S,)
    return (classes[:, None] == slot_class[None, :]).float()
