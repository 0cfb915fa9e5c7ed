"""Property test of the command line (hypothesis): any argument list gives exit 0 or one error line with status 2.

Argument lists are drawn from every subcommand's flags and from values that are wrong in the ways users get them
wrong (missing paths, files for folders, folders for files, a folder without config.json, zero and negative counts,
words for numbers). No drawn list names a usable model, dataset or checkpoint, so each run ends early: the fuzzing is
about the answers to bad input, not about training. A prepared output folder that holds a saved model must come out
unchanged.
"""

import contextlib
import io
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from protopool_hf.cli import main


COMMANDS = ("train", "project", "explain", "push", "convert")
FLAGS = (
    "--dataset", "--data-root", "--limit", "--skip-bad-images", "--output-dir", "--overwrite", "--backbone",
    "--num-prototypes", "--image-size", "--batch-size", "--warmup-epochs", "--lr", "--out", "--top-k", "--class-id",
    "--json", "--labels", "--gumbel-scale", "--resume-from-checkpoint", "--dataset-name", "--debug-not-a-flag",
    "--preset", "--augment", "--help",
)  # fmt: skip
NUMBERS = ("0", "-5", "1", "3", "1e-3", "nan", "ten", "", "99999999999999999999")
NAMES = ("fashion-mnist", "folder", "cub200", "resnet50", "no_such_net", "official", "me/model", "x")


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz")
    (root / "empty").mkdir()
    (root / "x.jpg").mkdir()
    (root / "afile").write_text("a text file")
    (root / "best_model.pth").write_text("not a checkpoint")
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    saved = root / "saved-model"  # stands for a trained model: must never change on a failed command
    saved.mkdir()
    (saved / "config.json").write_text('{"model_type": "protopool"}')
    (saved / "README.md").write_text("the card")
    return {
        "empty": root / "empty",
        "dir named like an image": root / "x.jpg",
        "file": root / "afile",
        "under a file": root / "afile" / "x.png",
        "missing": root / "missing",
        "text checkpoint": root / "best_model.pth",
        "bad image": root / "image.png",
        "saved model": saved,
    }


def _snapshot(folder: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every path under `folder` with its bytes (None for a folder) and modification time."""
    return {
        str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes(), p.stat().st_mtime_ns)
        for p in folder.rglob("*")
    }


def _argv(data: st.DataObject, places: dict[str, Path]) -> list[str]:
    """A command with its required arguments (each usually present, possibly wrong) and a few more options."""
    path = st.sampled_from([str(place) for place in places.values()])
    value = st.one_of(st.sampled_from(NUMBERS), st.sampled_from(NAMES), path)
    dataset = st.sampled_from(("fashion-mnist", "folder", "cub200", "cars196", "imagenet"))
    model = st.one_of(path, st.sampled_from(("x", "./x", "me/no-such-model", "a//b")))

    def draw(strategy: st.SearchStrategy, label: str) -> str:
        return data.draw(strategy, label=label)

    command = draw(st.sampled_from(COMMANDS), "command")
    required = {
        "train": lambda: ["--dataset", draw(dataset, "dataset"), "--output-dir", draw(path, "output")],
        "project": lambda: [
            draw(model, "model"),
            "--dataset",
            draw(dataset, "dataset"),
            "--output-dir",
            draw(path, "o"),
        ],
        "explain": lambda: [draw(model, "model"), draw(path, "image"), "--out", draw(path, "out")],
        "push": lambda: [draw(path, "folder"), draw(st.sampled_from(NAMES), "repo")],
        "convert": lambda: [draw(path, "checkpoint"), draw(path, "output")],
    }[command]()
    if draw(st.booleans(), "drop a required argument"):
        del required[draw(st.integers(0, len(required) - 1), "dropped")]
    option = st.one_of(st.tuples(st.sampled_from(FLAGS), value).map(list), st.sampled_from(FLAGS).map(lambda f: [f]))
    extra = [token for tokens in draw(st.lists(option, max_size=4), "options") for token in tokens]
    # Every train / project run names a dataset folder that cannot load: nothing drawn may start a real run.
    fixed = ["--data-root", draw(path, "root")] if command in ("train", "project") else []
    return [command, *required, *extra, *fixed]


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_arguments_give_exit_0_or_one_error_line(places, data):
    argv = _argv(data, places)
    command = argv[0]
    root = places["empty"].parent
    before = _snapshot(root)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(argv)
            event(f"{command}: {'ran' if status == 0 else 'error from the command'}")
        except SystemExit as exit_info:  # argparse: --help (0) or a usage error (2)
            status = exit_info.code
            event(f"{command}: {'help' if status == 0 else 'usage error'}")
    assert status in (0, 2), (argv, status, err.getvalue())
    assert "Traceback" not in err.getvalue()
    assert _snapshot(root) == before, argv  # nothing written, nothing changed, no folder created
    if status == 2:
        lines = err.getvalue().splitlines()
        assert len(lines) == 1 and lines[0].startswith("protopool-hf"), (argv, err.getvalue())
        assert "run again with --debug" not in lines[0], (argv, lines[0])  # an expected error, not a bug
    else:
        assert "--help" in argv, (argv, out.getvalue())
