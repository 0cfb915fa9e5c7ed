"""ProtoPool's loss terms as pure functions of tensors.

Shape alphabet: N batch, C classes, P prototypes, S slots per class.

Total loss (official code, `main.py`): CE + 0.8·cluster − 0.08·separation + 1.0·orthogonality + 1e-4·L1, with every
term computed as the official code computes it:

- cluster: for each image, the S prototypes most assigned to its class (by Σ_s A[y, p, s], detached); the smallest
  of their min distances; mean over the batch;
- separation: the same over the P − S prototypes least assigned to the class;
- orthogonality: on the raw logits Θ, the cosine similarity of every pair of a class's slot vectors (length P),
  diagonal included, summed over classes and pairs, / (C·S) − 1; computed as a Gram matrix per class (C, S, S)
  instead of the official (C, P, S, S) broadcast;
- L1: the absolute sum of the last-layer weights that connect a slot to a class it does not belong to.

One term is not in the official method and is off by default (weight 0): **background**, for data with object
masks. With an `(N, H_in, W_in)` object mask in the batch, every prototype's nearest background patch is pushed at
least a margin farther than its nearest object patch, so that prototypes (and the evidence they find on new images)
sit on the object, not on the background around it (docs/performance.md: what it did to the demo).

The official cluster/separation code masks with "max distance = D" and takes a max; the exact minimum is the same
whenever distances are ≤ D (always, for latents in (0, 1)^D and prototypes in [0, 1]^D), and stays right beyond.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


__all__ = [
    "BACKGROUND_BELOW",
    "LOSS_TERM_NAMES",
    "LossWeights",
    "all_loss_terms",
    "background_cells",
    "background_loss",
    "cell_object_shares",
    "cluster_loss",
    "l1_off_class_loss",
    "mixup_cross_entropy",
    "orthogonality_loss",
    "separation_loss",
    "weighted_total",
]

LOSS_TERM_NAMES = ("cross_entropy", "cluster", "separation", "orthogonality", "l1", "background")
#: A latent cell whose input pixels are less than this share object is background (the background term, the restricted
#: projection and the interpretability metrics share this rule).
BACKGROUND_BELOW = 0.1


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms; the separation term is subtracted.

    The defaults are the official ones; a model's weights come from its config (`model.loss_weights`).

    Example:
        ```python
        >>> import torch
        >>> from protopool_hf.losses import LossWeights, weighted_total
        >>> terms = {"cross_entropy": torch.tensor(1.0), "separation": torch.tensor(2.0)}
        >>> weighted_total(terms, LossWeights(separation=0.5))
        tensor(0.)

        ```
    """

    cross_entropy: float = 1.0
    cluster: float = 0.8
    separation: float = 0.08
    orthogonality: float = 1.0
    l1: float = 1e-4
    background: float = 0.0


def _masked_min(min_distances: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mean over the batch of the smallest `min_distances` among each row's top-k prototypes by `scores`."""
    index = scores.topk(k, dim=1).indices  # (N, k)
    return min_distances.gather(1, index).amin(dim=1).mean()


def cluster_loss(
    min_distances: torch.Tensor, class_assignment: torch.Tensor, num_slots_per_class: int
) -> torch.Tensor:
    """Pull each image's closest patch towards one of the prototypes its class uses.

    Args:
        min_distances: `(N, P)` min squared distance of each prototype over the image.
        class_assignment: `(N, P, S)` the assignment of each image's class, `A[labels]`.
        num_slots_per_class: S, how many of the most-assigned prototypes count as the class's own.

    Returns:
        Scalar loss.
    """
    scores = class_assignment.sum(dim=-1).detach()  # (N, P)
    return _masked_min(min_distances, scores, num_slots_per_class)


def separation_loss(
    min_distances: torch.Tensor, class_assignment: torch.Tensor, num_slots_per_class: int
) -> torch.Tensor:
    """The smallest distance to the P − S prototypes least used by each image's class (subtracted in the total).

    Args:
        min_distances: `(N, P)`.
        class_assignment: `(N, P, S)` the assignment of each image's class, `A[labels]`.
        num_slots_per_class: S.

    Returns:
        Scalar loss.
    """
    scores = (1 - class_assignment).sum(dim=-1).detach()  # (N, P)
    return _masked_min(min_distances, scores, min_distances.shape[1] - num_slots_per_class)


def orthogonality_loss(slot_logits: torch.Tensor) -> torch.Tensor:
    """Mean summed cosine similarity between the slot logit vectors of each class, minus 1.

    Args:
        slot_logits: `(C, P, S)` raw assignment logits Θ.

    Returns:
        Scalar: Σ_c Σ_{i,j} cos(Θ[c, :, i], Θ[c, :, j]) / (C·S) − 1 (0 when every class's slots are orthogonal).
    """
    num_classes, _, num_slots_per_class = slot_logits.shape
    unit = slot_logits / slot_logits.norm(dim=1, keepdim=True).clamp_min(1e-8)
    gram = torch.einsum("cpi,cpj->cij", unit, unit)  # (C, S, S)
    return gram.sum() / (num_classes * num_slots_per_class) - 1


def l1_off_class_loss(last_layer_weight: torch.Tensor, num_slots_per_class: int) -> torch.Tensor:
    """‖W ⊙ (1 − identity)‖₁ over the `(C, C·S)` last-layer weights: only connections to other classes' slots."""
    num_classes = last_layer_weight.shape[0]
    own = torch.arange(last_layer_weight.shape[1], device=last_layer_weight.device) // num_slots_per_class
    off_class = own[None, :] != torch.arange(num_classes, device=last_layer_weight.device)[:, None]
    return (last_layer_weight * off_class).abs().sum()


def cell_object_shares(object_mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`(N, H, W)` the object share of the input pixels under each latent cell.

    Args:
        object_mask: `(N, H_in, W_in)` True on object pixels, at the model's input size.
        size: the latent map's `(H, W)`; cell (h, w) covers the input pixels adaptive average pooling gives it.
    """
    return F.adaptive_avg_pool2d(torch.as_tensor(object_mask)[:, None].float(), tuple(size))[:, 0]


def background_cells(object_mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`(N, H, W)` True where a latent cell is background: `cell_object_shares` under `BACKGROUND_BELOW`."""
    return cell_object_shares(object_mask, size) < BACKGROUND_BELOW


def background_loss(distances: torch.Tensor, object_mask: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Push every prototype's nearest background patch `margin` farther than its nearest object patch.

    Not in the official method. Mean over (image, prototype) of relu(min_object d − min_background d + margin), over
    the images that have both object and background cells (0 when none has).

    Args:
        distances: `(N, P, H, W)` squared distances of every latent patch to every prototype.
        object_mask: `(N, H_in, W_in)` True on object pixels, at the model's input size.
        margin: the squared-distance margin.

    Returns:
        Scalar loss.

    Example:
        ```python
        >>> import torch
        >>> from protopool_hf.losses import background_loss
        >>> distances = torch.tensor([[[[1.0, 4.0]]]])  # (N=1, P=1, H=1, W=2): closest on the left cell
        >>> mask = torch.tensor([[[False, True]]])  # object on the right half only
        >>> background_loss(distances, mask, margin=1.0)  # relu(4 - 1 + 1)
        tensor(4.)

        ```
    """
    background = background_cells(object_mask, tuple(distances.shape[-2:]))[:, None]  # (N, 1, H, W)
    largest = torch.finfo(distances.dtype).max
    nearest_object = distances.masked_fill(background, largest).flatten(2).amin(dim=2)  # (N, P)
    nearest_background = distances.masked_fill(~background, largest).flatten(2).amin(dim=2)  # (N, P)
    both = background.flatten(1).any(dim=1) & ~background.flatten(1).all(dim=1)  # (N,)
    hinge = F.relu(nearest_object - nearest_background + margin)[both]
    return hinge.mean() if hinge.numel() else distances.new_zeros(())


def mixup_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, mixup_labels: torch.Tensor | None = None, mixup_lambda: float = 1.0
) -> torch.Tensor:
    """Cross-entropy, optionally on mixup targets: λ·CE(logits, labels) + (1 − λ)·CE(logits, mixup_labels)."""
    loss = F.cross_entropy(logits, labels)
    if mixup_labels is None or mixup_lambda == 1.0:
        return loss
    return mixup_lambda * loss + (1 - mixup_lambda) * F.cross_entropy(logits, mixup_labels)


def all_loss_terms(
    logits: torch.Tensor,
    min_distances: torch.Tensor,
    slot_assignment: torch.Tensor,
    slot_logits: torch.Tensor,
    last_layer_weight: torch.Tensor,
    labels: torch.Tensor,
    mixup_labels: torch.Tensor | None = None,
    mixup_lambda: float = 1.0,
    distances: torch.Tensor | None = None,
    object_mask: torch.Tensor | None = None,
    background_margin: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The five unweighted terms of one forward pass as the official code computes them, and the background term.

    Args:
        logits: `(N, C)`.
        min_distances: `(N, P)` each prototype's smallest distance over the map.
        slot_assignment: `(C, P, S)` the assignment used in the forward pass.
        slot_logits: `(C, P, S)` the raw logits Θ (orthogonality).
        last_layer_weight: `(C, C·S)` (L1).
        labels: `(N,)` class indices of the original (unmixed) images: cluster and separation use them.
        mixup_labels: `(N,)` the labels of the images mixed in; CE is then λ·CE(labels) + (1 − λ)·CE(mixup_labels).
        mixup_lambda: the mixup coefficient λ.
        distances: `(N, P, H, W)` every patch's distance to every prototype (the background term).
        object_mask: `(N, H_in, W_in)` object pixels of the images: with `distances`, adds the `background` term.
        background_margin: the margin of the background term.

    Returns:
        `{"cross_entropy", "cluster", "separation", "orthogonality", "l1"}` scalars, and `"background"` when an
        object mask is given.
    """
    num_slots_per_class = slot_logits.shape[2]
    class_assignment = slot_assignment[labels]  # (N, P, S)
    terms = {
        "cross_entropy": mixup_cross_entropy(logits, labels, mixup_labels, mixup_lambda),
        "cluster": cluster_loss(min_distances, class_assignment, num_slots_per_class),
        "separation": separation_loss(min_distances, class_assignment, num_slots_per_class),
        "orthogonality": orthogonality_loss(slot_logits),
        "l1": l1_off_class_loss(last_layer_weight, num_slots_per_class),
    }
    if object_mask is not None and distances is not None:
        terms["background"] = background_loss(distances, object_mask, background_margin)
    return terms


def weighted_total(terms: dict[str, torch.Tensor], weights: LossWeights) -> torch.Tensor:
    """CE + w_clst·cluster − w_sep·separation + w_orth·orth + w_l1·L1 + w_bg·background, over the terms present."""
    signs = {"separation": -1.0}
    total = None
    for name, value in terms.items():
        weight = getattr(weights, name)
        if weight == 0:
            continue
        contribution = signs.get(name, 1.0) * weight * value
        total = contribution if total is None else total + contribution
    if total is None:
        raise ValueError("All loss weights are zero: nothing to train. Set at least one weight > 0 in the config.")
    return total
