"""Head-only ProtoPool experiments on cached, frozen backbone features (how docs/performance.md's head-only table was made).

Training the whole demo model takes minutes on 2 CPU cores; training only the ProtoPool head on feature
maps that were computed once takes seconds, so many settings can be compared. The protocol (the `run` subcommand):

1. main phase: `epochs` epochs of Adam on the add-on, prototypes and slot logits (the warm-up groups of
   `protopool_param_groups`: 3·lr), all five loss terms, the official per-epoch Gumbel scale, random horizontal flips
   of the feature maps, optional mixup; the last layer stays at its initial weights;
2. projection of every prototype onto the nearest latent patch of a training image of a class that uses it, then the
   assignment is made one-hot;
3. last-layer fine-tuning on the cached slot similarities: Adam (lr `ft_lr`, weight decay 1e-3), CE + 1e-4·L1.

Test accuracy is reported after each step (`soft`: before projection, with the softmax assignment).

    python examples/head_experiments.py cache --image-size 64 --feature-stage 3 --train-images 20000 \\
        --output demo-output/head/feats_64_3.pt
    python examples/head_experiments.py run demo-output/head/feats_64_3.pt \\
        '[{"name": "official weights"}, {"name": "c0.2", "cluster": 0.2, "separation": 0.02}]'

Every key of `HeadSettings` can be set per run; each result is printed and appended to `--log` as a JSON line.
"""

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


EXAMPLES = Path(__file__).resolve().parent
sys.path.insert(0, str(EXAMPLES))


@dataclass
class HeadSettings:
    """One head-only run (defaults: the official numerics at the demo's pool size)."""

    name: str = "run"
    num_prototypes: int = 50
    num_slots_per_class: int = 5
    prototype_dim: int = 64
    epochs: int = 4
    learning_rate: float = 1e-3
    batch_size: int = 64
    mixup_alpha: float = 0.0
    cluster: float = 0.8
    separation: float = 0.08
    orthogonality: float = 1.0
    correct_connection: float = 1.0
    incorrect_connection: float = 0.0
    distinct_init: float = (
        0.0  # > 0: add this to slot logit (c, (c·S + k) mod P, k), so classes start on own prototypes
    )
    slot_logit_std: float | None = None  # None: the official Xavier initialisation
    ft_lr: float = 0.01
    ft_epochs: int = 5
    seed: int = 0


def cache(args: argparse.Namespace) -> None:
    """Run the demo's pretrained backbone once over a training subset and the test split; save the feature maps."""
    import demo

    from protopool_hf import ProtoPoolForImageClassification
    from protopool_hf.data import load_fashion_mnist
    from protopool_hf.transforms import collate_fn, make_transforms

    torch.set_num_threads(args.threads)
    settings = demo.DemoSettings(image_size=args.image_size, feature_stage=args.feature_stage)
    model = ProtoPoolForImageClassification(demo.build_config(settings, demo.ensure_weights())).eval()
    model = model.to(memory_format=torch.channels_last)
    train = load_fashion_mnist(None, split="train").shuffle(seed=0).select(range(args.train_images))
    test = load_fashion_mnist(None, split="test", limit=args.test_images)
    out = {"image_size": args.image_size, "feature_stage": args.feature_stage}
    for split, data in (("train", train.flatten_indices()), ("test", test)):
        data = data.with_transform(make_transforms(model.config, train=False))
        features, labels = [], []
        start = time.perf_counter()
        with torch.no_grad():
            for batch in torch.utils.data.DataLoader(data, batch_size=250, collate_fn=collate_fn):
                pixels = batch["pixel_values"].contiguous(memory_format=torch.channels_last)
                features.append(model.forward_features(pixels).contiguous().half())
                labels.append(batch["labels"])
        out[split] = (torch.cat(features), torch.cat(labels))
        print(f"{split}: {tuple(out[split][0].shape)} in {time.perf_counter() - start:.0f} s", flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, args.output)


def run_head(features: dict, settings: HeadSettings) -> dict:
    """Train, project and fine-tune one ProtoPool head on cached features; return the test accuracies."""
    from protopool_hf.callbacks import gumbel_scale_at
    from protopool_hf.layers import squared_l2_distances
    from protopool_hf.losses import LossWeights, all_loss_terms, l1_off_class_loss, weighted_total
    from protopool_hf.modeling_protopool import ProtoPoolHead

    s = settings
    torch.manual_seed(s.seed)
    (x_train, y_train), (x_test, y_test) = features["train"], features["test"]
    classes = int(y_train.max()) + 1
    head = ProtoPoolHead(
        x_train.shape[1], num_classes=classes, num_prototypes=s.num_prototypes,
        num_slots_per_class=s.num_slots_per_class, prototype_dim=s.prototype_dim,
        correct_connection=s.correct_connection, incorrect_connection=s.incorrect_connection,
    )  # fmt: skip
    with torch.no_grad():
        if s.slot_logit_std is not None:
            head.slot_logits.normal_(0.0, s.slot_logit_std)
        for c in range(classes):
            for k in range(s.num_slots_per_class):
                head.slot_logits[c, (c * s.num_slots_per_class + k) % s.num_prototypes, k] += s.distinct_init
    weights = LossWeights(cluster=s.cluster, separation=s.separation, orthogonality=s.orthogonality, l1=1e-4)
    optimizer = torch.optim.Adam(
        [
            {"params": head.add_on.parameters(), "lr": 3 * s.learning_rate, "weight_decay": 1e-3},
            {"params": [head.prototypes], "lr": 3 * s.learning_rate},
            {"params": [head.slot_logits], "lr": 3 * s.learning_rate},
        ]
    )
    generator = torch.Generator().manual_seed(s.seed)
    steps = len(x_train) // s.batch_size
    start = time.perf_counter()
    head.train()
    for epoch in range(s.epochs):
        head.gumbel_scale.fill_(gumbel_scale_at(epoch, 1000.0, 30))
        order = torch.randperm(len(x_train), generator=generator)
        ce_sum = 0.0
        for step in range(steps):
            index = order[step * s.batch_size : (step + 1) * s.batch_size]
            x, y = x_train[index].float(), y_train[index]
            if torch.rand(1, generator=generator) < 0.5:
                x = x.flip(-1)
            y_b, lam = None, 1.0
            if s.mixup_alpha > 0:
                lam = float(torch.distributions.Beta(s.mixup_alpha, s.mixup_alpha).sample())
                mix = torch.randperm(len(index), generator=generator)
                x, y_b = lam * x + (1 - lam) * x[mix], y[mix]
            out = head(x)
            terms = all_loss_terms(
                out.logits, out.min_distances, out.slot_assignment, head.slot_logits, head.last_layer.weight, y,
                y_b, lam,
            )  # fmt: skip
            optimizer.zero_grad()
            weighted_total(terms, weights).backward()
            optimizer.step()
            ce_sum += float(terms["cross_entropy"].detach())
    result = {**dataclasses.asdict(s), "train_ce_last_epoch": round(ce_sum / steps, 3)}

    def accuracy() -> float:
        with torch.no_grad():
            logits = torch.cat([head(x_test[i : i + 500].float()).logits for i in range(0, len(x_test), 500)])
        return float((logits.argmax(1) == y_test).float().mean())

    head.eval()
    result["soft"] = accuracy()
    # Projection: each prototype onto its nearest latent patch among training images of the classes that use it.
    class_to_prototypes = head.slot_logits.argmax(1)  # (C, S)
    allowed = torch.zeros(classes, s.num_prototypes, dtype=torch.bool)
    allowed.scatter_(1, class_to_prototypes, True)
    best = torch.full((s.num_prototypes,), float("inf"))
    projected = head.prototypes.detach().clone()
    with torch.no_grad():
        for i in range(0, len(x_train), 500):
            latent = head.latent(x_train[i : i + 500].float()).flatten(2)  # (N, D, H·W)
            distances = squared_l2_distances(latent.unsqueeze(-1), head.prototypes).flatten(2)  # (N, P, H·W)
            distances = distances.masked_fill(~allowed[y_train[i : i + 500]][:, :, None], float("inf"))
            per_image, where = distances.min(2)  # (N, P)
            image = per_image.argmin(0)  # (P,)
            prototype = torch.arange(s.num_prototypes)
            closer = per_image[image, prototype] < best
            candidates = latent[image, :, where[image, prototype]]  # (P, D)
            projected[closer], best[closer] = candidates[closer], per_image[image, prototype][closer]
        head.prototypes.copy_(projected)
        head.hard_assignment.fill_(True)
    result["projected"] = accuracy()
    result["prototypes_used"] = len(set(class_to_prototypes.flatten().tolist()))
    # Last-layer fine-tuning on the cached slot similarities.
    with torch.no_grad():
        sims_train = torch.cat(
            [head(x_train[i : i + 500].float()).similarities.flatten(1) for i in range(0, len(x_train), 500)]
        )
        sims_test = torch.cat(
            [head(x_test[i : i + 500].float()).similarities.flatten(1) for i in range(0, len(x_test), 500)]
        )
    last = head.last_layer
    optimizer = torch.optim.Adam(last.parameters(), lr=s.ft_lr, weight_decay=1e-3)
    for _ in range(s.ft_epochs):
        order = torch.randperm(len(x_train), generator=generator)
        for step in range(steps):
            index = order[step * s.batch_size : (step + 1) * s.batch_size]
            loss = F.cross_entropy(last(sims_train[index]), y_train[index])
            loss = loss + 1e-4 * l1_off_class_loss(last.weight, s.num_slots_per_class)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        result["fine_tuned"] = float((last(sims_test).argmax(1) == y_test).float().mean())
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def linear_probe(features: dict, epochs: int = 4, lr: float = 1e-3, batch_size: int = 64) -> float:
    """Global average pooling + a linear layer on the same frozen features (Adam, `epochs` epochs)."""
    (x_train, y_train), (x_test, y_test) = features["train"], features["test"]
    pooled_train, pooled_test = x_train.float().mean((2, 3)), x_test.float().mean((2, 3))
    torch.manual_seed(0)
    linear = torch.nn.Linear(pooled_train.shape[1], int(y_train.max()) + 1)
    optimizer = torch.optim.Adam(linear.parameters(), lr)
    for _ in range(epochs):
        order = torch.randperm(len(pooled_train))
        for i in range(0, len(order) - batch_size + 1, batch_size):
            index = order[i : i + batch_size]
            loss = F.cross_entropy(linear(pooled_train[index]), y_train[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return float((linear(pooled_test).argmax(1) == y_test).float().mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("cache", help="compute and save the frozen backbone's feature maps")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--feature-stage", type=int, default=3)
    p.add_argument("--train-images", type=int, default=20000)
    p.add_argument("--test-images", type=int, default=None, help="default: all 10 000")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", required=True)
    p = sub.add_parser("run", help="train heads on cached features: a JSON list of HeadSettings overrides")
    p.add_argument("features")
    p.add_argument(
        "grid", help='e.g. \'[{"name": "a"}, {"name": "b", "cluster": 0.2}]\'; {"probe": true}: linear probe'
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log", default=None, help="append every result to this JSON-lines file")
    args = parser.parse_args(argv)
    if args.command == "cache":
        cache(args)
        return
    torch.set_num_threads(args.threads)
    features = torch.load(args.features)
    fields = {f.name for f in dataclasses.fields(HeadSettings)}
    for overrides in json.loads(args.grid):
        if overrides.pop("probe", False):
            result = {"name": "linear probe", "test": linear_probe(features)}
        else:
            unknown = sorted(set(overrides) - fields)
            if unknown:
                raise ValueError(f"Unknown HeadSettings fields {unknown}; fields are {sorted(fields)}.")
            result = run_head(features, HeadSettings(**overrides))
        print(json.dumps(result), flush=True)
        if args.log:
            with open(args.log, "a") as log:
                log.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
