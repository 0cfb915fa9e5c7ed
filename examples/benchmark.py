"""Benchmarks of protopool-hf: head speed against the official code, training-step overhead, projection, accuracy.

Every subcommand prints a table and writes the same figures as JSON (default `demo-output/benchmarks/<name>.json`).
Timings are medians of repeated runs, taken side by side (the two contenders alternate within each repetition), so
a shared, noisy machine slows both alike; ratios are the numbers to quote.

    python examples/benchmark.py head --official /path/to/gmum/ProtoPool   # ours vs the official head + loss
    python examples/benchmark.py projection                                # project_prototypes vs an eval pass
    python examples/benchmark.py speed                                     # step time, throughput, memory
    python examples/benchmark.py accuracy                                  # ProtoPool vs a linear head, Fashion-MNIST
    python examples/benchmark.py cli                                       # `protopool-hf [COMMAND] --help` start-up
    python examples/benchmark.py deploy                                    # eager vs torch.compile vs onnxruntime
    python examples/benchmark.py app                                       # the explorer's /explain, request to picture

`--quick` shrinks every subcommand to a check of a few seconds to a few minutes. The CUB setting is C=200
classes, P=202 prototypes, S=10 slots, D=256 (`ProtoPoolConfig.from_preset("cub200")`); backbones are built with
`pretrained=False` (timings do not depend on the weights), so nothing is downloaded.

The official code (gmum/ProtoPool) is imported at run time from the checkout given by `--official`; it is never
copied into this repository. Its `torch.Tensor.cuda` calls are made no-ops, and `torch.utils.tensorboard` and `cv2`
(used only by its logging and projection) are replaced by empty modules.
"""

import argparse
import ast
import importlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


EXAMPLES = Path(__file__).resolve().parent
CUB = {"num_labels": 200, "num_prototypes": 202, "num_slots_per_class": 10, "prototype_dim": 256}
# The official Gumbel scale of the first training epoch: 1000·sqrt(1/30).
EPOCH1_SCALE = 1000 * math.sqrt(1 / 30)


# --------------------------------------------------------------------------- helpers
def machine() -> dict[str, Any]:
    """What ran the benchmark."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def sync(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock timings are complete."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_side_by_side(
    contenders: dict[str, Callable[[], Any]], repeats: int, warmup: int, device: torch.device
) -> dict[str, dict[str, float]]:
    """Median, min and max seconds of each callable; the contenders alternate within every repetition."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    sync(device)
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            samples[name].append(time.perf_counter() - start)
    return {
        name: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "repeats": len(v)}
        for name, v in samples.items()
    }


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    """A plain-text table."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write the figures (with the command line and the machine) as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {path}")


def protopool_model(backbone: str, **overrides: Any) -> Any:
    """A ProtoPool model at the CUB setting on a timm backbone (random weights)."""
    from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification

    config = ProtoPoolConfig(backbone=backbone, **{**CUB, **overrides})
    return ProtoPoolForImageClassification(config)


def linear_model(backbone: str, num_classes: int = CUB["num_labels"]) -> torch.nn.Module:
    """The same timm backbone with its ordinary pooled linear head."""
    import timm

    return timm.create_model(backbone, pretrained=False, num_classes=num_classes)


def protopool_step(model: Any, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, amp: Any) -> None:
    """One training step: forward with the full loss, backward, Adam."""
    with amp():
        loss = model(x, labels=y).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def linear_step(model: Any, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, amp: Any) -> None:
    """One training step of the plain classifier: forward, cross-entropy, backward, Adam."""
    with amp():
        loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def joint_optimizer(model: Any, lr: float = 1e-3) -> torch.optim.Optimizer:
    """The official joint-phase Adam (backbone lr/10, head 3·lr; the last layer frozen)."""
    from protopool_hf.phases import protopool_param_groups

    return torch.optim.Adam(protopool_param_groups(model, lr, "joint"))


# --------------------------------------------------------------------------- official code
def import_official(path: str | os.PathLike) -> tuple[Any, Any, Path]:
    """Import the official `model` and `main` modules from a checkout (with the stand-ins described above)."""
    path = Path(path).expanduser().resolve()
    if not (path / "model.py").is_file() or not (path / "main.py").is_file():
        raise FileNotFoundError(
            f"{path} is not a checkout of gmum/ProtoPool (model.py and main.py are missing). Clone it and pass "
            "its folder with --official."
        )
    tensorboard = types.ModuleType("torch.utils.tensorboard")
    tensorboard.SummaryWriter = object
    sys.modules["torch.utils.tensorboard"] = tensorboard
    sys.modules.setdefault("cv2", types.ModuleType("cv2"))
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError as exc:
        raise ImportError("The official main.py imports matplotlib: pip install matplotlib.") from exc
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    # The checkout has a `datasets.py` that would shadow Hugging Face `datasets`: import what needs the latter first,
    # and keep the checkout on sys.path only while its modules are imported.
    importlib.import_module("protopool_hf.training")
    sys.path.insert(0, str(path))
    try:
        return importlib.import_module("model"), importlib.import_module("main"), path
    finally:
        sys.path.remove(str(path))


def official_loss_block(main_file: Path) -> tuple[types.CodeType, types.CodeType]:
    """Compile the loss statements of the official training step, taken from `main.py`'s syntax tree at run time.

    Returns:
        The code of the `clst_weight`/`sep_weight`/`criterion` assignments, and of the training-step statements
        from the cross-entropy to the total `loss` (the per-step `np.savez_compressed` and logging lie outside).
    """
    tree = ast.parse(main_file.read_text())
    learn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "learn_model")

    def assigns(node: ast.AST, name: str) -> bool:
        return any(
            isinstance(sub, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in sub.targets)
            for sub in ast.walk(node)
        )

    constants = [
        n
        for n in ast.walk(learn)
        if isinstance(n, ast.Assign)
        and len(n.targets) == 1
        and isinstance(n.targets[0], ast.Name)
        and n.targets[0].id in {"clst_weight", "sep_weight", "criterion"}
    ]
    loops = [
        n
        for n in ast.walk(learn)
        if isinstance(n, ast.For)
        and isinstance(n.iter, ast.Name)
        and n.iter.id == "trn_tqdm"  # the main-phase training loop (fine-tuning's has no cluster term)
        and assigns(n, "clst_loss_val")
    ]
    if len(constants) != 3 or len(loops) != 1:
        raise RuntimeError(f"{main_file}: the training loop's loss statements were not found (is it @ 2bd4288?).")
    body = loops[0].body
    start = next(i for i, n in enumerate(body) if assigns(n, "entropy_loss"))
    stop = next(
        i
        for i, n in enumerate(body)
        if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "loss" for t in n.targets)
    )
    block = ast.Module(body=body[start : stop + 1], type_ignores=[])
    return (
        compile(ast.Module(body=constants, type_ignores=[]), str(main_file), "exec"),
        compile(block, str(main_file), "exec"),
    )


class OfficialStep:
    """The official model's forward (from its `conv_features`) plus its loss statements, as one callable.

    With `head_only` the backbone is replaced by `nn.Identity`, so the input is the backbone's feature map.
    """

    def __init__(self, official_dir: str | os.PathLike, backbone: str, head_only: bool) -> None:
        model_module, main_module, path = import_official(official_dir)
        torch.manual_seed(0)
        self.model = model_module.PrototypeChooser(
            num_prototypes=CUB["num_prototypes"],
            num_descriptive=CUB["num_slots_per_class"],
            num_classes=CUB["num_labels"],
            use_thresh=True,
            arch=backbone,
            pretrained=False,
            add_on_layers_type="log",
            prototype_activation_function="log",
            proto_depth=CUB["prototype_dim"],
            use_last_layer=True,
        )
        if head_only:
            self.model.features = torch.nn.Identity()
        self.model.train()
        constants, self.block = official_loss_block(path / "main.py")
        self.namespace: dict[str, Any] = dict(vars(main_module))
        exec(constants, self.namespace)
        self.namespace.update(
            model=self.model,
            model_multi=types.SimpleNamespace(module=self.model),
            args=types.SimpleNamespace(
                mixup_data=False,
                pp_ortho=True,
                num_descriptive=CUB["num_slots_per_class"],
                num_classes=CUB["num_labels"],
                num_prototypes=CUB["num_prototypes"],
            ),
        )

    def loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Forward at the first epoch's Gumbel scale, then the official loss statements."""
        prob, min_distances, proto_presence = self.model(x, gumbel_scale=EPOCH1_SCALE)
        self.namespace.update(
            prob=prob,
            min_distances=min_distances,
            proto_presence=proto_presence,
            label=labels,
            label_p=labels.tolist(),
        )
        exec(self.block, self.namespace)
        return self.namespace["loss"]

    def joint_optimizer(self, lr: float = 1e-3) -> torch.optim.Optimizer:
        """The official joint optimizer's groups (features lr/10, add-on and prototypes 3·lr, wd 1e-3)."""
        m = self.model
        return torch.optim.Adam(
            [
                {"params": m.features.parameters(), "lr": lr / 10, "weight_decay": 1e-3},
                {"params": m.add_on_layers.parameters(), "lr": 3 * lr, "weight_decay": 1e-3},
                {"params": [m.prototype_vectors], "lr": 3 * lr},
                {"params": [m.proto_presence], "lr": 3 * lr},
            ]
        )


# --------------------------------------------------------------------------- head
def bench_head(args: argparse.Namespace) -> dict[str, Any]:
    """Head + loss forward/backward against the official code, and whole training steps against a linear head."""
    from protopool_hf.losses import (
        LossWeights,
        cluster_loss,
        l1_off_class_loss,
        orthogonality_loss,
        separation_loss,
        weighted_total,
    )
    from protopool_hf.modeling_protopool import ProtoPoolHead

    torch.set_num_threads(args.threads)
    repeats = 5 if args.quick else args.repeats
    batch, size = args.batch, args.image_size
    channels, side = 512, size // 32  # resnet18's last map
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, CUB["num_labels"], (batch,), generator=generator)
    features = torch.rand(batch, channels, side, side, generator=generator).requires_grad_(True)
    device = torch.device("cpu")

    head = ProtoPoolHead(
        channels,
        num_classes=CUB["num_labels"],
        num_prototypes=CUB["num_prototypes"],
        num_slots_per_class=CUB["num_slots_per_class"],
        prototype_dim=CUB["prototype_dim"],
    ).train()
    head.gumbel_scale.fill_(EPOCH1_SCALE)
    weights, slots = LossWeights(), CUB["num_slots_per_class"]

    def ours() -> None:
        out = head(features)
        own = out.slot_assignment[labels]
        terms = {
            "cross_entropy": F.cross_entropy(out.logits, labels),
            "cluster": cluster_loss(out.min_distances, own, slots),
            "separation": separation_loss(out.min_distances, own, slots),
            "orthogonality": orthogonality_loss(head.slot_logits),
            "l1": l1_off_class_loss(head.last_layer.weight, slots),
        }
        weighted_total(terms, weights).backward()
        head.zero_grad(set_to_none=True)
        features.grad = None

    contenders = {"protopool-hf head+loss": ours}
    official_head = None
    if args.official:
        official_head = OfficialStep(args.official, "resnet18", head_only=True)

        def official() -> None:
            official_head.loss(features, labels).backward()
            official_head.model.zero_grad(set_to_none=True)
            features.grad = None

        contenders["official head+loss"] = official
    head_times = time_side_by_side(contenders, repeats, 2, device)

    # Whole training steps: resnet18 + ProtoPool head + loss + Adam vs resnet18 + linear head + CE + Adam.
    x = torch.randn(batch, 3, size, size, generator=generator)
    protopool = protopool_model("resnet18", input_size=[3, size, size]).train()
    protopool.set_gumbel_scale(EPOCH1_SCALE)
    pp_opt = joint_optimizer(protopool)
    linear = linear_model("resnet18").train()
    lin_opt = torch.optim.Adam(linear.parameters(), lr=1e-4, weight_decay=1e-3)
    amp = torch.autocast("cpu", enabled=False)
    steps = {
        "resnet18 + protopool-hf step": lambda: protopool_step(protopool, pp_opt, x, labels, lambda: amp),
        "resnet18 + linear step": lambda: linear_step(linear, lin_opt, x, labels, lambda: amp),
    }
    official_full = None
    if args.official:
        official_full = OfficialStep(args.official, "resnet18", head_only=False)
        off_opt = official_full.joint_optimizer()

        def official_step() -> None:
            official_full.loss(x, labels).backward()
            off_opt.step()
            off_opt.zero_grad(set_to_none=True)

        steps["resnet18 + official step"] = official_step
    step_times = time_side_by_side(steps, max(3, repeats // 2), 1, device)

    timings = {**head_times, **step_times}
    ratios = {
        "step_protopool_over_linear": step_times["resnet18 + protopool-hf step"]["median_s"]
        / step_times["resnet18 + linear step"]["median_s"]
    }
    if args.official:
        ratios["head_official_over_ours"] = (
            head_times["official head+loss"]["median_s"] / head_times["protopool-hf head+loss"]["median_s"]
        )
        ratios["step_official_over_ours"] = (
            step_times["resnet18 + official step"]["median_s"] / step_times["resnet18 + protopool-hf step"]["median_s"]
        )
    rows = [
        [name, t["median_s"] * 1000, t["min_s"] * 1000, t["max_s"] * 1000, t["repeats"]] for name, t in timings.items()
    ]
    print_table(
        f"head benchmark: C=200 P=202 S=10 D=256, batch {batch}, resnet18 map 512x{side}x{side}, "
        f"{args.threads} thread(s)",
        ["what", "median ms", "min ms", "max ms", "runs"],
        rows,
    )
    print_table("ratios", ["ratio", "value"], [[k, v] for k, v in ratios.items()])
    if not args.official:
        print("\n(no --official checkout given: the official code's rows are missing)")
    return {
        "setting": {**CUB, "batch": batch, "feature_map": [channels, side, side], "threads": args.threads},
        "timings": timings,
        "ratios": ratios,
        "official": str(args.official) if args.official else None,
    }


# --------------------------------------------------------------------------- projection
def bench_projection(args: argparse.Namespace) -> dict[str, Any]:
    """`project_prototypes` against one plain eval pass of the same model over the same batches."""
    from protopool_hf import project_prototypes

    torch.set_num_threads(args.threads)
    images = 16 if args.quick else args.images
    size = 96 if args.quick else args.image_size
    batch = min(args.batch_size, images)
    generator = torch.Generator().manual_seed(0)
    model = protopool_model(args.backbone, input_size=[3, size, size]).eval()
    batches = []
    for start in range(0, images, batch):
        n = min(batch, images - start)
        batches.append(
            {
                "pixel_values": torch.randn(n, 3, size, size, generator=generator),
                "labels": torch.randint(0, CUB["num_labels"], (n,), generator=generator),
            }
        )

    def eval_pass() -> None:
        with torch.no_grad():
            for b in batches:
                model(b["pixel_values"])

    results = []

    def projection() -> None:
        results.append(project_prototypes(model, batches, harden=False))

    timings = time_side_by_side(
        {"eval pass": eval_pass, "project_prototypes": projection}, 1 if args.quick else args.repeats, 1, model.device
    )
    ratio = timings["project_prototypes"]["median_s"] / timings["eval pass"]["median_s"]
    rows = [[k, t["median_s"], t["min_s"], t["max_s"], t["repeats"]] for k, t in timings.items()]
    print_table(
        f"projection: {args.backbone} at {size} px, {images} images (labels from 200 classes), batch {batch}, "
        f"P=202, {args.threads} thread(s)",
        ["what", "median s", "min s", "max s", "runs"],
        rows,
    )
    print_table("ratio", ["ratio", "value"], [["projection / eval pass", ratio]])
    return {
        "setting": {**CUB, "backbone": args.backbone, "images": images, "image_size": size, "batch": batch},
        "timings": timings,
        "ratio_projection_over_eval": ratio,
        "prototypes_projected": int(results[-1].is_projected.sum()) if results else None,
    }


# --------------------------------------------------------------------------- speed
def _amp(device: torch.device, bf16: bool) -> Callable[[], Any]:
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def _speed_one(backbone: str, device: torch.device, batch: int, eval_batch: int, bf16: bool, channels_last: bool,
               repeats: int, size: int) -> dict[str, Any]:  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=generator).to(device)
    y = torch.randint(0, CUB["num_labels"], (batch,), generator=generator).to(device)
    xe = torch.randn(eval_batch, 3, size, size, generator=generator).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, xe = x.contiguous(memory_format=fmt), xe.contiguous(memory_format=fmt)
    protopool = protopool_model(backbone, input_size=[3, size, size]).to(device, memory_format=fmt).train()
    protopool.set_gumbel_scale(EPOCH1_SCALE)
    linear = linear_model(backbone).to(device, memory_format=fmt).train()
    pp_opt = joint_optimizer(protopool)
    lin_opt = torch.optim.Adam(linear.parameters(), lr=1e-4, weight_decay=1e-3)
    amp = _amp(device, bf16)
    train = time_side_by_side(
        {
            "protopool": lambda: protopool_step(protopool, pp_opt, x, y, amp),
            "linear": lambda: linear_step(linear, lin_opt, x, y, amp),
        },
        repeats,
        1,
        device,
    )
    protopool.eval()
    linear.eval()

    def infer(model: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), amp():
                model(xe)

        return run

    evaluation = time_side_by_side({"protopool": infer(protopool), "linear": infer(linear)}, repeats, 1, device)
    return {
        "train_step_s": {k: v["median_s"] for k, v in train.items()},
        "train_ratio": train["protopool"]["median_s"] / train["linear"]["median_s"],
        "eval_images_per_s": {k: eval_batch / v["median_s"] for k, v in evaluation.items()},
        "eval_ratio": evaluation["protopool"]["median_s"] / evaluation["linear"]["median_s"],
        "raw": {"train": train, "eval": evaluation},
    }


def _memory_child(args: argparse.Namespace) -> None:
    """Run in a fresh process: build one model, take training steps, print the resident-set sizes as JSON."""
    torch.set_num_threads(args.threads)
    size = args.image_size

    def rss_mb() -> float:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, size, size, generator=generator)
    y = torch.randint(0, CUB["num_labels"], (args.batch,), generator=generator)
    amp = _amp(torch.device("cpu"), False)
    if args.kind == "protopool":
        model = protopool_model(args.backbone, input_size=[3, size, size]).train()
        model.set_gumbel_scale(EPOCH1_SCALE)
        optimizer, step = joint_optimizer(model), protopool_step
    else:
        model = linear_model(args.backbone).train()
        optimizer, step = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-3), linear_step
    # ru_maxrss cannot measure the step: Linux keeps the high-water mark across fork + exec, so a child reports at
    # least its parent's size. A thread samples the resident set during the steps instead.
    before = rss_mb()
    sampled = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            sampled.append(rss_mb())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for _ in range(2):
        step(model, optimizer, x, y, amp)
    stop.set()
    sampler.join()
    sampled.append(rss_mb())
    print(
        json.dumps(
            {
                "rss_before_step_mb": before,
                "step_peak_rss_mb": max(sampled),
                "step_increase_mb": max(sampled) - before,
                "process_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
            }
        )
    )


def _measure_memory(backbone: str, kind: str, batch: int, size: int, threads: int) -> dict[str, float]:
    command = [
        sys.executable, str(Path(__file__).resolve()), "_memory", "--backbone", backbone, "--kind", kind,
        "--batch", str(batch), "--image-size", str(size), "--threads", str(threads),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement failed for {backbone}/{kind}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_speed(args: argparse.Namespace) -> dict[str, Any]:
    """Training-step time, eval throughput and peak memory: ProtoPool vs the same backbone with a linear head."""
    torch.set_num_threads(args.threads)
    gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if gpu else "cpu")
    backbones = args.backbones or (["resnet18"] if args.quick else ["resnet18", "resnet50"])
    size = 64 if args.quick else args.image_size
    repeats = 2 if args.quick else args.repeats
    if gpu:
        batch, eval_batch, bf16, channels_last = 64, 64, True, True
    else:
        batch, eval_batch, bf16, channels_last = args.batch, args.eval_batch, args.bf16, args.channels_last
    results: dict[str, Any] = {}
    rows = []
    for backbone in backbones:
        result = _speed_one(backbone, device, batch, eval_batch, bf16, channels_last, repeats, size)
        if gpu:
            memory = {}
            for kind in ("protopool", "linear"):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                model = (protopool_model(backbone, input_size=[3, size, size]) if kind == "protopool" else
                         linear_model(backbone)).to(device, memory_format=torch.channels_last).train()  # fmt: skip
                optimizer = joint_optimizer(model) if kind == "protopool" else torch.optim.Adam(model.parameters())
                step = protopool_step if kind == "protopool" else linear_step
                x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
                y = torch.randint(0, CUB["num_labels"], (batch,), device=device)
                before = torch.cuda.memory_allocated(device) / 2**20
                for _ in range(2):
                    step(model, optimizer, x, y, _amp(device, True))
                peak = torch.cuda.max_memory_allocated(device) / 2**20
                memory[kind] = {"peak_allocated_mb": peak, "step_increase_mb": peak - before}
                del model, optimizer
        else:
            memory = {
                kind: _measure_memory(backbone, kind, batch, size, args.threads) for kind in ("protopool", "linear")
            }
        result["memory"] = memory
        results[backbone] = result
        mem_key = "peak_allocated_mb" if gpu else "step_peak_rss_mb"
        inc_key = "step_increase_mb"
        rows.append(
            [
                backbone,
                result["train_step_s"]["protopool"] * 1000,
                result["train_step_s"]["linear"] * 1000,
                result["train_ratio"],
                result["eval_images_per_s"]["protopool"],
                result["eval_images_per_s"]["linear"],
                result["eval_ratio"],
                memory["protopool"][mem_key],
                memory["linear"][mem_key],
                memory["protopool"][inc_key],
                memory["linear"][inc_key],
            ]
        )
    where = torch.cuda.get_device_name() if gpu else f"CPU, {args.threads} thread(s)"
    memory_note = (
        "peak MB: torch.cuda.max_memory_allocated over two training steps; step +MB: that peak over the memory "
        "allocated before the steps"
        if gpu
        else "peak MB: the process's resident set sampled every 0.5 ms during two training steps (fresh process per "
        "model); step +MB: that peak over the resident set right before the steps"
    )
    print_table(
        f"speed: CUB head (C=200 P=202 S=10 D=256) vs linear head, {size} px, train batch {batch}, eval batch "
        f"{eval_batch}, {'bf16 autocast, ' if bf16 else ''}{'channels-last, ' if channels_last else ''}{where}",
        [
            "backbone", "step ms (pp)", "step ms (lin)", "step ratio", "eval img/s (pp)", "eval img/s (lin)",
            "eval time ratio", "peak MB (pp)", "peak MB (lin)", "step +MB (pp)", "step +MB (lin)",
        ],
        rows,
    )  # fmt: skip
    print(memory_note)
    return {
        "memory_note": memory_note,
        "setting": {
            **CUB, "image_size": size, "batch": batch, "eval_batch": eval_batch, "bf16": bf16,
            "channels_last": channels_last, "device": where,
        },
        "results": results,
    }  # fmt: skip


# --------------------------------------------------------------------------- accuracy
def bench_accuracy(args: argparse.Namespace) -> dict[str, Any]:
    """ProtoPool (the demo's recipe) vs the timm model with its linear head: same backbone, data, size, budget."""
    sys.path.insert(0, str(EXAMPLES))
    import demo

    settings = demo.quick_settings() if args.quick else demo.DemoSettings()
    if args.train_images:
        settings.train_images = args.train_images
    demo.apply_overrides(settings, args.set)
    torch.set_num_threads(args.threads)
    if args.protopool_metrics:
        # Reuse a finished demo run (its metrics.json) instead of training ProtoPool again: same settings only.
        protopool = json.loads(Path(args.protopool_metrics).read_text())
        theirs = {k: v for k, v in protopool.get("settings", {}).items() if k != "threads"}
        ours = {k: v for k, v in json.loads(json.dumps(settings.to_dict())).items() if k != "threads"}
        if theirs != ours:
            raise ValueError(
                f"{args.protopool_metrics} was written with other settings than this benchmark's: run the demo with "
                "the same settings, or leave --protopool-metrics out to train ProtoPool here."
            )
    else:
        out = Path(args.output).parent / "accuracy-run"
        protopool = demo.run_protopool(settings, out, save_pictures=False)
    rows = [["ProtoPool", protopool["test_accuracy"], protopool["prototypes_used"], protopool["train_seconds"]]]
    baselines = {}
    for baseline in args.baselines:
        baselines[baseline] = result = demo.run_linear_baseline(settings, at_feature_stage=baseline == "stage")
        name = "timm linear head" if baseline == "timm" else f"linear head on stage {settings.feature_stage} (pooled)"
        rows.append([name, result["test_accuracy"], "-", result["train_seconds"]])
    print_table(
        f"accuracy on the Fashion-MNIST test split ({protopool['test_images']} images): {settings.backbone}, "
        f"{settings.image_size} px, {settings.train_images} training images, "
        f"{settings.warmup_epochs + settings.joint_epochs} epochs",
        ["model", "test accuracy", "prototypes used", "train s"],
        rows,
    )
    return {
        "settings": settings.to_dict(),
        "protopool": protopool,
        "linear": baselines.get("timm"),
        "stage_linear": baselines.get("stage"),
        "gap_points": {k: 100 * (v["test_accuracy"] - protopool["test_accuracy"]) for k, v in baselines.items()},
    }


# --------------------------------------------------------------------------- cli
CLI_COMMANDS = ("", "train", "project", "explain", "evaluate", "push", "convert", "export", "app", "space")


def bench_cli(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds of `protopool-hf --help` and `protopool-hf COMMAND --help`, each in a fresh Python process.

    The processes run `python -m protopool_hf.cli` with this checkout first on PYTHONPATH (what the console script
    runs); the commands alternate within each repetition, and the median of the repetitions is reported.
    """
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(EXAMPLES.parent), os.environ.get("PYTHONPATH")])),
    }
    repeats = 3 if args.quick else args.repeats
    samples: dict[str, list[float]] = {command: [] for command in CLI_COMMANDS}
    for _ in range(repeats):
        for command in CLI_COMMANDS:
            argv = [sys.executable, "-m", "protopool_hf.cli", *([command] if command else []), "--help"]
            start = time.perf_counter()
            subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
            samples[command].append(time.perf_counter() - start)
    check = "import sys, protopool_hf.cli; print(int('torch' in sys.modules or 'transformers' in sys.modules))"
    heavy = subprocess.run([sys.executable, "-c", check], env=env, check=True, capture_output=True, text=True)
    rows, results = [], {}
    for command, times in samples.items():
        name = f"protopool-hf {command} --help".replace("  ", " ")
        results[name] = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}
        rows.append([name, f"{statistics.median(times):.3f}", f"{min(times):.3f}", f"{max(times):.3f}"])
    print_table(f"CLI start-up, {repeats} fresh processes each", ["command", "median s", "min s", "max s"], rows)
    imports_heavy = heavy.stdout.strip() == "1"
    print(f"`import protopool_hf.cli` imports torch or transformers: {imports_heavy}")
    return {"machine": machine(), "repeats": repeats, "commands": results, "cli_imports_torch": imports_heavy}


# --------------------------------------------------------------------------- deploy
def bench_deploy(args: argparse.Namespace) -> dict[str, Any]:
    """Eval throughput of eager PyTorch, `torch.compile` and onnxruntime side by side, with their one-time costs."""
    import tempfile

    import onnxruntime

    from protopool_hf.export import export_onnx

    torch.set_num_threads(args.threads)
    gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if gpu else "cpu")
    backbone = "test_resnet" if args.quick else args.backbone
    size = 64 if args.quick else args.image_size
    batch, repeats = (4, 3) if args.quick else (args.batch, args.repeats)
    model = protopool_model(backbone, input_size=[3, size, size], backbone_pretrained=False).eval()
    model.set_gumbel_scale(EPOCH1_SCALE)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    costs: dict[str, float] = {}

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        path = export_onnx(model, Path(folder) / "model.onnx")
        costs["onnxruntime"] = time.perf_counter() - start
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
        start = time.perf_counter()
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        costs["onnxruntime"] += time.perf_counter() - start
    model.to(device)
    x_device, x_numpy = x.to(device), x.numpy()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        start = time.perf_counter()
        compiled(x_device)  # the first call compiles
        sync(device)
        costs["compiled"] = time.perf_counter() - start
        reference = model(x_device).logits.float().cpu()
        differences = {
            "compiled": float((compiled(x_device).logits.float().cpu() - reference).abs().max()),
            "onnxruntime": float((torch.from_numpy(session.run(["logits"], {"pixel_values": x_numpy})[0]) - reference)
                                 .abs().max()),
        }  # fmt: skip

    def eager() -> None:
        with torch.no_grad():
            model(x_device)

    def compiled_run() -> None:
        with torch.no_grad():
            compiled(x_device)

    def onnx_run() -> None:
        session.run(["logits", "similarities", "activations"], {"pixel_values": x_numpy})

    contenders = {"eager": eager, "compiled": compiled_run}
    if gpu:
        bf16_model = protopool_model(backbone, input_size=[3, size, size]).eval()
        bf16_model.load_state_dict(model.state_dict())
        bf16_model.to(device, dtype=torch.bfloat16)  # the head computes in float32 regardless

        def eager_bf16() -> None:
            with torch.no_grad():
                bf16_model(x_device.bfloat16())

        contenders["eager_bf16"] = eager_bf16
    else:
        contenders["onnxruntime"] = onnx_run  # the CPU execution provider: compared with CPU torch only
    timings = time_side_by_side(contenders, repeats=repeats, warmup=1, device=device)
    eager_s = timings["eager"]["median_s"]
    rows, results = [], {}
    for name, timing in timings.items():
        result = {
            **timing,
            "images_per_s": batch / timing["median_s"],
            "speedup_vs_eager": eager_s / timing["median_s"],
            "one_time_cost_s": costs.get(name, 0.0),
            "max_abs_logit_difference": differences.get(name, 0.0),
        }
        results[name] = result
        rows.append([name, result["one_time_cost_s"], timing["median_s"], result["images_per_s"],
                     result["speedup_vs_eager"], result["max_abs_logit_difference"]])  # fmt: skip
    title = f"{backbone} at {size} px, CUB head, eval batch {batch}, {args.threads} threads, {device.type}"
    header = ["runtime", "one-time s", "batch s (median)", "images/s", "vs eager", "max |logit diff|"]
    print_table(title, header, rows)
    return {
        "backbone": backbone,
        "image_size": size,
        "batch": batch,
        "device": device.type,
        "load_average_1min": os.getloadavg()[0],
        "results": results,
    }


# --------------------------------------------------------------------------- app
# The explorer's models: the demo's (EfficientNet-Lite0, stage 3, 64 px, Fashion-MNIST's 10 classes, P=50, S=5, D=64)
# and a ResNet-50 at 224 px with the CUB head, both with random weights (pretrained=False: timings do not depend on them).
APP_MODELS = {
    "demo (lite0, 64 px)": {
        "backbone": "tf_efficientnet_lite0", "feature_stage": 3, "input_size": [3, 64, 64], "crop_pct": 1.0,
        "num_labels": 10, "num_prototypes": 50, "num_slots_per_class": 5, "prototype_dim": 64,
    },
    "resnet50, 224 px, CUB head": {"backbone": "resnet50", "input_size": [3, 224, 224], **CUB},
}  # fmt: skip


def bench_app(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds from request to picture of the explorer's `/explain`, through gradio_client (median of repeats).

    Each model is saved to a folder, served by `protopool_hf.app.build_app` on 127.0.0.1 in this process, and asked
    to explain a 512 px photo; the client uploads the image and downloads the picture, as a user's script would.
    Each request alternates with the same work done in-process (`Explorer.explain`: forward pass, slot maps, the
    rendered picture), so the difference is the app's own cost (HTTP, queue, PNG encoding, files).
    """
    import socket
    import tempfile

    from gradio_client import Client, handle_file

    from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification
    from protopool_hf.app import build_app
    from protopool_hf.explorer import Explorer, read_upload

    torch.set_num_threads(args.threads)
    image = sorted((EXAMPLES.parent / "tests" / "data" / "photos").glob("*.jpg"))[0]
    repeats = 3 if args.quick else args.repeats
    models = (
        {"test_resnet, 64 px": {"backbone": "test_resnet", "input_size": [3, 64, 64]}} if args.quick else APP_MODELS
    )
    rows, results = [], {}
    for name, fields in models.items():
        torch.manual_seed(0)
        model = ProtoPoolForImageClassification(ProtoPoolConfig(backbone_pretrained=False, **fields))
        with tempfile.TemporaryDirectory() as folder, socket.socket() as probe:
            model.save_pretrained(folder)
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
            probe.close()
            app = build_app(folder)
            explorer = Explorer.load(folder)
            app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                for _ in range(2):  # warm-up: first-call allocations, fonts
                    client.predict(handle_file(str(image)), api_name="/explain")
                times, inside = [], []
                for _ in range(repeats):  # through the app, then the same work in-process (no HTTP, no files)
                    start = time.perf_counter()
                    client.predict(handle_file(str(image)), api_name="/explain")
                    times.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    explorer.explain(read_upload(image), None, 5)
                    inside.append(time.perf_counter() - start)
            finally:
                app.close()
        results[name] = {
            "median_s": statistics.median(times),
            "min_s": min(times),
            "max_s": max(times),
            "in_process_median_s": statistics.median(inside),
        }
        rows.append([name, statistics.median(times), min(times), max(times), statistics.median(inside)])
    load = os.getloadavg()[0]
    title = f"/explain through gradio_client, {repeats} requests each, {args.threads} threads, load average {load:.1f}"
    print_table(title, ["model", "median s", "min s", "max s", "in-process explain + picture, median s"], rows)
    return {"repeats": repeats, "image": image.name, "load_average_1min": load, "results": results}


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per benchmark (and `_memory`, the speed benchmark's child process)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, name: str, threads: int = 1) -> None:
        p.add_argument("--quick", action="store_true", help="a small, fast version of the benchmark")
        p.add_argument("--threads", type=int, default=threads, help=f"torch threads (default {threads})")
        p.add_argument("--output", default=f"demo-output/benchmarks/{name}.json", help="where to write the JSON")

    p = sub.add_parser("head", help="head + loss vs the official code; training step vs a linear head")
    common(p, "head")
    p.add_argument("--official", default=None, help="path of a gmum/ProtoPool checkout (for the official rows)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=30)

    p = sub.add_parser("projection", help="project_prototypes vs one eval pass over the same images")
    common(p, "projection")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3)

    p = sub.add_parser("speed", help="step time, eval throughput, peak memory vs the same backbone with a linear head")
    common(p, "speed")
    p.add_argument("--backbones", nargs="*", default=None, help="timm names (default resnet18 resnet50)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8, help="CPU training batch (a GPU uses 64)")
    p.add_argument("--eval-batch", type=int, default=32, help="CPU eval batch (a GPU uses 64)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on the CPU too")
    p.add_argument("--channels-last", action="store_true", help="channels-last on the CPU too")
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even if a GPU is present")

    p = sub.add_parser("accuracy", help="ProtoPool vs the plain timm head on Fashion-MNIST (same budget)")
    common(p, "accuracy", threads=os.cpu_count() or 1)
    p.add_argument("--train-images", type=int, default=None, help="override the demo's training subset size")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a demo setting, as examples/demo.py",
    )
    p.add_argument(
        "--protopool-metrics",
        default=None,
        help="metrics.json of a finished `examples/demo.py` run with the same settings: reuse its ProtoPool result",
    )
    p.add_argument(
        "--baselines",
        nargs="+",
        choices=("timm", "stage"),
        default=["timm"],
        help="timm: the whole timm model with its linear head; stage: a linear head on ProtoPool's own feature "
        "stage, average-pooled (the gap that the head alone makes)",
    )

    p = sub.add_parser("cli", help="`protopool-hf --help` and every `COMMAND --help`, in fresh processes")
    common(p, "cli")
    p.add_argument("--repeats", type=int, default=5)
    p = sub.add_parser("deploy", help="eval images/s of eager, torch.compile and onnxruntime, with one-time costs")
    common(p, "deploy", threads=2)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16, help="eval batch")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even if a GPU is present")

    p = sub.add_parser("app", help="the explorer's /explain through gradio_client: request to picture")
    common(p, "app", threads=2)
    p.add_argument("--repeats", type=int, default=15)

    p = sub.add_parser("_memory", help=argparse.SUPPRESS)
    p.add_argument("--backbone", required=True)
    p.add_argument("--kind", choices=("protopool", "linear"), required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--image-size", type=int, required=True)
    p.add_argument("--threads", type=int, default=1)

    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "_memory":
        _memory_child(args)
        return
    run = {
        "head": bench_head,
        "projection": bench_projection,
        "speed": bench_speed,
        "accuracy": bench_accuracy,
        "cli": bench_cli,
        "deploy": bench_deploy,
        "app": bench_app,
    }
    payload = run[args.command](args)
    write_json(args.output, {"benchmark": args.command, "quick": args.quick, **payload})


if __name__ == "__main__":
    main()
