"""The docs' before / after prototype figures: chosen prototypes of demo model folders, side by side.

    # each used prototype's object share (the box the pictures draw, on its source image; raw pixel > 0 is object)
    python examples/prototype_pairs.py shares demo-output/model
    # the same by the issue's rule for crops: pixels brighter than 0.15 are object
    python examples/prototype_pairs.py shares demo-output/model --brighter-than 0.15
    # a figure: per FOLDER:ID:CAPTION, the prototype's source image with its box and its similarity heat map
    python examples/prototype_pairs.py figure out.png demo-output/model:12:good demo-output/model:4:bad

The pictures come from the model folder (`prototypes/prototype_XXX_source.png`, `..._overlay.png`, as `make demo`
writes them); `shares` reads the Fashion-MNIST training split the demo projected on (Debian's
`dataset-fashion-mnist`, or `FASHION_MNIST_DIR`).
"""

import argparse
import os
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw


def object_shares(folder: str, brighter_than: float | None = None) -> list[tuple[int, float]]:
    """(prototype, object share of its source box) for every used, projected prototype, least object first.

    Object: the report's rule, raw pixel > 0 resized to the model view by nearest neighbour; with `brighter_than`,
    the issue's rule for crops instead: pixels of the model view (the crop the pictures show) brighter than it (0-1).
    """
    import torch

    from protopool_hf import ProtoPoolForImageClassification
    from protopool_hf.data import load_fashion_mnist
    from protopool_hf.maps import high_activation_box, model_view, prototype_activation
    from protopool_hf.metrics import nonzero_mask
    from protopool_hf.provenance import read_provenance

    model = ProtoPoolForImageClassification.from_pretrained(folder).eval()
    train = load_fashion_mnist(os.environ.get("FASHION_MNIST_DIR"), split="train")
    index = read_provenance(model).image_index
    shares = []
    with torch.no_grad():
        for p in sorted({int(p) for p in model.class_to_prototypes().flatten()}):
            if index[p] < 0:
                continue
            image = train[int(index[p])]["image"].convert("RGB")  # the split's index column is the row
            view = model_view(image, model.config)  # the demo squashes the whole image: no crop
            # The report's rule: raw pixel > 0, resized to the model view by nearest neighbour.
            mask = np.asarray(PIL.Image.fromarray(nonzero_mask(image)).resize(view.size, PIL.Image.NEAREST))
            if brighter_than is not None:
                mask = np.asarray(view.convert("L")) > brighter_than * 255
            top, bottom, left, right = high_activation_box(prototype_activation(model, image, p), 95)
            shares.append((p, float(mask[top:bottom, left:right].mean())))
    return sorted(shares, key=lambda item: item[1])


def figure(items: list[str], scale: int = 4, gap: int = 24) -> PIL.Image.Image:
    """One row per FOLDER:ID:CAPTION item: the source image with its box, the heat map, the caption above."""
    rows = []
    for item in items:
        folder, prototype, caption = item.rsplit(":", 2)
        pictures = Path(folder) / "prototypes"
        pair = [PIL.Image.open(pictures / f"prototype_{int(prototype):03d}_{kind}.png").convert("RGB")
                for kind in ("source", "overlay")]  # fmt: skip
        height = pair[0].height * scale
        pair = [image.resize((image.width * height // image.height, height), PIL.Image.Resampling.NEAREST)
                for image in pair]  # fmt: skip
        row = PIL.Image.new("RGB", (sum(image.width for image in pair) + gap // 2, height + 20), "white")
        PIL.ImageDraw.Draw(row).text((2, 4), f"prototype {int(prototype)}: {caption}", fill="black")
        x = 0
        for image in pair:
            row.paste(image, (x, 20))
            x += image.width + gap // 2
        rows.append(row)
    out = PIL.Image.new("RGB", (sum(row.width for row in rows) + gap * (len(rows) - 1), rows[0].height), "white")
    x = 0
    for row in rows:
        out.paste(row, (x, 0))
        x += row.width + gap
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    shares = commands.add_parser("shares", help="each used prototype's object share, least object first")
    shares.add_argument("folder")
    shares.add_argument(
        "--brighter-than", type=float, default=None, help="the issue's crop rule: object = view pixels above it (0-1)"
    )
    draw = commands.add_parser("figure", help="write a figure of FOLDER:ID:CAPTION items")
    draw.add_argument("out")
    draw.add_argument("items", nargs="+")
    args = parser.parse_args()
    if args.command == "shares":
        shares = object_shares(args.folder, args.brighter_than)
        for prototype, share in shares:
            print(f"prototype {prototype}: {100 * share:.0f} % object")
        background = [p for p, share in shares if share < 0.1]
        print(f"background (under 10 % object): {len(background)} of {len(shares)} {background}")
    else:
        figure(args.items).save(args.out)
        print(f"Written {args.out}")


if __name__ == "__main__":
    main()
