"""2-process projection check, started by tests/test_projection.py with `torchrun --nproc_per_node 2`.

Each process projects fresh copies of the same model (CPU, gloo) in several ways and saves what it got to
`<out>/rank<r>.pt`; the test compares the processes with each other and with a 1-process run. The model and data
builders are imported by the test too, so both sides use the same ones.

Usage: torchrun --standalone --nproc_per_node 2 tests/scripts/projection_ddp.py OUT_DIR
"""

import copy
import functools
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from protopool_tiny import tiny_model
from torch.utils.data import DataLoader, DistributedSampler

from protopool_hf import ProtoPoolForImageClassification
from protopool_hf.projection import project_prototypes


NUM_IMAGES = 13  # odd, so the shards differ in size
INPUT_SIZE = [3, 96, 96]
# class -> its slots' prototypes: prototype 3 is shared by classes 1 and 2, prototypes 5 and 6 are unused.
CLASS_PROTOTYPES = [[0, 1], [2, 3], [3, 4]]
NUM_PROTOTYPES = 7


def build_model() -> ProtoPoolForImageClassification:
    """A fresh copy of the same model on every call: seeded weights, slot logits that give `CLASS_PROTOTYPES`."""
    return copy.deepcopy(_base_model())


@functools.cache
def _base_model() -> ProtoPoolForImageClassification:
    model = tiny_model(0, num_labels=len(CLASS_PROTOTYPES), num_prototypes=NUM_PROTOTYPES, input_size=INPUT_SIZE)
    with torch.no_grad():
        model.head.slot_logits.zero_()
        for label, prototypes in enumerate(CLASS_PROTOTYPES):
            for slot, prototype in enumerate(prototypes):
                model.head.slot_logits[label, prototype, slot] = 5.0
    return model


def build_examples(num_images: int = NUM_IMAGES) -> list[dict[str, torch.Tensor | int]]:
    """Seeded examples with `pixel_values`, `labels` and `index`."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(num_images, *INPUT_SIZE, generator=generator)
    return [{"pixel_values": images[i], "labels": i % 3, "index": i} for i in range(num_images)]


def record(model: ProtoPoolForImageClassification, result) -> dict[str, object]:
    return {
        "prototypes": model.head.prototypes.detach().clone(),
        "image_index": result.image_index,
        "row": result.row,
        "col": result.col,
        "distance": result.distance,
        "label": result.label,
        "unused": result.unused,
        "num_images": result.num_images,
        "hard": model.is_assignment_hard,
    }


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    examples = build_examples()
    outcome: dict[str, object] = {"world": world}

    # A map-style dataset: project_prototypes shards it in contiguous ranges.
    model = build_model()
    outcome["dataset"] = record(model, project_prototypes(model, examples, batch_size=4))

    # A DataLoader sharded by a DistributedSampler (strided, padded), whose batches carry `index`.
    model = build_model()
    sampler = DistributedSampler(examples, shuffle=True, seed=3)
    loader = DataLoader(examples, batch_size=3, sampler=sampler)
    outcome["sampler"] = record(model, project_prototypes(model, loader))

    # The same loader without `index` is refused on every process (positions are not image indices).
    plain = [{k: v for k, v in example.items() if k != "index"} for example in examples]
    try:
        project_prototypes(build_model(), DataLoader(plain, batch_size=3, sampler=DistributedSampler(plain)))
    except ValueError as exc:
        outcome["no_index_error"] = str(exc)

    # Bad labels on process 1 only: it raises its ValueError, the others a RuntimeError, nobody hangs.
    bad = [dict(example, labels=7) if rank == 1 else example for example in examples]
    try:
        project_prototypes(build_model(), DataLoader(bad, batch_size=4, sampler=DistributedSampler(bad)))
    except (ValueError, RuntimeError) as exc:
        outcome["peer_error"] = f"{type(exc).__name__}: {exc}"

    torch.save(outcome, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
