"""The `protopool-hf` command line: train | project | explain | evaluate | push | convert | export | app | space.

Heavy libraries (torch, timm, transformers) are imported inside the subcommands, so `protopool-hf --help` answers at
once (`import protopool_hf` is light too; it registers the Auto classes when transformers' are first imported). Every
subcommand is a function `cmd_<name>(args) -> int`; `main(argv)` parses and dispatches. Every error is one line on
stderr with exit status 2 (`--debug` re-raises it with its traceback); the command-line paths (model, image, output)
are checked before any work is done, and library advice is reworded to name this command line's flags
(`protopool_hf.cli_messages`).

Examples:
    protopool-hf train --dataset fashion-mnist --backbone resnet18 --output-dir runs/fmnist
    accelerate launch --multi_gpu --num_processes 2 examples/train.py --preset cub200 --dataset cub200 --data-root CUB_200_2011 --output-dir runs/cub
    protopool-hf explain runs/fmnist image.png --out explanation.png
    protopool-hf evaluate runs/fmnist --dataset fashion-mnist
    protopool-hf push runs/fmnist my-org/protopool-fmnist
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .cli_messages import (
    check_image_file,
    check_model_source,
    check_output_path,
    cli_log_wording,
    error_line,
    model_load_error,
    non_negative_int,
    positive_int,
    quiet_transformers_loading,
)


__all__ = ["build_parser", "main"]

DATASETS = ("fashion-mnist", "cub200", "cars196", "folder")
MASK_RULE_NAMES = ("fashion-mnist",)  # protopool_hf.metrics.MASK_RULES, named here to keep --help light


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
    model.add_argument("--num-slots", type=int, help="S, slots per class: sets num_slots_per_class")
    model.add_argument("--prototype-dim", type=int, help="D, prototype depth")
    model.add_argument("--feature-stage", type=int, help="use this backbone stage instead of the last map")
    model.add_argument("--image-size", type=int, help="square input size in pixels (default: timm's)")
    model.add_argument("--cluster-weight", type=float, help="weight of the cluster term (official 0.8)")
    model.add_argument("--separation-weight", type=float, help="weight of the separation term (official 0.08)")
    model.add_argument(
        "--last-layer-connection", type=float, help="initial last-layer weight of a slot to its class (official 1)"
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


# ---------------------------------------------------------------------------- data
def load_splits(dataset: str, root: Path | None, limit: int | None = None) -> tuple[Any, Any | None]:
    """The raw training split and the test split (None when the dataset has none) of a named dataset."""
    from . import data

    if dataset == "fashion-mnist":
        train, test = data.load_fashion_mnist(root, "train", limit), data.load_fashion_mnist(root, "test")
        return train, test
    if root is None:
        raise ValueError(f"--dataset {dataset} needs --data-root: the folder of the dataset.")
    if dataset == "cub200":
        train, test = data.load_cub200(root, "train", limit=limit), data.load_cub200(root, "test")
    elif dataset == "cars196":
        train, test = data.load_stanford_cars(root, "train", limit=limit), data.load_stanford_cars(root, "test")
    elif (root / "train").is_dir():
        train = data.load_image_folder(root / "train", limit=limit)
        test = data.load_image_folder(root / "test") if (root / "test").is_dir() else None
    else:
        train, test = data.load_image_folder(root, limit=limit), None
    return train, test


def _labels(dataset: Any) -> list[str]:
    return list(dataset.features["label"].names)


# ---------------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace) -> int:
    """`protopool-hf train`."""
    from .configuration_protopool import ProtoPoolConfig
    from .hub import save_model_folder
    from .modeling_protopool import ProtoPoolForImageClassification
    from .recipe import ProtoPoolRecipe
    from .training import finish_distributed, split_train_validation, train_protopool
    from .transforms import collate_fn, make_transforms

    check_output_path("--output-dir", args.output_dir, folder=True)
    raw_train, raw_test = load_splits(args.dataset, args.data_root, args.limit)
    names = _labels(raw_train)
    overrides: dict[str, Any] = {
        "id2label": dict(enumerate(names)),
        "label2id": {name: i for i, name in enumerate(names)},
        "backbone_pretrained": args.pretrained or args.weights_file is not None,
    }
    for field, value in (
        ("backbone", args.backbone),
        ("num_prototypes", args.num_prototypes),
        ("num_slots_per_class", args.num_slots),
        ("prototype_dim", args.prototype_dim),
        ("feature_stage", args.feature_stage),
        ("cluster_weight", args.cluster_weight),
        ("separation_weight", args.separation_weight),
        ("last_layer_correct_connection", args.last_layer_connection),
    ):
        if value is not None:
            overrides[field] = value
    if args.image_size is not None:
        overrides["input_size"] = [3, args.image_size, args.image_size]
    if args.weights_file is not None:
        if not args.weights_file.is_file():
            raise FileNotFoundError(f"--weights-file {str(args.weights_file)!r} does not exist.")
        overrides["backbone_kwargs"] = {"pretrained_cfg_overlay": {"file": str(args.weights_file.absolute())}}
    config = ProtoPoolConfig.from_preset(args.preset, **overrides) if args.preset else ProtoPoolConfig(**overrides)
    model = ProtoPoolForImageClassification(config)

    train, val = split_train_validation(raw_train, args.val_fraction, args.seed)
    recipe = ProtoPoolRecipe(
        output_dir=str(args.output_dir),
        warmup_epochs=args.warmup_epochs,
        joint_epochs=args.joint_epochs,
        finetune_epochs=args.finetune_epochs,
        learning_rate=args.lr,
        backbone_learning_rate=args.backbone_lr,
        frozen_backbone_stages=args.frozen_backbone_stages,
        finetune_learning_rate=args.finetune_lr,
        train_batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
        projection_batch_size=args.batch_size,
        mixup_alpha=args.mixup_alpha,
        gumbel_per_step=args.gumbel_per_step,
        seed=args.seed,
        num_workers=args.num_workers,
        use_cpu=args.cpu,
        bf16=args.bf16,
    )
    skip = args.skip_bad_images
    eval_transform = make_transforms(config, train=False, skip_bad_images=skip)
    result = train_protopool(
        model,
        train.with_transform(
            make_transforms(config, train=True, augmentation=args.augmentation, seed=args.seed, skip_bad_images=skip)
        ),
        val.with_transform(eval_transform) if len(val) else None,
        train.with_transform(eval_transform),
        recipe,
        data_collator=collate_fn,
        resume_from_checkpoint=args.resume_from_checkpoint,
        test_dataset=raw_test.with_transform(eval_transform) if raw_test is not None else None,
        overwrite=args.overwrite,
    )
    final = result.metrics.get("finetune", {})
    metrics: dict[str, Any] = {k.replace("eval_", "validation_", 1): v for k, v in final.items()}
    metrics.update(result.metrics.get("test", {}))
    if _is_main_process():
        save_model_folder(
            result.model,
            args.output_dir,
            dataset=raw_train,
            metrics=metrics,
            dataset_name=args.dataset_name,
            training_args=recipe.to_dict(),
        )
        print(json.dumps(metrics, indent=2, sort_keys=True))
        print(f"Projected model, prototype pictures and model card in {args.output_dir}")
    finish_distributed()
    return 0


def cmd_project(args: argparse.Namespace) -> int:
    """`protopool-hf project`."""
    from .hub import check_model_folder, save_model_folder
    from .modeling_protopool import ProtoPoolForImageClassification
    from .projection import project_prototypes
    from .transforms import make_transforms

    check_model_source(args.model)
    check_output_path("--output-dir", args.output_dir, folder=True)
    check_model_folder(args.output_dir, args.overwrite, argument="--output-dir")
    model = _load_model(ProtoPoolForImageClassification, args.model)
    raw_train, _ = load_splits(args.dataset, args.data_root, args.limit)
    names = _labels(raw_train)
    expected = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if names != expected:
        first = next(
            (i for i, (a, b) in enumerate(zip(names, expected, strict=False)) if a != b),
            min(len(names), len(expected)),
        )
        ours, theirs = (v[first] if first < len(v) else None for v in (names, expected))
        raise ValueError(
            f"The dataset's {len(names)} classes differ from the model's id2label ({len(expected)} classes), first at "
            f"class {first}: {ours!r} in the dataset, {theirs!r} in the model. Project on the dataset the model was "
            "trained on."
        )
    data = raw_train.with_transform(make_transforms(model.config, train=False, skip_bad_images=args.skip_bad_images))
    # The default name (provenance.dataset_name, e.g. "cub200/train") is the one the pictures recognise.
    result = project_prototypes(model, data, batch_size=args.batch_size)
    print(result.summary())
    save_model_folder(model, args.output_dir, dataset=raw_train)
    print(f"Projected model and prototype pictures in {args.output_dir}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    """`protopool-hf explain`."""
    from transformers import AutoModelForImageClassification

    from .explanation import explain

    check_model_source(args.model)
    check_image_file(args.image)
    check_output_path("--out", args.out, folder=False)
    model = _load_model(AutoModelForImageClassification, args.model).eval()
    explanation = explain(model, args.image, top_k=args.top_k, class_id=args.class_id)
    pictures = Path(args.model) / "prototypes"
    explanation.save(args.out, prototype_images=pictures if pictures.is_dir() else None)
    top = ", ".join(f"{label} {probability:.1%}" for _, label, probability in explanation.top_classes)
    print(f"{args.image}: {top}")
    if args.json:
        print(json.dumps(_top_k_json(explanation), indent=2))
    print(f"Explanation written to {args.out}")
    return 0


def _top_k_json(explanation: Any) -> dict[str, Any]:
    """`explanation.to_dict()` with only the slots owned by the listed classes (and the explained one)."""
    content = explanation.to_dict()
    owners = {class_id for class_id, _, _ in explanation.top_classes} | {explanation.class_id}
    slots = [slot for slot in content["slots"] if slot["class_id"] in owners]
    content["slots_left_out"] = len(content["slots"]) - len(slots)
    content["slots"] = slots
    return content


def _load_model(model_class: Any, model: str) -> Any:
    """`model_class.from_pretrained(model)` after `check_model_source`, without transformers' load report."""
    check_model_source(model)
    try:
        with quiet_transformers_loading():
            return model_class.from_pretrained(model)
    except OSError as error:
        raise model_load_error(model, error) from error


def cmd_evaluate(args: argparse.Namespace) -> int:
    """`protopool-hf evaluate`."""
    check_model_source(args.model)
    if args.out is None and not Path(args.model).expanduser().is_dir():
        raise ValueError(f"MODEL {args.model!r} is no local folder: pass --out FILE for the report.")
    out = args.out if args.out is not None else Path(args.model).expanduser() / "interpretability.json"
    check_output_path("--out", out, folder=False)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{str(out)!r} already exists: pass --overwrite to replace it.")
    masks: Any = args.masks or ("fashion-mnist" if args.dataset == "fashion-mnist" else None)
    if masks is not None and masks not in MASK_RULE_NAMES:
        from .metrics import load_masks

        masks = load_masks(Path(masks), flag="--masks ")
    if args.parts is not None and not args.parts.exists():
        raise FileNotFoundError(f"--parts {str(args.parts)!r} does not exist: check the path.")
    from transformers import AutoModelForImageClassification

    from .interpretability import evaluate_interpretability

    model = _load_model(AutoModelForImageClassification, args.model).eval()
    train, test = load_splits(args.dataset, args.data_root)
    dataset = test if test is not None else train
    if args.limit is not None:
        dataset = dataset.select(range(min(args.limit, len(dataset))))
    parts = projection_parts = None
    if args.parts is not None:
        parts, projection_parts = _read_parts(args, len(dataset), test is not None)
    report = evaluate_interpretability(
        model,
        dataset,
        masks=masks,
        parts=parts,
        projection_dataset=train,
        projection_parts=projection_parts,
        max_images=args.max_images,
        localisation=("upsampled", "gradient") if args.localisation == "both" else args.localisation,
        batch_size=args.batch_size,
        progress=True,
    )
    path = report.save(out, overwrite=args.overwrite)
    from .metrics import report_card

    print(report_card(report).markdown)
    print(f"Interpretability report written to {path}")
    return 0


def _read_parts(args: argparse.Namespace, count: int, from_test: bool) -> tuple[Any, Any]:
    """`--parts`: keypoints of the evaluated split and of the training split (None when not given)."""
    from .parts import PartAnnotations, load_cub_parts

    if args.dataset == "cub200":
        split = "test" if from_test else "train"
        return load_cub_parts(args.parts, split, limit=count), load_cub_parts(args.parts, "train")
    return PartAnnotations.from_json(args.parts, limit=count), None


def cmd_push(args: argparse.Namespace) -> int:
    """`protopool-hf push`."""
    from .hub import push_to_hub

    if not args.folder.is_dir():
        raise FileNotFoundError(f"FOLDER {str(args.folder)!r} is no folder: pass a model folder.")
    if not (args.folder / "config.json").is_file():
        raise FileNotFoundError(f"{args.folder} holds no config.json: pass a folder written by save_pretrained.")
    info = push_to_hub(
        args.folder,
        args.repo_id,
        private=args.private or None,
        revision=args.revision,
        commit_message=args.commit_message,
    )
    print(f"Pushed {args.folder} to {info.commit_url}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """`protopool-hf convert`."""
    from .convert import convert_main
    from .hub import check_model_folder

    if not args.checkpoint.is_file():
        raise FileNotFoundError(f"CHECKPOINT {str(args.checkpoint)!r} does not exist: check the path.")
    check_output_path("OUTPUT_DIR", args.output_dir, folder=True)
    check_model_folder(args.output_dir, args.overwrite, argument="OUTPUT_DIR")
    return convert_main(args)


def cmd_export(args: argparse.Namespace) -> int:
    """`protopool-hf export`."""
    if args.output.suffix != ".onnx":
        raise ValueError(f"The output file name must end in .onnx, got {str(args.output)!r}.")
    if args.output.exists() and not args.overwrite:
        raise FileExistsError(f"{str(args.output)!r} already exists: pass --overwrite to replace it.")
    from transformers import AutoModelForImageClassification

    from .export import OUTPUT_NAMES, check_onnx, export_onnx

    model = AutoModelForImageClassification.from_pretrained(args.model).eval()
    path = export_onnx(
        model, args.output, opset=args.opset, dynamic_batch=not args.static_batch, overwrite=args.overwrite
    )
    print(f"ONNX model written to {path}: input pixel_values, outputs {', '.join(OUTPUT_NAMES)}")
    if not args.no_check:
        check = check_onnx(model, path)
        diffs = ", ".join(f"{name} {value:.1e}" for name, value in check.max_abs_diff.items())
        print(f"onnxruntime vs PyTorch, max |difference|: {diffs}")
        if not check.within(1e-4):
            print("warning: logits or similarities differ by more than 1e-4", file=sys.stderr)
    return 0


def cmd_app(args: argparse.Namespace) -> int:
    """`protopool-hf app`."""
    check_model_source(args.model)
    try:
        from .app import launch
    except ModuleNotFoundError as error:
        if error.name != "gradio":
            raise
        raise ModuleNotFoundError("The explorer needs gradio: pip install 'protopool-hf[app]'.") from None
    print(f"Serving the explorer of {args.model} on http://{args.host}:{args.port}/ (Ctrl+C stops it)")
    launch(args.model, host=args.host, port=args.port)
    return 0


def cmd_space(args: argparse.Namespace) -> int:
    """`protopool-hf space`."""
    from .space import write_space

    check_output_path("OUT_DIR", args.out_dir, folder=True)
    folder = write_space(args.model, args.out_dir, repo_id=args.repo_id, overwrite=args.overwrite)
    print(f"Space folder written to {folder}: app.py, requirements.txt, README.md")
    return 0


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


COMMANDS = {
    "train": cmd_train,
    "project": cmd_project,
    "explain": cmd_explain,
    "evaluate": cmd_evaluate,
    "push": cmd_push,
    "convert": cmd_convert,
    "export": cmd_export,
    "app": cmd_app,
    "space": cmd_space,
}


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Every error is printed as one line on stderr, with status 2; `--debug` re-raises it with its traceback.
    Usage errors (argparse) exit with status 2 as well, from `parse_args`.
    """
    args = build_parser().parse_args(argv)
    try:
        with cli_log_wording():
            return COMMANDS[args.command](args)
    except Exception as error:
        if args.debug:
            raise
        print(error_line(args.command, error), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
