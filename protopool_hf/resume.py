"""The run folder of `protopool_hf.training.train_protopool`: finished stages, what to resume, the stages' models.

```
output_dir/
    protopool_recipe.json      the recipe of the first run (a resumed run with another recipe warns)
    <stage>/checkpoint-N/      the Trainer checkpoints of a phase (warmup, joint, finetune)
    <stage>/final/             the model a finished stage ends with (also projection)
    <stage>/phase_complete.json  written last: the stage is done (its metrics, or the projection's provenance)
```

A stage counts as finished only once its marker exists, and its model and marker are written atomically, so an
interrupted run resumes in the stage it was in (`resume_plan`).
"""

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

from torch import nn
from transformers.trainer_utils import get_last_checkpoint

from .atomic import replace_folder, write_json
from .phases import PHASES


__all__ = [
    "MARKER",
    "STAGES",
    "check_resumed_config",
    "load_stage_model",
    "mark_stage_finished",
    "record_recipe",
    "resume_plan",
    "save_stage_model",
    "start_afresh",
]

#: The stages of the recipe in order: the Trainer phases and the projection between "joint" and "finetune".
STAGES = ("warmup", "joint", "projection", "finetune")
#: The file that marks a stage as finished.
MARKER = "phase_complete.json"
_RECIPE_FILE = "protopool_recipe.json"


def start_afresh(output_dir: Path) -> None:
    """Delete a previous run's stages and recipe file (a fresh run over it, allowed by `overwrite`)."""
    for stage in STAGES:
        shutil.rmtree(output_dir / stage, ignore_errors=True)
    (output_dir / _RECIPE_FILE).unlink(missing_ok=True)


def record_recipe(output_dir: Path, recipe: dict[str, Any]) -> None:
    """Write the recipe of a first run; warn when a resumed run's recipe differs from it."""
    output_dir.mkdir(parents=True, exist_ok=True)
    recipe_file = output_dir / _RECIPE_FILE
    if not recipe_file.is_file():
        write_json(recipe_file, recipe)
        return
    saved = json.loads(recipe_file.read_text())
    changed = sorted(k for k, v in recipe.items() if saved.get(k, v) != v and k != "output_dir")
    if changed:
        warnings.warn(
            f"Resuming {output_dir} with a recipe that differs from its first run in {changed}: the result "
            "will not equal an uninterrupted run.",
            stacklevel=3,
        )


def save_stage_model(model: nn.Module, output_dir: Path, stage: str) -> None:
    """Save the model a stage ends with into `output_dir/<stage>/final` (atomically)."""
    (output_dir / stage).mkdir(parents=True, exist_ok=True)
    replace_folder(output_dir / stage / "final", model.save_pretrained)


def mark_stage_finished(output_dir: Path, stage: str, info: dict[str, Any]) -> None:
    """Write the stage's marker (after its model): from now on a resumed run skips it."""
    write_json(output_dir / stage / MARKER, {"stage": stage, **info})


def load_stage_model(model: nn.Module, folder: Path) -> None:
    """Load the weights (and projection provenance) a finished stage saved in `folder`."""
    from safetensors.torch import load_file

    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(
            f"{weights} is missing although its phase is marked complete; delete {folder.parent / MARKER} to rerun "
            "that phase."
        )
    device = next(model.parameters()).device
    model.load_state_dict(load_file(str(weights), device=str(device)), strict=True)
    config_file = folder / "config.json"
    if config_file.is_file():
        saved = json.loads(config_file.read_text())
        for key in ("projection_dataset", "projection_input_size"):
            if key in saved:
                setattr(model.config, key, saved[key])


def _checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob("checkpoint-*")) if folder.is_dir() else []


def resume_plan(
    output_dir: Path, resume_from_checkpoint: str | bool | None, overwrite: bool = False
) -> tuple[set[str], str | None, str | None]:
    """(completed stages, the phase to resume, its checkpoint) from the markers and the resume argument.

    Starting afresh with `overwrite` ignores a previous run (the caller removes it).
    """
    completed = {stage for stage in STAGES if (output_dir / stage / MARKER).is_file()}
    prefix = set()
    for stage in STAGES:
        if stage not in completed:
            break
        prefix.add(stage)
    if completed != prefix and not (overwrite and not resume_from_checkpoint):
        raise ValueError(
            f"{output_dir} has phase markers out of order ({sorted(completed)}): it was not written by one run of "
            "train_protopool. Use a fresh output_dir."
        )
    if not resume_from_checkpoint:
        leftovers = completed or any(_checkpoints(output_dir / phase) for phase in PHASES)
        if leftovers and not overwrite:
            raise ValueError(
                f"{output_dir} holds a previous run (finished phases {sorted(completed)} or checkpoints): pass "
                "resume_from_checkpoint=True to continue it, overwrite=True to start afresh (the previous run is "
                "deleted), or choose another output_dir."
            )
        return set(), None, None
    if resume_from_checkpoint is True:
        current = next((s for s in STAGES if s not in completed), None)
        if current not in PHASES:
            return completed, None, None
        last = get_last_checkpoint(str(output_dir / current)) if (output_dir / current).is_dir() else None
        return completed, current, last
    checkpoint = Path(resume_from_checkpoint)
    if not (checkpoint / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{checkpoint} is not a Trainer checkpoint (no trainer_state.json).")
    phase = checkpoint.resolve().parent.name
    if phase not in PHASES or checkpoint.resolve().parent.parent != output_dir.resolve():
        raise ValueError(f"{checkpoint} is not a checkpoint of a phase of {output_dir} (<output_dir>/<phase>/...).")
    if phase in completed:
        raise ValueError(f"Phase {phase!r} of {output_dir} is already complete; resume with True instead.")
    missing = [s for s in STAGES[: STAGES.index(phase)] if s not in completed]
    if missing:
        raise ValueError(f"Cannot resume {phase!r} from {checkpoint}: the earlier phases {missing} are not complete.")
    return completed, phase, str(checkpoint)


#: Config fields that fix the shapes of the weights: a resumed run must keep them.
_ARCHITECTURE_FIELDS = (
    "backbone",
    "feature_stage",
    "num_labels",
    "num_prototypes",
    "num_slots_per_class",
    "prototype_dim",
    "input_size",
)


def check_resumed_config(config: Any, output_dir: Path, completed: set[str], checkpoint: str | None) -> None:
    """Refuse to resume a run with a model whose architecture or classes differ from those the run saved."""
    candidates = [Path(checkpoint) / "config.json"] if checkpoint else []
    candidates += [output_dir / stage / "final" / "config.json" for stage in reversed(STAGES) if stage in completed]
    saved_file = next((path for path in candidates if path.is_file()), None)
    if saved_file is None:
        return
    saved = json.loads(saved_file.read_text())
    saved_labels = {int(k): v for k, v in (saved.get("id2label") or {}).items()}
    saved["num_labels"] = len(saved_labels) if saved_labels else saved.get("num_labels")
    for field_name in _ARCHITECTURE_FIELDS:
        ours, theirs = getattr(config, field_name, None), saved.get(field_name)
        if isinstance(ours, tuple | list):
            ours, theirs = list(ours), list(theirs) if isinstance(theirs, tuple | list) else theirs
        if ours != theirs:
            break
    else:
        ours = {int(k): v for k, v in config.id2label.items()}
        if not saved_labels or ours == saved_labels:
            return
        field_name, wrong = "id2label", next(i for i in sorted(ours) if ours[i] != saved_labels.get(i))
        ours, theirs = f"{{{wrong}: {ours[wrong]!r}, ...}}", f"{{{wrong}: {saved_labels.get(wrong)!r}, ...}}"
    raise ValueError(
        f"Cannot resume {output_dir}: the model's {field_name}={ours} differs from the run's {field_name}={theirs} "
        f"(in {saved_file}). Resume with the settings of the first run, or start a new run (another output_dir, or "
        "overwrite=True without resuming)."
    )
