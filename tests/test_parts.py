"""CUB-200-2011 part keypoints on a generated tree in the official layout, and its bad annotations."""

import math
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from protopool_hf.data import load_cub200
from protopool_hf.interpretability import evaluate_interpretability
from protopool_hf.parts import PartAnnotations, load_cub_parts


PARTS = ["back", "beak", "left eye", "right eye"]
# image id -> (file, class id, is_train, (width, height), bbox x y w h)
IMAGES = {
    1: ("001.Red/a.jpg", 1, 0, (60, 40), (10.0, 5.0, 30.0, 20.0)),
    2: ("002.Blue/b.jpg", 2, 0, (50, 50), (0.0, 0.0, 50.0, 50.0)),
    3: ("001.Red/c.jpg", 1, 1, (40, 40), (5.0, 5.0, 30.0, 30.0)),
}
# (image id, part id) -> (x, y, visible); parts not listed are invisible
LOCS = {
    (1, 1): (20.0, 10.0, 1),  # inside the box: (10, 5) in the crop
    (1, 2): (55.0, 30.0, 1),  # outside the box (x > 40): cropped away
    (1, 3): (12.5, 24.5, 1),
    (2, 2): (25.0, 25.0, 1),
    (2, 4): (3.0, 4.0, 0),  # not visible
    (3, 1): (10.0, 10.0, 1),
}


def write_cub(root: Path, locs: dict = LOCS, extra_lines: str = "") -> Path:
    base = root / "CUB_200_2011"
    (base / "parts").mkdir(parents=True)
    lines: dict[str, list[str]] = {name: [] for name in ("images", "split", "labels", "boxes")}
    for image_id, (file, class_id, is_train, size, box) in IMAGES.items():
        path = base / "images" / file
        path.parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.new("RGB", size, (200, 30, 30)).save(path)
        lines["images"].append(f"{image_id} {file}")
        lines["split"].append(f"{image_id} {is_train}")
        lines["labels"].append(f"{image_id} {class_id}")
        lines["boxes"].append(f"{image_id} " + " ".join(str(v) for v in box))
    for name, file in (
        ("images", "images.txt"),
        ("split", "train_test_split.txt"),
        ("labels", "image_class_labels.txt"),
        ("boxes", "bounding_boxes.txt"),
    ):
        (base / file).write_text("\n".join(lines[name]) + "\n")
    (base / "classes.txt").write_text("1 001.Red\n2 002.Blue\n")
    (base / "parts" / "parts.txt").write_text("".join(f"{k + 1} {name}\n" for k, name in enumerate(PARTS)))
    rows = []
    for image_id in IMAGES:
        for part_id in range(1, len(PARTS) + 1):
            x, y, visible = locs.get((image_id, part_id), (0.0, 0.0, 0))
            rows.append(f"{image_id} {part_id} {x} {y} {visible}")
    (base / "parts" / "part_locs.txt").write_text("\n".join(rows) + "\n" + extra_lines)
    return base


def test_cub_parts_follow_the_loader_rows_and_its_crop(tmp_path):
    write_cub(tmp_path)
    parts = load_cub_parts(tmp_path, "test")
    dataset = load_cub200(tmp_path, "test")
    assert len(parts) == len(dataset) == 2 and parts.names == PARTS
    first, second = parts.keypoints
    assert first[0].tolist() == [10.0, 5.0]  # moved into the crop
    assert np.isnan(first[1]).all()  # outside the box
    assert first[2].tolist() == [2.5, 19.5]
    assert np.isnan(first[3]).all()
    assert second[1].tolist() == [25.0, 25.0] and np.isnan(second[3]).all()  # visible = 0 is NaN
    for row in range(2):  # every visible keypoint lies in the image as the loader decodes it
        parts.check_inside(row, dataset[row]["image"].size[::-1])
    full = load_cub_parts(tmp_path, "test", crop_to_bbox=False)
    assert full.keypoints[0][1].tolist() == [55.0, 30.0]
    train = load_cub_parts(tmp_path / "CUB_200_2011", "train", limit=1)
    assert len(train) == 1 and train.keypoints[0][0].tolist() == [5.0, 5.0]
    assert parts.merged_groups() == {"back": [0], "beak": [1], "eye": [2, 3]}


def test_cub_parts_feed_evaluate_interpretability(tmp_path, tiny_model):
    write_cub(tmp_path)
    model = tiny_model(num_labels=2, num_prototypes=4, input_size=[3, 64, 64], feature_stage=2).eval()
    report = evaluate_interpretability(
        model, load_cub200(tmp_path, "test"), parts=load_cub_parts(tmp_path, "test"), localisation="upsampled"
    )
    scores = report.localisations["upsampled"]
    assert 0 <= scores.consistency <= 100 and 0 <= scores.stability <= 100
    assert 0 <= scores.purity_mean <= 1
    assert report.settings["parts"]["names"] == PARTS


def test_missing_part_file_is_named(tmp_path):
    base = write_cub(tmp_path)
    (base / "parts" / "part_locs.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"part_locs.txt not found. Expected layout: CUB-200-2011"):
        load_cub_parts(tmp_path, "test")


def test_unknown_image_id_is_named(tmp_path):
    write_cub(tmp_path, extra_lines="9 1 3.0 4.0 1\n")
    with pytest.raises(ValueError, match=r"part_locs.txt, line 13: unknown image id 9"):
        load_cub_parts(tmp_path, "test")


def test_unknown_part_id_is_named(tmp_path):
    write_cub(tmp_path, extra_lines="1 7 3.0 4.0 1\n")
    with pytest.raises(ValueError, match=r"line 13: unknown part id 7"):
        load_cub_parts(tmp_path, "test")


def test_keypoint_outside_the_image_is_named(tmp_path):
    write_cub(tmp_path, locs={**LOCS, (2, 1): (80.0, 10.0, 1)})
    with pytest.raises(ValueError, match=r"row 1, part 'back' at \(x, y\) = \(80.0, 10.0\) lies outside its 50x50"):
        load_cub_parts(tmp_path, "test")


def test_malformed_line_is_named(tmp_path):
    write_cub(tmp_path, extra_lines="1 2 3.0\n")
    with pytest.raises(ValueError, match=r"line 13: expected 5 fields"):
        load_cub_parts(tmp_path, "test")


def test_generic_rows_and_their_checks():
    parts = PartAnnotations.from_rows([{"beak": (1, 2)}, None], names=["beak", "tail"], source="mine.json")
    assert parts.keypoints[0][0].tolist() == [1.0, 2.0] and all(math.isnan(v) for v in parts.keypoints[1].flat)
    with pytest.raises(ValueError, match=r"mine.json: row 0, part 'beak': expected \[x, y\]"):
        PartAnnotations.from_rows([{"beak": (1, 2, 3)}], source="mine.json")
    with pytest.raises(ValueError, match=r"row 0 has keypoints of shape \(1, 2\), expected \(2, 2\)"):
        PartAnnotations(["beak", "tail"], [np.zeros((1, 2))])
