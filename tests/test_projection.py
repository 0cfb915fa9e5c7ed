"""Prototype projection: brute-force equality, ties, inputs, provenance round trip, pruning, 2 processes."""

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from protopool_hf import ProtoPoolForImageClassification
from protopool_hf.losses import background_cells
from protopool_hf.projection import ProjectionResult, project_prototypes, prune_unused_prototypes


SCRIPT = Path(__file__).parent / "scripts" / "projection_ddp.py"
_spec = importlib.util.spec_from_file_location("projection_ddp", SCRIPT)
ddp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ddp)

build_model, build_examples = ddp.build_model, ddp.build_examples
CLASS_PROTOTYPES = ddp.CLASS_PROTOTYPES
UNUSED = [5, 6]


def stacked(examples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([e["pixel_values"] for e in examples]), torch.tensor([e["labels"] for e in examples])


def brute_force(
    model: ProtoPoolForImageClassification, examples: list[dict], allowed: list[torch.Tensor] | None = None
) -> dict[int, tuple]:
    """Nearest patch per used prototype with Python loops: (distance, image, row, col, label, vector); only the cells
    where `allowed[i]` `(H, W)` is True, when given."""
    model.eval()
    prototypes = model.head.prototypes.detach().clone()
    with torch.no_grad():
        latents = [model.latent_map(e["pixel_values"][None])[0] for e in examples]
    best = {}
    for p in range(prototypes.shape[0]):
        classes = [c for c, used in enumerate(CLASS_PROTOTYPES) if p in used]
        for i, (example, latent) in enumerate(zip(examples, latents, strict=True)):
            if example["labels"] not in classes:
                continue
            for r in range(latent.shape[1]):
                for c in range(latent.shape[2]):
                    if allowed is not None and not allowed[i][r, c]:
                        continue
                    d = float(((latent[:, r, c] - prototypes[p]) ** 2).sum())
                    if p not in best or d < best[p][0]:  # strict: the first (lowest index, row, col) wins ties
                        best[p] = (d, i, r, c, example["labels"], latent[:, r, c].clone())
    return best


def assert_same_result(a: ProjectionResult, b: ProjectionResult) -> None:
    for name in ("image_index", "row", "col", "label"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    torch.testing.assert_close(a.distance, b.distance, equal_nan=True)
    assert (a.unused, a.unmatched, a.duplicates, a.num_images) == (b.unused, b.unmatched, b.duplicates, b.num_images)


def test_model_builder_gives_the_intended_assignment():
    assert build_model().class_to_prototypes().tolist() == CLASS_PROTOTYPES


def test_projection_equals_brute_force_search():
    examples = build_examples(12)
    model = build_model()
    before = model.head.prototypes.detach().clone()
    expected = brute_force(model, examples)
    assert sorted(expected) == [0, 1, 2, 3, 4]
    # The shared prototype 3 must be able to land on either class: check both classes held a candidate.
    assert {e["labels"] for e in examples} >= {1, 2}

    result = project_prototypes(model, examples, batch_size=5, dataset_name="toy")

    for p, (distance, image, row, col, label, vector) in expected.items():
        assert (int(result.image_index[p]), int(result.row[p]), int(result.col[p])) == (image, row, col), p
        assert int(result.label[p]) == label
        assert label in [c for c, used in enumerate(CLASS_PROTOTYPES) if p in used]
        assert math.isclose(float(result.distance[p]), distance, rel_tol=1e-4, abs_tol=1e-5)
        torch.testing.assert_close(model.head.prototypes[p].detach(), vector, rtol=0, atol=1e-5)
    # Unused prototypes: reported, left unchanged (not zeroed), provenance -1 / nan.
    assert result.unused == UNUSED and result.used == [0, 1, 2, 3, 4]
    assert torch.equal(model.head.prototypes[UNUSED].detach(), before[UNUSED])
    assert result.image_index[UNUSED].tolist() == [-1, -1] and result.distance[UNUSED].isnan().all()
    assert result.is_projected.tolist() == [True] * 5 + [False] * 2
    assert result.num_images == 12 and result.input_size == [3, 96, 96] and result.unmatched == []
    assert model.is_assignment_hard
    text = result.summary(per_prototype=True)
    assert "5/7 prototypes projected" in text and "prototype 6: not projected" in text and "'toy'" in text
    assert repr(result) == result.summary()


def test_projection_restricted_to_objects_takes_object_cells_only():
    examples = build_examples(12)
    model = build_model().eval()
    with torch.no_grad():
        height, width = model.latent_map(examples[0]["pixel_values"][None]).shape[-2:]
    size = examples[0]["pixel_values"].shape[-2:]
    for i, example in enumerate(examples):  # the object: the left half, the right half, or nothing (image 5)
        mask = torch.zeros(size, dtype=torch.bool)
        if i != 5:
            mask[:, : size[1] // 2] = bool(i % 2)
            mask[:, size[1] // 2 :] = not i % 2
        example["object_mask"] = mask
    allowed = [~background_cells(e["object_mask"][None], (height, width))[0] for e in examples]
    expected = brute_force(model, examples, allowed)
    unrestricted = brute_force(model, examples)
    assert any(expected[p][1:4] != unrestricted[p][1:4] for p in expected)  # the restriction changes something

    result = project_prototypes(model, examples, batch_size=5, restrict_to_objects=True)

    for p, (_, image, row, col, _, vector) in expected.items():
        assert (int(result.image_index[p]), int(result.row[p]), int(result.col[p])) == (image, row, col), p
        assert allowed[image][row, col] and image != 5
        torch.testing.assert_close(model.head.prototypes[p].detach(), vector, rtol=0, atol=1e-5)
    # Masks missing or of another size: one message, before the prototypes move.
    model = build_model()
    before = model.head.prototypes.detach().clone()
    for bad, match in (({}, "no `object_mask`"), ({"object_mask": torch.ones(3, 3, dtype=torch.bool)}, "shape")):
        data = [{k: v for k, v in e.items() if k != "object_mask"} | bad for e in examples]
        with pytest.raises(ValueError, match=match):
            project_prototypes(model, data, batch_size=5, restrict_to_objects=True)
    assert torch.equal(model.head.prototypes.detach(), before)


def test_projected_prototype_is_the_latent_patch_exactly():
    examples = build_examples(8)
    model = build_model().eval()
    pixel_values, _ = stacked(examples)
    with torch.no_grad():
        latent = model.latent_map(pixel_values)

    result = project_prototypes(model, examples, batch_size=len(examples))

    for p in range(5):
        i, r, c = int(result.image_index[p]), int(result.row[p]), int(result.col[p])
        assert torch.equal(model.head.prototypes[p].detach(), latent[i, :, r, c])
    with torch.no_grad():
        min_distances = model(pixel_values).min_distances
    projected_on = min_distances[result.image_index[:5], torch.arange(5)]
    assert projected_on.max() < 1e-5


def test_ties_go_to_the_lowest_image_index_then_row_then_column():
    # A constant latent map: every patch of every image is at the same distance of a prototype.
    examples = build_examples(9)
    model = build_model()
    with torch.no_grad():
        model.head.add_on[0].weight.zero_()
    first_of_class = {label: min(i for i, e in enumerate(examples) if e["labels"] == label) for label in range(3)}

    result = project_prototypes(model, examples, batch_size=2)

    for p in range(5):
        classes = [c for c, used in enumerate(CLASS_PROTOTYPES) if p in used]
        assert int(result.image_index[p]) == min(first_of_class[c] for c in classes)
        assert (int(result.row[p]), int(result.col[p])) == (0, 0)
    # Prototypes 0 and 1 (class 0) landed on the same patch, as did 2 and 3 (class 1's first image).
    assert result.duplicates == [[0, 1], [2, 3]]


def test_duplicate_images_tie_to_the_lowest_index_even_when_shuffled():
    examples = build_examples(6)
    # Images 1 and 4 (class 1) and 2 and 5 (class 2) are copies: their patches tie exactly.
    for copy, source in ((4, 1), (5, 2)):
        examples[copy]["pixel_values"] = examples[source]["pixel_values"].clone()
        assert examples[copy]["labels"] == examples[source]["labels"]
    # One image per forward pass: a copy then goes through exactly the computation of its source, so the tie is
    # exact on any machine (in batches of 2, the copies meet different neighbours when shuffled, and a conv or
    # matrix-multiply kernel may round differently for another batch, which would break the tie by rounding).
    reference = project_prototypes(build_model(), examples, batch_size=1)

    loader = DataLoader(examples, batch_size=1, shuffle=True, generator=torch.Generator().manual_seed(0))
    shuffled = project_prototypes(build_model(), loader)

    assert_same_result(reference, shuffled)
    assert reference.image_index[[2, 3, 4]].max() <= 2  # never the copies 4, 5


def test_dataloader_with_and_without_index_and_map_style_inputs_agree():
    examples = build_examples(10)
    reference = project_prototypes(build_model(), examples, batch_size=3)

    plain = [{"pixel_values": e["pixel_values"], "labels": e["labels"]} for e in examples]
    assert_same_result(reference, project_prototypes(build_model(), DataLoader(plain, batch_size=4)))
    assert_same_result(reference, project_prototypes(build_model(), DataLoader(examples, batch_size=4)))

    class Examples(Dataset):
        def __len__(self) -> int:
            return len(plain)

        def __getitem__(self, i: int) -> dict:
            return dict(plain[i], image=object())  # extra fields are ignored

    assert_same_result(reference, project_prototypes(build_model(), Examples(), batch_size=4))


def test_hf_dataset_with_transform():
    datasets = pytest.importorskip("datasets")
    examples = build_examples(7)
    pixel_values, labels = stacked(examples)
    table = datasets.Dataset.from_dict({"x": pixel_values.numpy(), "label": labels.tolist()})

    def transform(batch: dict) -> dict:
        return {"pixel_values": [torch.as_tensor(x) for x in batch["x"]], "labels": batch["label"]}

    result = project_prototypes(build_model(), table.with_transform(transform), batch_size=3)

    assert_same_result(project_prototypes(build_model(), examples, batch_size=3), result)
    assert result.dataset_name == f"fingerprint:{table.with_transform(transform)._fingerprint}"


def test_training_modes_are_restored_and_harden_is_optional():
    model = build_model().train()
    model.backbone.bn1.eval()  # e.g. BatchNorm statistics frozen during warm-up

    project_prototypes(model, build_examples(4), harden=False)

    assert model.training and model.head.training and not model.backbone.bn1.training
    assert not model.is_assignment_hard
    assert model.head.prototypes.requires_grad


def test_unmatched_prototypes_warn_and_stay():
    examples = [e for e in build_examples(9) if e["labels"] != 2]  # no image of class 2
    model = build_model()
    before = model.head.prototypes.detach().clone()

    with pytest.warns(UserWarning, match=r"Prototypes \[4\].*classes \[2\]"):
        result = project_prototypes(model, examples)

    assert result.unmatched == [4] and result.unused == UNUSED
    assert int(result.label[3]) == 1  # the shared prototype still found class 1's images
    assert torch.equal(model.head.prototypes[4].detach(), before[4])
    assert "unmatched" in result.summary()


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        ({"pixel_values": torch.zeros(2, 3, 96, 96)}, r"has no \['labels'\]"),
        ({"labels": torch.tensor([0, 1])}, r"has no \['pixel_values'\]"),
        (
            {"pixel_values": torch.zeros(2, 3, 96, 96), "labels": torch.tensor([0, 3])},
            r"holds \[3\], outside \[0, 3\)",
        ),
        ({"pixel_values": torch.zeros(2, 3, 96, 96), "labels": torch.tensor([-1, 0])}, r"holds \[-1\]"),
        ({"pixel_values": torch.zeros(2, 3, 96, 96), "labels": torch.rand(2, 3)}, r"integer class indices"),
        ({"pixel_values": torch.zeros(3, 96, 96), "labels": torch.tensor([0])}, r"expected \(N, 3, H, W\)"),
        ((torch.zeros(2, 3, 96, 96), torch.tensor([0, 1])), r"batch 0 is a tuple"),
    ],
)
def test_bad_batches_raise_clear_errors(batch, match):
    model = build_model().train()
    before = model.head.prototypes.detach().clone()
    with pytest.raises(ValueError, match=match):
        project_prototypes(model, iter([batch]))
    assert torch.equal(model.head.prototypes.detach(), before) and model.training


def test_bad_map_style_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="dicts with `pixel_values`"):
        project_prototypes(build_model(), [{"image": torch.zeros(3, 96, 96), "label": 0}])

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from build_examples(2)

    with pytest.raises(ValueError, match="wrap it in a `DataLoader"):
        project_prototypes(build_model(), Stream())


def test_provenance_survives_save_and_load(tmp_path):
    model = build_model()
    result = project_prototypes(model, build_examples(6), batch_size=4, dataset_name="toy-train")
    model.save_pretrained(tmp_path)

    loaded = ProtoPoolForImageClassification.from_pretrained(tmp_path)

    assert loaded.config.projection_dataset == "toy-train"
    assert loaded.config.projection_input_size == [3, 96, 96]
    assert loaded.is_assignment_hard
    torch.testing.assert_close(loaded.head.prototypes, model.head.prototypes, rtol=0, atol=0)
    head = loaded.head
    assert torch.equal(head.projection_image_index, result.image_index)
    assert torch.equal(head.projection_row, result.row) and torch.equal(head.projection_col, result.col)
    assert torch.equal(head.projection_label, result.label)
    torch.testing.assert_close(head.projection_distance, result.distance, equal_nan=True)


def test_prune_unused_prototypes_keeps_predictions(tmp_path):
    model = build_model().eval()
    with pytest.raises(ValueError, match="needs a hard assignment"):
        prune_unused_prototypes(model)
    result = project_prototypes(model, build_examples(6))
    pixel_values, _ = stacked(build_examples(3))
    with torch.no_grad():
        logits = model(pixel_values).logits

    kept = prune_unused_prototypes(model)

    assert kept.tolist() == result.used == [0, 1, 2, 3, 4]
    assert model.config.num_prototypes == 5 and model.head.prototypes.shape == (5, 8)
    assert model.class_to_prototypes().tolist() == CLASS_PROTOTYPES
    assert torch.equal(model.head.projection_image_index, result.image_index[kept])
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values).logits, logits)
    model.save_pretrained(tmp_path)
    loaded = ProtoPoolForImageClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values).logits, logits)


@pytest.mark.slow  # two fresh Python processes importing torch, transformers and timm: 20-50 s on 2 cores
def test_two_processes_equal_one_process(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run([*command, str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [rank["world"] for rank in ranks] == [2, 2]

    model = build_model()
    single = project_prototypes(model, build_examples(), batch_size=4)
    for mode in ("dataset", "sampler"):
        first, second = ranks[0][mode], ranks[1][mode]
        # Every process ends with exactly the same prototypes and provenance...
        for name in ("prototypes", "image_index", "row", "col", "label"):
            assert torch.equal(first[name], second[name]), (mode, name)
        torch.testing.assert_close(first["distance"], second["distance"], rtol=0, atol=0, equal_nan=True)
        # ... equal to a 1-process run (the float values may differ in the last bits across thread counts).
        for name in ("image_index", "row", "col", "label"):
            assert torch.equal(first[name], getattr(single, name)), (mode, name)
        torch.testing.assert_close(first["distance"], single.distance, equal_nan=True)
        torch.testing.assert_close(first["prototypes"], model.head.prototypes.detach())
        assert first["unused"] == single.unused == UNUSED and first["hard"]
    assert ranks[0]["dataset"]["num_images"] == ddp.NUM_IMAGES
    assert ranks[0]["sampler"]["num_images"] == ddp.NUM_IMAGES + 1  # the DistributedSampler pads one image
    for rank in ranks:
        assert "give its batches an `index` field" in rank["no_index_error"]
    assert ranks[0]["peer_error"].startswith("RuntimeError: Prototype projection failed on process(es) [1]")
    assert ranks[1]["peer_error"].startswith("ValueError: `labels` of projection batch 0 holds [7]")
