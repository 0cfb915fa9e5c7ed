"""Explanations: slot contributions add up to the logits, top-k classes, heat maps, rendering, loading, errors."""

import json
import math

import numpy as np
import PIL.Image
import PIL.ImageDraw
import pytest
import torch
from photo_fixtures import NAMES, PHOTOS, give_provenance, photo_model

from protopool_hf.explanation import Explanation, explain
from protopool_hf.gallery import save_prototype_images
from protopool_hf.maps import model_view, preprocess, prototype_activation
from protopool_hf.pictures import render_prototypes


NUM_SLOTS = 2  # photo_model's slots per class


def model_outputs(model, image):
    with torch.no_grad():
        return model(preprocess(image, model.config))


def assert_sums_to_logit(explanation: Explanation) -> None:
    total = math.fsum(s.contribution for s in explanation.slots)
    assert abs(total - explanation.logit) < 1e-5
    assert explanation.to_dict()["sum_of_contributions"] == pytest.approx(total)


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("index", range(4))
def test_contributions_sum_to_every_logit(projected, index):
    outputs = model_outputs(projected, PHOTOS[index])
    weights = projected.head.last_layer.weight
    for c in range(4):
        explanation = explain(projected, PHOTOS[index], class_id=c)
        assert explanation.logit == pytest.approx(float(outputs.logits[0, c]), abs=1e-5)
        assert_sums_to_logit(explanation)
        # Untouched last layer: exactly the class's own S slots, with weight 1.
        assert sorted((s.class_id, s.slot) for s in explanation.slots) == [(c, 0), (c, 1)]
        for s in explanation.slots:
            assert s.similarity == pytest.approx(float(outputs.similarities[0, s.class_id, s.slot]), abs=1e-6)
            assert s.weight == float(weights[c, s.class_id * NUM_SLOTS + s.slot].detach())
            assert s.contribution == pytest.approx(s.weight * s.similarity)
            assert s.prototype_id == (c if s.slot == 0 else c + 4)


def test_contributions_include_off_class_slots_after_fine_tuning(dataset):
    model = photo_model(seed=1)
    give_provenance(model, dataset)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        weight = model.head.last_layer.weight
        weight.add_(0.3 * torch.randn(weight.shape, generator=generator))
        weight[1, 2 * NUM_SLOTS + 1] = 0.0  # an exact zero is left out
    outputs = model_outputs(model, PHOTOS[1])
    for c in range(4):
        explanation = explain(model, PHOTOS[1], class_id=c)
        assert explanation.logit == pytest.approx(float(outputs.logits[0, c]), abs=1e-5)
        assert_sums_to_logit(explanation)
        nonzero = int((model.head.last_layer.weight[c] != 0).sum())
        assert len(explanation.slots) == nonzero
        assert {s.class_id for s in explanation.slots} == set(range(4))
    contributions = [s.contribution for s in explain(model, PHOTOS[1], class_id=1).slots]
    assert contributions == sorted(contributions, reverse=True)
    assert len(contributions) == 4 * NUM_SLOTS - 1


def test_soft_assignment_contributions_still_sum(dataset):
    model = photo_model(seed=2)
    assert not model.is_assignment_hard
    explanation = explain(model, PHOTOS[0])
    assert_sums_to_logit(explanation)
    assert not explanation.hard_assignment
    assert explanation.to_dict()["hard_assignment"] is False
    # Each slot mixes the pool: its map is φ of the assignment-weighted distance map, not one prototype's map.
    assert all(s.feature_activation.shape == (5, 5) for s in explanation.slots)


def test_top_k_probabilities(projected):
    outputs = model_outputs(projected, PHOTOS[3])
    probabilities = torch.softmax(outputs.logits[0].double(), dim=0)
    explanation = explain(projected, PHOTOS[3], top_k=3)
    values = [p for _, _, p in explanation.top_classes]
    assert len(values) == 3
    assert values == sorted(values, reverse=True)
    assert sum(values) <= 1 + 1e-9
    assert explanation.predicted_class == int(outputs.logits.argmax())
    assert explanation.top_classes[0][0] == explanation.predicted_class == explanation.class_id
    for c, label, p in explanation.top_classes:
        assert label == NAMES[c]
        assert p == pytest.approx(float(probabilities[c]))
    everything = explain(projected, PHOTOS[3], top_k=10).top_classes
    assert len(everything) == 4
    assert sum(p for _, _, p in everything) == pytest.approx(1.0)


def test_heat_maps_and_boxes_fit_the_model_view(projected):
    explanation = explain(projected, PHOTOS[2])  # 1024 × 683: resized and centre-cropped to 160 × 160
    assert explanation.image.size == (160, 160)
    np.testing.assert_array_equal(np.asarray(explanation.image), np.asarray(model_view(PHOTOS[2], projected.config)))
    for slot in explanation.slots:
        assert slot.activation.shape == (160, 160)
        assert slot.feature_activation.shape == (5, 5)
        top, bottom, left, right = slot.box
        assert 0 <= top < bottom <= 160
        assert 0 <= left < right <= 160
        # Hard assignment: the slot's map is its prototype's map.
        np.testing.assert_allclose(
            slot.activation, prototype_activation(projected, PHOTOS[2], slot.prototype_id), rtol=1e-5, atol=1e-5
        )
        assert slot.location == np.unravel_index(slot.feature_activation.argmax(), (5, 5))


def test_a_prototype_fires_where_it_was_projected(projected):
    """Prototype 2 is a patch of the drum photo at cell (3, 3): explaining that photo, it fires there."""
    explanation = explain(projected, PHOTOS[2], class_id=2)
    slot = next(s for s in explanation.slots if s.prototype_id == 2)
    assert slot.location == (3, 3)
    top, bottom, left, right = slot.box
    assert top <= 3.5 * 32 < bottom
    assert left <= 3.5 * 32 < right


def test_image_as_pil_path_or_tensor(projected):
    by_path = explain(projected, PHOTOS[1])
    by_pil = explain(projected, PIL.Image.open(PHOTOS[1]))
    pixels = preprocess(PHOTOS[1], projected.config)
    by_batch, by_tensor = explain(projected, pixels), explain(projected, pixels[0])
    for other in (by_pil, by_batch, by_tensor):
        np.testing.assert_array_equal(other.logits, by_path.logits)
        assert [s.to_dict() for s in other.slots] == [s.to_dict() for s in by_path.slots]
    assert np.abs(np.asarray(by_tensor.image, int) - np.asarray(by_path.image, int)).max() <= 1
    grey = PIL.Image.open(PHOTOS[1]).convert("LA")
    assert explain(projected, grey).image.mode == "RGB"


def test_class_by_name_and_errors(projected):
    assert explain(projected, PHOTOS[0], class_id="drum").class_id == 2
    with pytest.raises(ValueError, match="not a class name"):
        explain(projected, PHOTOS[0], class_id="cat")
    with pytest.raises(ValueError, match=r"class_id must be in \[0, 4\)"):
        explain(projected, PHOTOS[0], class_id=4)
    with pytest.raises(ValueError, match="top_k"):
        explain(projected, PHOTOS[0], top_k=0)
    with pytest.raises(FileNotFoundError, match=r"no-such\.jpg"):
        explain(projected, "no-such.jpg")
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        explain(projected, torch.zeros(2, 3, 160, 160))


def test_model_mode_is_restored(dataset):
    model = photo_model().train()
    model.backbone.bn1.eval()  # e.g. frozen batch norm statistics
    explain(model, PHOTOS[0])
    assert model.training
    assert not model.backbone.bn1.training
    assert all(m.training for name, m in model.named_modules() if name != "backbone.bn1")


def test_to_dict_is_json(projected):
    data = json.loads(json.dumps(explain(projected, PHOTOS[3], top_k=2).to_dict()))
    assert data["predicted_label"] == NAMES[data["predicted_class"]]
    assert len(data["top_classes"]) == 2
    assert {"prototype_id", "similarity", "weight", "contribution", "box", "location"} <= set(data["slots"][0])
    assert data["image_size"] == {"height": 160, "width": 160}


# --------------------------------------------------------------------------- loading


def test_model_loaded_from_a_folder_and_its_processor(projected, dataset, tmp_path):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    projected.save_pretrained(tmp_path)
    save_prototype_images(projected, dataset, tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert loaded.is_assignment_hard
    reference = explain(projected, PHOTOS[3])
    again = explain(loaded, PHOTOS[3])
    np.testing.assert_allclose(again.logits, reference.logits, atol=1e-6)
    assert [s.prototype_id for s in again.slots] == [s.prototype_id for s in reference.slots]
    # The loaded model's folder has prototypes/: its pictures are found without being named.
    found = np.asarray(again.render(max_slots=1), dtype=int)
    named = np.asarray(reference.render(prototype_images=tmp_path, max_slots=1), dtype=int)
    without = np.asarray(reference.render(max_slots=1), dtype=int)  # built in memory: no folder
    assert np.abs(found - named).mean() < 0.5
    assert np.abs(found - without).mean() > 2
    # A square photo: the stock image processor preprocesses as the config does (to rounding).
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    with_processor = explain(loaded, PHOTOS[3], processor=processor)
    np.testing.assert_allclose(with_processor.logits, reference.logits, atol=1e-2)
    assert_sums_to_logit(with_processor)
    assert with_processor.image.size == (160, 160)


def test_model_loaded_with_remote_code(projected, tmp_path):
    from transformers import AutoModelForImageClassification

    projected.save_pretrained(tmp_path)
    remote = AutoModelForImageClassification.from_pretrained(tmp_path, trust_remote_code=True).eval()
    explanation = explain(remote, PHOTOS[0])
    np.testing.assert_allclose(explanation.logits, explain(projected, PHOTOS[0]).logits, atol=1e-6)
    assert_sums_to_logit(explanation)


# --------------------------------------------------------------------------- rendering


def test_render_with_dataset_folder_mapping_or_nothing(projected, dataset, tmp_path):
    explanation = explain(projected, PHOTOS[0], top_k=3)
    plain = explanation.render(max_slots=2, thumb_size=96)
    with_data = explanation.render(dataset=dataset, max_slots=2, thumb_size=96)  # draws the 2 shown prototypes
    save_prototype_images(projected, dataset, tmp_path)  # draws every prototype, the 4 photos in one batch
    from_folder = explanation.render(prototype_images=tmp_path / "prototypes", max_slots=2, thumb_size=96)
    shown = sorted({s.prototype_id for s in explanation.slots[:2]})
    from_shown = explanation.render(
        prototype_images=render_prototypes(projected, dataset, shown), max_slots=2, thumb_size=96
    )
    every = render_prototypes(projected, dataset)
    from_every = explanation.render(prototype_images=every, max_slots=2, thumb_size=96)
    for image in (plain, with_data, from_folder, from_shown, from_every):
        assert image.mode == "RGB"
        assert image.size == plain.size
    # Like with like: another batch of photos runs other kernels, and phi(d) amplifies their float32 rounding.
    assert np.array_equal(np.asarray(with_data), np.asarray(from_shown))
    assert np.array_equal(np.asarray(from_every), np.asarray(from_folder))  # PNG is lossless
    assert not np.array_equal(np.asarray(plain), np.asarray(with_data))
    shorter = explanation.render(max_slots=1, thumb_size=96)
    assert shorter.height < plain.height
    assert explanation.render(max_slots=5, thumb_size=96).size == plain.size  # only S = 2 slots to show
    with pytest.raises(ValueError, match="not both"):
        explanation.render(prototype_images=tmp_path, dataset=dataset)
    with pytest.raises(FileNotFoundError, match="save_prototype_images"):
        explanation.render(prototype_images=tmp_path / "missing")


@pytest.mark.parametrize("thumb_size", [96, 176])
def test_render_without_pictures_says_what_cli_and_library_users_can_do(projected, monkeypatch, thumb_size):
    drawn = []
    text = PIL.ImageDraw.ImageDraw.text

    def record(self, xy, words, *args, **kwargs):
        drawn.append((words, kwargs.get("font")))
        return text(self, xy, words, *args, **kwargs)

    monkeypatch.setattr(PIL.ImageDraw.ImageDraw, "text", record)
    explain(projected, PHOTOS[0]).render(max_slots=1, thumb_size=thumb_size)  # an in-memory model: no folder
    start = next(i for i, (words, _) in enumerate(drawn) if words.startswith("no picture"))
    end = next(i for i in range(start, len(drawn)) if "prototype_images=" in drawn[i][0])  # the note is whole
    told = " ".join(words for words, _ in drawn[start : end + 1])
    assert "protopool-hf project" in told and "dataset=" in told
    for words, font in drawn[start : end + 1]:
        assert font.getlength(words) <= 2 * thumb_size - 10  # inside the prototype's two picture cells


def test_explain_is_the_function_after_every_module_is_imported():
    import importlib
    import inspect
    import pkgutil

    import protopool_hf

    for info in pkgutil.iter_modules(protopool_hf.__path__):
        importlib.import_module(f"protopool_hf.{info.name}")
    from protopool_hf import explain as by_name

    assert inspect.isfunction(by_name) and by_name is explain and protopool_hf.explain is explain


def test_render_needs_a_projected_model_for_dataset_pictures(dataset):
    explanation = explain(photo_model(), PHOTOS[0])
    explanation.render()  # no pictures asked for: fine
    with pytest.raises(ValueError, match="project_prototypes"):
        explanation.render(dataset=dataset)


def test_save_png_and_json(projected, tmp_path):
    explanation = explain(projected, PHOTOS[3])
    png = explanation.save(tmp_path / "out" / "why.png", max_slots=1)
    with PIL.Image.open(png) as image:
        assert image.format == "PNG"
        image.verify()
    data = json.loads(explanation.save(tmp_path / "why.json").read_text())
    assert data["class_id"] == explanation.class_id
