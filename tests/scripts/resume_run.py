"""Run the tiny ProtoPool recipe in its own process, optionally killing itself with SIGKILL in the middle of a phase.

Used by tests/test_resume.py:

    python tests/scripts/resume_run.py OUTPUT_DIR                          # an uninterrupted run
    python tests/scripts/resume_run.py OUTPUT_DIR --kill-phase joint --kill-step 5   # dies by SIGKILL
    python tests/scripts/resume_run.py OUTPUT_DIR --resume                 # continues the killed run

The recipe: 16 Fashion-MNIST training images in batches of 8 (2 steps per epoch), 8 validation images, warm-up 1,
joint 3 and fine-tuning 1 epochs, mixup, seeded augmentation, evaluation and a checkpoint every 3 steps with model
selection on the validation split. `--kill-phase joint --kill-step 5` dies at the end of the joint phase's 5th step,
in the middle of its 3rd epoch; its last checkpoint (step 3) is itself in the middle of the 2nd epoch, so the resumed
run skips half an epoch of data and must redo steps 4 and 5 exactly.
"""

import argparse
import os
import signal
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback


sys.path.insert(0, str(Path(__file__).parent))
from protopool_tiny import fashion_config, fashion_mnist, fashion_model

from protopool_hf.recipe import ProtoPoolRecipe
from protopool_hf.training import train_protopool


class KillAt(TrainerCallback):
    """SIGKILL this process at the end of optimizer step `step` of `phase` (no clean-up of any kind runs)."""

    def __init__(self, phase: str, step: int) -> None:
        self.phase, self.step = phase, step

    def on_step_end(self, args, state, control, **kwargs):
        if Path(args.output_dir).name == self.phase and state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--kill-phase")
    parser.add_argument("--kill-step", type=int)
    parser.add_argument("--resume", action="store_true")
    options = parser.parse_args()
    torch.set_num_threads(1)
    config = fashion_config()
    train, val, plain = fashion_mnist(config, n_train=16, n_val=8)
    recipe = ProtoPoolRecipe(
        output_dir=options.output_dir,
        warmup_epochs=1,
        joint_epochs=3,
        finetune_epochs=1,
        train_batch_size=8,
        eval_batch_size=8,
        projection_batch_size=8,
        mixup_alpha=0.5,
        eval_strategy="steps",
        save_strategy="steps",
        eval_steps=3,
        save_steps=3,
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
    )
    callbacks = [KillAt(options.kill_phase, options.kill_step)] if options.kill_phase else []
    # A resumed run starts from a differently initialised model: everything must come from the checkpoints.
    model = fashion_model(seed=1 if options.resume else 0)
    train_protopool(model, train, val, plain, recipe, callbacks=callbacks, resume_from_checkpoint=options.resume)


if __name__ == "__main__":
    main()
