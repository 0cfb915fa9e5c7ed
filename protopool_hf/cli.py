"""The `protopool-hf` command line: train | project | explain | evaluate | push | convert | export | app | space.

Heavy libraries (torch, timm, transformers) are imported inside the subcommands, so `protopool-hf --help` answers at
once (`import protopool_hf` is light too; it registers the Auto classes when transformers' are first imported). This
module is the parser (`build_parser`: every subcommand's arguments) and `main(argv)`, which parses and dispatches to
the subcommand's function `cmd_<name>(args) -> int` in `protopool_hf.cli_commands`, imported only then. Every error is
one line on stderr with exit status 2 (`--debug` re-raises it with its traceback); the command-line paths (model,
image, output) are checked before any work is done, and library advice is reworded to name this command line's flags
(`protopool_hf.cli_messages`).

Examples:
    protopool-hf train --dataset fashion-mnist --backbone resnet18 --output-dir runs/fmnist
    accelerate launch --multi_gpu --num_processes 2 examples/train.py --preset cub200 --dataset cub200 --data-root CUB_200_2011 --output-dir runs/cub
    protopool-hf explain runs/fmnist image.png --out explanation.png
    protopool-hf evaluate runs/fmnist --dataset fashion-mnist
    protopool-hf push runs/fmnist my-org/protopool-fmnist
"""

import argparse
import sys
from pathlib import Path
from typing import Any

from .cli_messages import DATASETS, MASK_RULE_NAMES, cli_log_wording, error_line, non_negative_int, positive_int


__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """An `ArgumentParser` whose usage errors are one line (exit status 2) and whose help shows the defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _DefaultsFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to every option with a real default that its help does not already state."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            not action.option_strings
            or action.default in (None, False, argparse.SUPPRESS)
            or "default" in text
            or action.nargs == 0
        ):
            return text
        return f"{text} (default: %(default)s)".lstrip()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = _Parser(prog="protopool-hf", description="ProtoPool interpretable image classifiers on timm backbones.")
    parser.add_argument("--debug", action="store_true", help="on an error, show the Python traceback")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Every subcommand also takes --debug (after its name); SUPPRESS keeps the global value when it is not given.
    debug = _Parser(add_help=False)
    debug.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="on an error, show the Python traceback"
    )

    train = commands.add_parser(
        "train", parents=[debug], help="run the whole recipe: warm-up, joint, projection, fine-tuning"
    )
    _add_data_arguments(train)
    model = train.add_argument_group("model")
    model.add_argument("--preset", choices=("cub200", "cars196"), help="the paper's sizes and backbone")
    model.add_argument("--backbone", help="timm model name (default: the preset's, else resnet50)")
    model.add_argument("--pretrained", action="store_true", help="start from timm's pretrained backbone weights")
    model.add_argument("--weights-file", type=Path, help="local pretrained backbone weights for timm (offline)")
    model.add_argument("--num-prototypes", type=int, help="P, the prototype pool size")
    model.add_argument("--num-slots-per-class", type=int, help="S, slots per class")
    model.add_argument("--prototype-dim", type=int, help="D, prototype depth")
    model.add_argument("--feature-stage", type=int, help="use this backbone stage instead of the last map")
    model.add_argument("--image-size", type=int, help="square input size in pixels (default: timm's)")
    model.add_argument("--cluster-weight", type=float, help="weight of the cluster term (official 0.8)")
    model.add_argument("--separation-weight", type=float, help="weight of the separation term (official 0.08)")
    model.add_argument(
        "--last-layer-correct-connection",
        type=float,
        help="initial last-layer weight of a slot to its class (official 1)",
    )
    model.add_argument(
        "--background-weight",
        type=float,
        help="weight of the background term on the object pixels (needs --object-mask; not in the official method)",
    )
    recipe = train.add_argument_group("recipe (defaults: the official code's)")
    recipe.add_argument("--warmup-epochs", type=non_negative_int, default=9, help="epochs of the warm-up phase")
    recipe.add_argument("--joint-epochs", type=non_negative_int, default=21, help="epochs of the joint phase")
    recipe.add_argument(
        "--finetune-epochs", type=non_negative_int, default=25, help="epochs of last-layer fine-tuning"
    )
    recipe.add_argument("--lr", type=float, default=1e-3, help="base learning rate (head 3·lr, backbone lr/10)")
    recipe.add_argument("--backbone-lr", type=float, help="backbone lr in the joint phase (default: lr/10)")
    recipe.add_argument("--finetune-lr", type=float, help="last-layer lr in fine-tuning (default: lr/10)")
    recipe.add_argument(
        "--frozen-backbone-stages",
        type=non_negative_int,
        default=0,
        help="keep the backbone's stem and this many first stages frozen in the joint phase (0: train all)",
    )
    recipe.add_argument("--batch-size", type=positive_int, default=80, help="per-device batch size")
    recipe.add_argument("--mixup-alpha", type=float, default=0.5, help="0 turns mixup off")
    recipe.add_argument("--gumbel-per-step", action="store_true", help="update the Gumbel scale every step")
    recipe.add_argument(
        "--object-mask",
        choices=("nonzero",),
        help="the object pixels of every image, for --background-weight and --restrict-projection (nonzero: not "
        "black, as Fashion-MNIST's garments)",
    )
    recipe.add_argument(
        "--restrict-projection",
        action="store_true",
        help="project onto object patches only (needs --object-mask; not in the official method)",
    )
    recipe.add_argument(
        "--augment",
        dest="augmentation",
        choices=("timm", "official"),
        default="timm",
        help="training augmentation (make_transforms' augmentation=)",
    )
    recipe.add_argument("--val-fraction", type=float, default=0.1, help="validation split carved from training data")
    recipe.add_argument("--seed", type=int, default=0, help="seed of the data order, augmentation and initial weights")
    recipe.add_argument("--num-workers", type=non_negative_int, default=0, help="DataLoader worker processes")
    recipe.add_argument("--bf16", action="store_true", help="bf16 autocast (distances stay float32)")
    recipe.add_argument("--cpu", action="store_true", help="train on the CPU even with a GPU")
    train.add_argument("--output-dir", type=Path, required=True, help="folder for the run and the final model")
    train.add_argument(
        "--dataset-name", help="Hub dataset id of the training data: the card then publishes its metrics (model-index)"
    )
    train.add_argument(
        "--overwrite", action="store_true", help="replace the model already in --output-dir (default: refuse)"
    )
    train.add_argument(
        "--resume-from-checkpoint",
        nargs="?",
        const=True,
        default=None,
        help="continue the run in --output-dir (or from this phase checkpoint path)",
    )

    project = commands.add_parser(
        "project", parents=[debug], help="project a model's prototypes onto a dataset's training images"
    )
    project.add_argument("model", help="model folder or Hub repo id")
    _add_data_arguments(project)
    project.add_argument("--output-dir", type=Path, required=True, help="folder for the projected model")
    project.add_argument(
        "--overwrite", action="store_true", help="replace the files already in --output-dir (default: refuse)"
    )
    project.add_argument("--batch-size", type=positive_int, default=64, help="images per projection batch")

    explain = commands.add_parser(
        "explain", parents=[debug], help="explain one image as a 'this looks like that' picture"
    )
    explain.add_argument("model", help="model folder or Hub repo id")
    explain.add_argument("image", type=Path, help="image file")
    explain.add_argument("--out", type=Path, required=True, help="PNG file to write")
    explain.add_argument("--top-k", type=positive_int, default=3, help="classes to list")
    explain.add_argument("--class-id", type=int, help="explain this class instead of the predicted one")
    explain.add_argument(
        "--json", action="store_true", help="also print the explanation as JSON (the slots of the --top-k classes)"
    )

    evaluate = commands.add_parser(
        "evaluate", parents=[debug], help="measure a model's interpretability and save interpretability.json"
    )
    evaluate.add_argument("model", help="model folder or Hub repo id")
    evaluate.add_argument(
        "--dataset", choices=DATASETS, required=True, help="which loader (its test split is evaluated)"
    )
    evaluate.add_argument(
        "--data-root", type=Path, help="dataset folder (fashion-mnist: the idx files, default Debian's)"
    )
    evaluate.add_argument(
        "--masks",
        help="object masks of the evaluated images: a .npy / .npz file of booleans (N, H, W), or a rule: "
        f"{', '.join(sorted(MASK_RULE_NAMES))} (raw pixel > 0; the default for --dataset fashion-mnist)",
    )
    evaluate.add_argument(
        "--parts",
        type=Path,
        help="part keypoints: for cub200 the CUB_200_2011 folder (parts/part_locs.txt), else a JSON file with one "
        "{part: [x, y]} object per evaluated image",
    )
    evaluate.add_argument("--out", type=Path, help="report file (default: interpretability.json in the model folder)")
    evaluate.add_argument(
        "--max-images", type=positive_int, default=100, help="images for the box, part and deletion metrics"
    )
    evaluate.add_argument("--limit", type=positive_int, help="evaluate only the first N test images")
    evaluate.add_argument(
        "--localisation", choices=("both", "upsampled", "gradient"), default="both", help="where a slot's box is"
    )
    evaluate.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an existing report (default: refuse)")

    push = commands.add_parser(
        "push", parents=[debug], help="push a model folder to the Hub in one commit, with pictures and card"
    )
    push.add_argument("folder", type=Path, help="model folder (written by train, project, convert or save_pretrained)")
    push.add_argument("repo_id", help="Hub repo id, e.g. my-org/protopool-cub")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.add_argument("--revision", help="branch to push to (default: main)")
    push.add_argument("--commit-message", default="Upload ProtoPool model", help="message of the Hub commit")

    convert = commands.add_parser(
        "convert", parents=[debug], help="convert a checkpoint of the official ProtoPool code"
    )
    convert.add_argument("checkpoint", type=Path, help="official best_model.pth / best_model_push.pth")
    convert.add_argument("output_dir", type=Path, help="folder for the converted model")
    convert.add_argument("--backbone", default="resnet50", help="timm name of the official --arch (also for --inat)")
    convert.add_argument(
        "--overwrite", action="store_true", help="replace the model already in OUTPUT_DIR (default: refuse)"
    )
    convert.add_argument("--labels", type=Path, help="text file with one class name per line, in training order")
    convert.add_argument("--gumbel-scale", type=float, default=1e4, help="assignment scale (official final: 1e4)")

    export = commands.add_parser(
        "export", help="export a model to ONNX with its explanations (logits, similarities, maps)"
    )
    export.add_argument("model", help="model folder or Hub repo id")
    export.add_argument("output", type=Path, help="the .onnx file to write")
    export.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    export.add_argument("--static-batch", action="store_true", help="fix the batch size at 1 (default: dynamic)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    export.add_argument("--no-check", action="store_true", help="skip the onnxruntime-vs-PyTorch comparison")

    app = commands.add_parser("app", parents=[debug], help="serve the explorer (a gradio app) on a model")
    app.add_argument("model", help="model folder or Hub repo id")
    app.add_argument("--port", type=positive_int, default=7860, help="port to serve on")
    app.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")

    space = commands.add_parser(
        "space", parents=[debug], help="write a Hugging Face Space folder running the explorer"
    )
    space.add_argument("model", help="Hub repo id of the model (or its local folder, with --repo-id)")
    space.add_argument("out_dir", type=Path, help="the Space folder to write")
    space.add_argument("--repo-id", help="the Hub repo the Space loads (default: MODEL when it is a repo id)")
    space.add_argument("--overwrite", action="store_true", help="replace the Space files already in OUT_DIR")
    return parser


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", choices=DATASETS, required=True, help="which loader")
    group.add_argument(
        "--data-root",
        type=Path,
        help="dataset folder (fashion-mnist: the idx files, default Debian's; folder: with train/ and test/ or classes)",
    )
    group.add_argument("--limit", type=positive_int, help="use only the first N training images (quick runs)")
    group.add_argument(
        "--skip-bad-images", action="store_true", help="skip unreadable images (one warning each) instead of stopping"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Every error is printed as one line on stderr, with status 2; `--debug` re-raises it with its traceback.
    Usage errors (argparse) exit with status 2 as well, from `parse_args`.
    """
    args = build_parser().parse_args(argv)
    try:
        with cli_log_wording():
            from .cli_commands import COMMANDS  # the commands' module, imported only when one runs

            return COMMANDS[args.command](args)
    except Exception as error:
        if args.debug:
            raise
        print(error_line(args.command, error), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
