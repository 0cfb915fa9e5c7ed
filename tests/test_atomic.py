"""protopool_hf.atomic: files and model folders are replaced whole or not at all, also when the process is killed.

The kill tests save a model over another one in a forked process, stop it at a chosen point, SIGKILL it and load the
target (docs/reliability.md, "Atomic saving").
"""

import errno
import json
import logging
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from card_fixtures import card_model, siblings, snapshot

from protopool_hf import ProtoPoolForImageClassification, atomic
from protopool_hf.atomic import finish_interrupted_swap, read_json, replace_folder, write_file, write_json
from protopool_hf.hub import save_model_folder


# --------------------------------------------------------------------------- files


def test_write_file_replaces_the_file_whole_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("old")
    os.chmod(path, 0o644)

    def half_then_fail(temporary: Path) -> None:
        temporary.write_text("ne")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_file(path, half_then_fail)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]

    seen = []
    write_file(path, lambda temporary: (seen.append(path.read_text()), temporary.write_text("new")))
    assert seen == ["old"] and path.read_text() == "new"  # the target is untouched until the rename
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~_umask()  # the usual permissions, not mkstemp's 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_write_json_and_read_json(tmp_path):
    path = write_json(tmp_path / "marker.json", {"b": 1, "a": [1.5, None], "path": tmp_path})
    assert path.read_text() == json.dumps({"a": [1.5, None], "b": 1, "path": str(tmp_path)}, indent=2, sort_keys=True)
    assert read_json(path) == {"a": [1.5, None], "b": 1, "path": str(tmp_path)}
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"list\.json must hold a JSON object, got list"):
        read_json(tmp_path / "list.json")
    (tmp_path / "broken.json").write_text('{"a": ')
    with pytest.raises(ValueError, match=r"broken\.json is not valid JSON .*: fix or delete it"):
        read_json(tmp_path / "broken.json")


# --------------------------------------------------------------------------- folders


def test_replace_folder_refuses_a_file_and_cleans_up_after_a_failed_fill(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        replace_folder(tmp_path / "file", lambda staging: None)
    folder = replace_folder(tmp_path / "a" / "b", lambda staging: (staging / "x.txt").write_text("1"))
    assert folder == tmp_path / "a" / "b" and snapshot(folder) == {"x.txt": b"1"}

    def fill(staging: Path) -> None:
        assert snapshot(folder) == {"x.txt": b"1"}  # the old folder can be read while the new one is written
        (staging / "y.txt").write_text("2")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        replace_folder(folder, fill)
    assert snapshot(folder) == {"x.txt": b"1"} and siblings(folder) == []


def test_the_swap_replaces_the_whole_folder(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "old.txt").write_text("old")
    staging = tmp_path / ".out.protopool-abc.new"
    staging.mkdir()
    (staging / "new.txt").write_text("new")
    atomic._swap_in(staging, folder)
    assert snapshot(folder) == {"new.txt": b"new"} and snapshot(staging) == {"old.txt": b"old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.protopool-abc.new", "out"]


def test_an_interrupted_two_rename_swap_is_finished_by_the_next_save(tmp_path, caplog):
    folder = tmp_path / "out"
    old, new = tmp_path / ".out.protopool-x1.old", tmp_path / ".out.protopool-x1.new"
    for path, text in ((old, "old"), (new, "new")):
        path.mkdir()
        (path / "file.txt").write_text(text)
    with caplog.at_level(logging.WARNING, logger="protopool_hf.atomic"):
        finish_interrupted_swap(folder)  # crashed between the renames: the new folder was complete
    assert snapshot(folder) == {"file.txt": b"new"} and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert "Finishing an interrupted save" in caplog.text

    folder.rename(old)  # crashed before the new folder was complete: restore the old one
    finish_interrupted_swap(folder)
    assert snapshot(folder) == {"file.txt": b"new"} and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    save_model_folder(card_model(), folder)
    assert "file.txt" in snapshot(folder)  # carried over


KILL_POINTS = {  # where the child stops, and which model the target must hold after SIGKILL there
    "weights half written": "old",
    "before the swap": "old",
    "between the two renames": "repaired",
    "after the swap": "new",
}


def _stop_here(ready: Path) -> None:
    ready.write_text("stopped")
    time.sleep(600)


def _save_until(kill_point: str, model: ProtoPoolForImageClassification, folder: Path, ready: Path) -> None:
    """Child process: `save_model_folder` made to stop at `kill_point` (the parent then SIGKILLs it)."""
    torch.set_num_threads(1)  # no OpenMP pool after fork
    if kill_point == "weights half written":
        save_pretrained = type(model).save_pretrained

        def half_written(self, directory, *args, **kwargs):
            save_pretrained(self, directory, *args, **kwargs)
            _truncate(Path(directory) / "model.safetensors")
            _stop_here(ready)

        type(model).save_pretrained = half_written
    elif kill_point in ("before the swap", "after the swap"):
        swap_in = atomic._swap_in

        def swap_and_stop(*args):
            if kill_point == "after the swap":
                swap_in(*args)
            _stop_here(ready)

        atomic._swap_in = swap_and_stop
    else:  # stopped after the first of the swap's two renames
        rename = os.rename

        def rename_and_stop(source, target):
            rename(source, target)
            if Path(source) == folder:
                _stop_here(ready)

        atomic.os.rename = rename_and_stop
    save_model_folder(model, folder)
    os._exit(3)  # not reached: the parent kills this process first


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("kill_point", list(KILL_POINTS))
def test_a_save_killed_midway_leaves_the_old_or_the_new_model(tiny_model, tmp_path, kill_point):
    old, new = tiny_model(0).eval(), tiny_model(1).eval()
    folder = save_model_folder(old, tmp_path / "model")
    before = snapshot(folder)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = {"old": old(x).logits, "new": new(x).logits}
    assert not torch.allclose(logits["old"], logits["new"])

    ready = tmp_path / "ready"
    child = multiprocessing.get_context("fork").Process(target=_save_until, args=(kill_point, new, folder, ready))
    child.start()
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert child.is_alive(), f"the saving process ended early (exit code {child.exitcode})"
        assert time.monotonic() < deadline, "the saving process never reached the kill point"
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert child.exitcode == -signal.SIGKILL

    expected = KILL_POINTS[kill_point]
    if expected == "repaired":  # no target until the next save (or `finish_interrupted_swap`) completes the swap
        assert not folder.exists()
        finish_interrupted_swap(folder)
        expected = "new"
    if expected == "old":
        assert snapshot(folder) == before  # byte for byte
    else:
        assert set(snapshot(folder)) == set(before)
    loaded = ProtoPoolForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, logits[expected], rtol=0, atol=0)
