"""Train ProtoPool with the paper's whole recipe: warm-up, joint, projection, last-layer fine-tuning.

The options are those of `protopool-hf train` (`python examples/train.py --help`). The script works on one process
and under `accelerate launch` / `torchrun`, e.g.

    accelerate launch --multi_gpu --num_processes 4 examples/train.py --dataset cub200 --data-root CUB_200_2011 \
        --preset cub200 --pretrained --augment official --bf16 --output-dir runs/cub

The Python API it calls is `protopool_hf.training.train_protopool` (docs/training.md shows it step by step).
"""

import sys

from protopool_hf.cli import main


if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
