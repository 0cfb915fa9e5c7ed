"""What each `protopool-hf` subcommand does: `cmd_<name>(args) -> int`, one per subcommand, and their helpers.

`protopool_hf.cli` parses the command line and imports this module only when a command runs; the heavy libraries
(torch, timm, transformers) are imported inside the commands. Each command checks the paths it is given (model, image,
output) with `protopool_hf.cli_messages` before any work is done, and raises on bad input; `protopool_hf.cli.main`
prints the error as one line.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .cli_messages import (
    MASK_RULE_NAMES,
    check_image_file,
    check_model_source,
    check_output_path,
    model_load_error,
    quiet_transformers_loading,
)


__all__ = ["COMMANDS", "load_splits"]


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
    for flag, needs_mask in (
        ("--background-weight", args.background_weight),
        ("--restrict-projection", args.restrict_projection),
    ):
        if needs_mask and args.object_mask is None:
            raise ValueError(f"{flag} needs the object pixels: pass --object-mask nonzero (objects on black).")
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
        ("num_slots_per_class", args.num_slots_per_class),
        ("prototype_dim", args.prototype_dim),
        ("feature_stage", args.feature_stage),
        ("cluster_weight", args.cluster_weight),
        ("separation_weight", args.separation_weight),
        ("last_layer_correct_connection", args.last_layer_correct_connection),
        ("background_weight", args.background_weight),
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
        projection_restrict_to_objects=args.restrict_projection,
        seed=args.seed,
        num_workers=args.num_workers,
        use_cpu=args.cpu,
        bf16=args.bf16,
    )
    skip = args.skip_bad_images
    mask = args.object_mask
    eval_transform = make_transforms(config, train=False, skip_bad_images=skip, object_mask=mask)
    train_transform = make_transforms(
        config, train=True, augmentation=args.augmentation, seed=args.seed, skip_bad_images=skip, object_mask=mask
    )
    result = train_protopool(
        model,
        train.with_transform(train_transform),
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
    folder = Path(args.model).expanduser()
    if args.out is None and not folder.is_dir():
        raise ValueError(f"MODEL {args.model!r} is no local folder: pass --out FILE for the report.")
    out = args.out if args.out is not None else folder / "interpretability.json"
    # The report in the model folder is the one its card shows: the card is refreshed with it.
    into_folder = folder.is_dir() and out.resolve() == (folder / "interpretability.json").resolve()
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
    if into_folder:
        from .hub import refresh_model_card

        print(f"Model card updated: {refresh_model_card(folder, model=model)}")
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
    """`protopool-hf convert`: official checkpoint -> a `save_pretrained` folder.

    The sizes (C, P, S, D) are read from the checkpoint; the preprocessing is the official one
    (224×224 resize without crop, ImageNet mean/std).
    """
    from .configuration_protopool import ProtoPoolConfig
    from .convert import convert_original_checkpoint, load_original_state_dict, original_checkpoint_sizes
    from .hub import check_model_folder, save_pretrained_replacing
    from .preprocessing import OFFICIAL_PREPROCESSING

    if not args.checkpoint.is_file():
        raise FileNotFoundError(f"CHECKPOINT {str(args.checkpoint)!r} does not exist: check the path.")
    check_output_path("OUTPUT_DIR", args.output_dir, folder=True)
    check_model_folder(args.output_dir, args.overwrite, argument="OUTPUT_DIR")
    state_dict = load_original_state_dict(args.checkpoint)
    sizes = original_checkpoint_sizes(state_dict)
    extra: dict[str, Any] = {}
    if args.labels is not None:
        if not args.labels.is_file():
            raise FileNotFoundError(f"--labels {str(args.labels)!r} does not exist.")
        names = [line.strip() for line in args.labels.read_text().splitlines() if line.strip()]
        if len(names) != sizes["num_labels"]:
            raise ValueError(
                f"--labels {str(args.labels)!r} has {len(names)} names but the checkpoint has "
                f"{sizes['num_labels']} classes."
            )
        extra["id2label"] = dict(enumerate(names))
        extra["label2id"] = {name: index for index, name in enumerate(names)}
    if "id2label" not in extra:
        extra["num_labels"] = sizes["num_labels"]
    config = ProtoPoolConfig(
        backbone=args.backbone,
        num_prototypes=sizes["num_prototypes"],
        num_slots_per_class=sizes["num_slots_per_class"],
        prototype_dim=sizes["prototype_dim"],
        **OFFICIAL_PREPROCESSING,
        **extra,
    )
    model = convert_original_checkpoint(state_dict, config, gumbel_scale=args.gumbel_scale)
    save_pretrained_replacing(model, args.output_dir)  # an old model's card and pictures go with it
    print(
        f"Converted {args.checkpoint} (C={sizes['num_labels']}, P={sizes['num_prototypes']}, "
        f"S={sizes['num_slots_per_class']}, D={sizes['prototype_dim']}, backbone {args.backbone}) -> {args.output_dir}"
    )
    return 0


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
