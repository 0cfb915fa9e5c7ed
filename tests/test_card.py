"""protopool_hf.card: the model card's metadata, its sections, and updates of a card someone edited.

Regenerate the golden card with `PROTOPOOL_UPDATE_GOLDEN=1 pytest tests/test_card.py -k golden` and review the diff.
"""

import json
import logging
import os
from pathlib import Path

import pytest
from card_fixtures import DATASET, GALLERY, METRICS, PICTURES, REPO, REPORT, TRAINING, card_model
from huggingface_hub import EvalResult, ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results

from protopool_hf import ProtoPoolConfig
from protopool_hf import card as card_module
from protopool_hf.card import (
    ProtoPoolModelCardData,
    backbone_hub_id,
    load_metrics,
    merge_model_cards,
    render_model_card,
)


GOLDEN = Path(__file__).parent / "data" / "model_card_golden.md"


def golden_card() -> ModelCard:
    return render_model_card(
        card_model(),
        repo_id=REPO,
        card_data=ProtoPoolModelCardData(license="apache-2.0", tags=["birds"]),
        metrics=METRICS,
        dataset_name=DATASET,
        training_args=TRAINING,
        prototype_files=sorted(f"prototypes/prototype_{p:03d}.png" for p in PICTURES),
        gallery_file=GALLERY,
    )


def test_card_matches_the_golden_file():
    card = golden_card()
    if os.environ.get("PROTOPOOL_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(card.content, encoding="utf-8")
    assert card.content == GOLDEN.read_text(encoding="utf-8"), (
        "The model card changed: if on purpose, run PROTOPOOL_UPDATE_GOLDEN=1 pytest tests/test_card.py -k golden "
        "and review the diff of tests/data/model_card_golden.md."
    )
    # updating a card with itself changes nothing
    assert merge_model_cards(card, ModelCard(card.content)).content == card.content


def test_card_metadata_parses_back_with_huggingface_hubs_own_parser():
    card = ModelCard(golden_card().content)
    data = card.data
    assert data.library_name == "protopool-hf"
    assert data.pipeline_tag == "image-classification"
    assert data.tags == ["protopool", "prototype-network", "interpretability", "timm", "birds"]
    assert data.license == "apache-2.0" and data.datasets == [DATASET] and data.metrics == ["accuracy"]
    assert data.base_model is None  # test_resnet was not pretrained
    name, results = model_index_to_eval_results(data.to_dict()["model-index"])
    assert name == "protopool-tiny"
    assert [(r.task_type, r.dataset_type, r.dataset_split, r.metric_type, r.metric_value) for r in results] == [
        ("image-classification", DATASET, "validation", "accuracy", 0.75),
        ("image-classification", DATASET, "test", "accuracy", 0.5),
    ]
    assert [(r.dataset_split, r.metric_value) for r in data.eval_results] == [("validation", 0.75), ("test", 0.5)]


def test_card_body_shows_the_model():
    text = golden_card().text
    assert "| 2 | house \\| sparrow | [3](prototypes/prototype_003.png), [5](prototypes/prototype_005.png) |" in text
    assert "Unused: 4." in text and "1 of them by more than one slot" in text
    assert "![Prototype gallery" in text and f"]({GALLERY})" in text
    assert f'AutoModelForImageClassification.from_pretrained("{REPO}", trust_remote_code=True)' in text
    assert f'pipeline("image-classification", model="{REPO}", trust_remote_code=True)' in text
    assert "from protopool_hf import explain" in text
    assert "| validation | accuracy | 0.75 |" in text and "loss" not in text.split("## Evaluation")[1].split("##")[0]
    assert "| `learning_rate` | 0.001 |" in text
    assert "@inproceedings{rymarczyk2022interpretable" in text and "5×5 feature map" in text


def test_card_without_pictures_or_projection_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="protopool_hf.card"):
        card = render_model_card(card_model(projected=False), metrics={"accuracy": 0.9})
    assert "have not been projected" in card.text
    assert "your-namespace/protopool-test-resnet" in card.text  # no repo yet: a placeholder
    assert "model-index" not in card.data.to_dict() and "| — | accuracy | 0.9 |" in card.text
    assert "dataset_name=" in caplog.text  # the metrics need a dataset to be published as eval results
    card = render_model_card(card_model())
    assert "5 of the 6 prototypes were projected" in card.text and "pictures were not rendered" in card.text
    assert "](prototypes/" not in card.text


def test_eval_results_given_as_card_data_fill_the_evaluation_section():
    result = EvalResult("image-classification", DATASET, DATASET, "top5_accuracy", 0.97, dataset_split="test")
    data = ProtoPoolModelCardData(model_name="mine", eval_results=[result], license="mit")
    card = render_model_card(card_model(), card_data=data)
    assert "| test | top5_accuracy | 0.97 |" in card.text and card.data.eval_results == [result]
    assert card.data.model_name == "mine" and card.data.license == "mit"


def test_base_model_is_the_backbones_timm_repo_only_when_pretrained_from_timm():
    def config(**kwargs):
        return ProtoPoolConfig(num_labels=2, num_prototypes=4, num_slots_per_class=1, **kwargs)

    assert backbone_hub_id(config(backbone="resnet50")) is None
    assert backbone_hub_id(config(backbone="resnet50", backbone_pretrained=True)) == "timm/resnet50.a1_in1k"
    assert backbone_hub_id(config(backbone="resnet50.tv_in1k", backbone_pretrained=True)) == "timm/resnet50.tv_in1k"
    local = {"pretrained_cfg_overlay": {"file": "/weights/inat.pth"}}
    assert backbone_hub_id(config(backbone="resnet50", backbone_pretrained=True, backbone_kwargs=local)) is None
    other = {"pretrained_cfg_overlay": {"hf_hub_id": "me/resnet50-inat"}}
    assert backbone_hub_id(config(backbone="resnet50", backbone_pretrained=True, backbone_kwargs=other)) == (
        "me/resnet50-inat"
    )


def test_updating_a_card_keeps_the_users_text_and_metadata():
    first = render_model_card(card_model(), repo_id=REPO, metrics={"eval_accuracy": 0.5}, dataset_name=DATASET)
    user_note = "## My notes\n\nCollected   by hand.\n\n```\nkeep   spacing\n\n\n```"
    edited = ModelCard(first.content)
    edited.data.license, edited.data.tags, edited.data["my_key"] = "mit", ["birds"], 1
    edited.text = "\n# My title\n\nIntro.\n" + first.text.replace(
        "<!-- protopool-hf:begin classes -->", user_note + "\n\n<!-- protopool-hf:begin classes -->"
    )
    edited = ModelCard(str(edited))
    assert edited.data.license == "mit"
    updated = render_model_card(
        card_model(), repo_id=REPO, metrics={"eval_accuracy": 0.9}, dataset_name=DATASET, existing_card=edited
    )
    text = updated.text
    assert text.startswith("\n# My title\n\nIntro.\n\n<!-- protopool-hf:begin header -->")
    assert user_note in text
    assert text.index("## Prototypes") < text.index("## My notes") < text.index("## Classes and their prototypes")
    assert "| validation | accuracy | 0.9 |" in text and "| validation | accuracy | 0.5 |" not in text
    assert updated.data.license == "mit" and updated.data.my_key == 1
    assert updated.data.tags == ["birds", "protopool", "prototype-network", "interpretability", "timm"]
    assert [r.metric_value for r in updated.data.eval_results] == [0.9]
    # nothing new for the training and evaluation sections: they keep their content, and the model-index stays
    again = render_model_card(card_model(), repo_id=REPO, existing_card=updated)
    assert "| validation | accuracy | 0.9 |" in again.text and [r.metric_value for r in again.data.eval_results] == [
        0.9
    ]
    assert again.content == render_model_card(card_model(), repo_id=REPO, existing_card=again).content


def test_a_card_without_our_sections_is_kept_below_ours_unless_transformers_generated_it():
    mine = ModelCard("---\nlicense: mit\n---\n\n# Birds\n\nMy own words.\n")
    merged = render_model_card(card_model(), existing_card=mine)
    assert merged.text.rstrip().endswith("# Birds\n\nMy own words.") and merged.data.license == "mit"
    assert merged.text.index("<!-- protopool-hf:end citation -->") < merged.text.index("# Birds")
    generated = ModelCard(
        "---\nlibrary_name: transformers\ntags: [generated_from_trainer]\n---\n\n<!-- This model card has been "
        "generated automatically according to the information the Trainer had access to. You should probably "
        "proofread and complete it, then remove this comment. -->\n\n# out\n\nMore information needed\n"
    )
    replaced = render_model_card(card_model(), existing_card=generated)
    assert "More information needed" not in replaced.text and replaced.data.library_name == "protopool-hf"
    assert "generated_from_trainer" in replaced.data.tags


def test_our_sections_missing_from_an_old_card_are_inserted_in_template_order():
    text = render_model_card(card_model()).text
    blocks = {name: block for name, block in card_module._split_blocks(text) if name}
    old_text = "".join(  # an old card without the header and model sections, with the user's text after classes
        [blocks[name] + "\n\n" for name in ("about", "usage", "prototypes", "classes")]
        + ["## Mine\n\n"]
        + [blocks[name] + "\n\n" for name in ("training", "evaluation", "limitations", "citation")]
    )
    merged = render_model_card(card_model(), existing_card=ModelCard(f"---\nlicense: mit\n---\n{old_text}"))
    names = [line.split()[2] for line in merged.text.splitlines() if line.startswith("<!-- protopool-hf:begin")]
    assert names == [name for name in card_module.SECTIONS if name != "interpretability"]  # only with a report
    order = [merged.text.index(heading) for heading in ("# protopool", "## Classes", "## Model details", "## Mine")]
    assert order == sorted(order) and merged.text.index("## Mine") < merged.text.index("## Training")


def test_load_metrics_reads_the_trainers_results(tmp_path):
    assert load_metrics(tmp_path) == {}
    state = {"log_history": [{"loss": 1.0}, {"eval_accuracy": 0.6, "epoch": 1}, {"eval_accuracy": 0.7, "epoch": 2}]}
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    assert load_metrics(tmp_path) == {"eval_accuracy": 0.7, "epoch": 2}
    (tmp_path / "all_results.json").write_text(json.dumps({"eval_accuracy": 0.8, "train_loss": 0.1}))
    (tmp_path / "test_results.json").write_text(json.dumps({"test_accuracy": 0.75}))
    assert load_metrics(tmp_path) == {"eval_accuracy": 0.8, "train_loss": 0.1, "test_accuracy": 0.75}
    (tmp_path / "eval_results.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"eval_results\.json must hold a JSON object"):
        load_metrics(tmp_path)


# --------------------------------------------------------------------------- extra sections


NOTES = "## Fairness\n\n| Metric | Value |\n|---|---|\n| parity gap | 0.8 |"


def test_extra_sections_go_after_the_evaluation_and_stay_until_replaced():
    text = render_model_card(card_model(), extra_sections={"fairness": NOTES}).text
    block = f"<!-- protopool-hf:begin fairness -->\n{NOTES}\n<!-- protopool-hf:end fairness -->"
    assert f"<!-- protopool-hf:end evaluation -->\n\n{block}\n\n<!-- protopool-hf:begin limitations -->" in text
    assert "<!-- protopool-hf:begin fairness -->" not in render_model_card(card_model()).text

    kept = render_model_card(card_model(), existing_card=ModelCard(text))  # None: the card's own extra sections stay
    assert block in kept.text and kept.text == text
    newer = NOTES.replace("0.8", "0.9")
    replaced = render_model_card(card_model(), existing_card=kept, extra_sections={"fairness": newer})
    assert newer in replaced.text and NOTES not in replaced.text
    dropped = render_model_card(card_model(), existing_card=kept, extra_sections={})
    assert "Fairness" not in dropped.text.split("## Limitations")[0]


@pytest.mark.parametrize(
    ("sections", "match"),
    [
        ({"training": "x"}, "not one of the card's own sections"),
        ({"interpretability": "x"}, "not one of the card's own sections"),
        ({"my notes": "x"}, "must be letters, digits"),
        ({"report": "<!-- protopool-hf:end report -->"}, "without protopool-hf block markers"),
        ("## text", "must be a mapping"),
    ],
)
def test_bad_extra_sections_are_refused(sections, match):
    with pytest.raises(ValueError, match=match):
        render_model_card(card_model(), extra_sections=sections)


def test_only_the_crops_named_as_pictures_writes_them_are_linked():
    names = ["prototypes/prototype_003.png", "prototypes/prototype_003_overlay.png", "prototypes/prototype_5.png"]
    text = render_model_card(card_model(), prototype_files=[*names, "prototypes/gallery.png"]).text
    assert "[3](prototypes/prototype_003.png)" in text and "[5](" not in text and "overlay.png)" not in text


# --------------------------------------------------------------------------- interpretability report


def report_results(card: ModelCard) -> dict[str, EvalResult]:
    return {r.metric_type: r for r in card.data.eval_results or [] if r.metric_type.startswith("interpretability/")}


def test_a_report_adds_its_section_after_the_evaluation_and_its_numbers_to_the_model_index():
    card = render_model_card(
        card_model(), repo_id=REPO, metrics=METRICS, dataset_name=DATASET, interpretability=REPORT
    )
    text = card.text
    section = text[text.index("<!-- protopool-hf:begin interpretability -->") :]
    assert text.index("<!-- protopool-hf:end evaluation -->") < text.index("## Interpretability")
    assert section.index("<!-- protopool-hf:end interpretability -->") < section.index("## Limitations")
    assert "| background evidence | 0.25 | share of the top slots' boxes on test images" in section
    assert "| prototypes used | 0.833 |" in section and "| consistency" not in section  # not measured
    # The Hub reads the model-index from the YAML block: parse it back from the card's text.
    parsed = ModelCard(card.content)
    results = report_results(parsed)
    background = results["interpretability/upsampled/test_top_slots.background_share"]
    assert (background.metric_value, background.metric_name) == (0.25, "background evidence (upsampled)")
    assert {(r.dataset_name, r.dataset_type, r.dataset_split, r.task_type) for r in results.values()} == {
        (DATASET, DATASET, "test", "image-classification")
    }
    assert results["interpretability/accuracy"].metric_value == 0.5
    quality = [
        (r.dataset_split, r.metric_type, r.metric_value) for r in parsed.data.eval_results if r not in results.values()
    ]
    assert quality == [("validation", "accuracy", 0.75), ("test", "accuracy", 0.5)]
    assert parsed.data.metrics == ["accuracy"]  # the report's numbers are eval results, not metric ids
    # The evaluation table lists the quality metrics only.
    assert "interpretability/" not in text.split("## Evaluation")[1].split("## Interpretability")[0]


def test_the_card_without_a_report_is_unchanged_by_the_template_block():
    with_report = render_model_card(card_model(), repo_id=REPO, interpretability=REPORT).text
    without = render_model_card(card_model(), repo_id=REPO).text
    start = with_report.index("<!-- protopool-hf:begin interpretability -->")
    end = with_report.index("<!-- protopool-hf:end interpretability -->") + len(
        "<!-- protopool-hf:end interpretability -->"
    )
    assert with_report[:start] + with_report[end + 2 :] == without


def test_an_update_replaces_the_report_keeps_the_evaluation_and_drops_a_report_not_given():
    first = render_model_card(card_model(), metrics=METRICS, dataset_name=DATASET, interpretability=REPORT)
    newer = {**REPORT, "prototypes_used_share": 0.5}
    updated = render_model_card(card_model(), existing_card=ModelCard(first.content), interpretability=newer)
    assert "| prototypes used | 0.5 |" in updated.text and "| prototypes used | 0.833 |" not in updated.text
    parsed = ModelCard(updated.content)
    assert report_results(parsed)["interpretability/prototypes_used_share"].metric_value == 0.5
    assert [r.metric_value for r in parsed.data.eval_results if r.metric_type == "accuracy"] == [0.75, 0.5]
    assert parsed.data.metrics == ["accuracy"] and "| validation | accuracy | 0.75 |" in parsed.text

    dropped = ModelCard(render_model_card(card_model(), existing_card=parsed).content)
    assert "## Interpretability" not in dropped.text and report_results(dropped) == {}
    assert [r.metric_value for r in dropped.data.eval_results if r.metric_type == "accuracy"] == [0.75, 0.5]


def test_a_report_without_a_dataset_name_stays_in_the_body(caplog):
    with caplog.at_level(logging.WARNING, logger="protopool_hf.card"):
        card = render_model_card(card_model(), interpretability=REPORT)
    assert "## Interpretability" in card.text and not card.data.eval_results
    assert "pass dataset_name= (a Hub dataset id) to publish its numbers" in caplog.text
