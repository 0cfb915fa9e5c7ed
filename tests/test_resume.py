"""A training run killed with SIGKILL in the middle of an epoch and resumed ends with the uninterrupted run's weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


SCRIPT = Path(__file__).parent / "scripts" / "resume_run.py"


def run(output_dir: Path, *options: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(output_dir), *options], env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow  # three fresh training processes: 21 s on a 2-core machine
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path: Path):
    reference = run(tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-5000:]

    killed_dir = tmp_path / "killed"
    killed = run(killed_dir, "--kill-phase", "joint", "--kill-step", "5")
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-3000:])
    # It died in the joint phase in the middle of epoch 3; its last checkpoint is from the middle of epoch 2.
    assert (killed_dir / "warmup" / "phase_complete.json").is_file()
    assert not (killed_dir / "joint" / "phase_complete.json").exists()
    state = json.loads((killed_dir / "joint" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and state["epoch"] == 1.5
    assert not (killed_dir / "joint" / "checkpoint-6").exists()

    resumed = run(killed_dir, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-5000:]

    expected = load_file(tmp_path / "reference" / "model.safetensors")
    actual = load_file(killed_dir / "model.safetensors")
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=0, atol=1e-6, equal_nan=True, msg=name)
    for phase in ("warmup", "joint", "projection", "finetune"):
        assert (killed_dir / phase / "phase_complete.json").is_file()


def test_a_stage_save_cut_short_is_repaired_and_a_failed_one_leaves_the_old_model(
    tmp_path: Path, monkeypatch, tiny_model
):
    from protopool_hf.resume import MARKER, load_stage_model, mark_stage_finished, save_stage_model

    model = tiny_model()
    save_stage_model(model, tmp_path, "warmup")
    final = tmp_path / "warmup" / "final"
    saved = load_file(final / "model.safetensors")
    # Killed between the swap's two renames: the complete old copy sits aside, no final folder.
    os.rename(final, final.with_name(".final.protopool-0000.old"))
    save_stage_model(model, tmp_path, "warmup")
    assert sorted(p.name for p in final.parent.iterdir()) == ["final"]

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_stage_model(model, tmp_path, "warmup")
    assert sorted(p.name for p in final.parent.iterdir()) == ["final"]  # nothing half-written left beside it
    kept = load_file(final / "model.safetensors")
    torch.testing.assert_close(kept, saved, rtol=0, atol=0, equal_nan=True)  # unprojected provenance is NaN
    load_stage_model(tiny_model(), final)  # a resumed run can load it

    mark_stage_finished(tmp_path, "warmup", {"eval_accuracy": 0.5, "path": tmp_path})
    marker = tmp_path / "warmup" / MARKER
    expected = {"eval_accuracy": 0.5, "path": str(tmp_path), "stage": "warmup"}
    assert marker.read_text() == json.dumps(expected, indent=2, sort_keys=True)
    assert sorted(p.name for p in marker.parent.iterdir()) == ["final", MARKER]
