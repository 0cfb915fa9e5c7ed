"""Explain one image with a trained ProtoPool model: "this part of your image looks like that prototype".

    python examples/explain.py demo-output/model photo.jpg --out explanation.png

MODEL is a folder written by `save_pretrained` / the training recipe, or a Hub repo id. The panel shows, for the
explained class, where each slot's prototype fired in the image, the prototype's own picture (from the folder's
`prototypes/`, or downloaded from the Hub repo), and similarity × weight = contribution; the contributions add up to
the class logit.
"""

import argparse
from pathlib import Path

from transformers import AutoModelForImageClassification

import protopool_hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model folder or Hub repo id")
    parser.add_argument("image", type=Path)
    parser.add_argument("--out", type=Path, default=Path("explanation.png"))
    parser.add_argument("--top-k", type=int, default=3)
    args = parser.parse_args()

    model = AutoModelForImageClassification.from_pretrained(args.model).eval()
    explanation = protopool_hf.explain(model, args.image, top_k=args.top_k)
    for class_id, label, probability in explanation.top_classes:
        print(f"{label:>20s} (class {class_id}): {probability:.1%}")
    print(f"Explaining {explanation.class_label!r}: logit {explanation.logit:.3f} =")
    for slot in explanation.slots[:5]:
        print(
            f"  prototype {slot.prototype_id:3d}: similarity {slot.similarity:.3f} x weight {slot.weight:.3f}"
            f" = {slot.contribution:+.3f}"
        )
    pictures = Path(args.model) / "prototypes"
    if not pictures.is_dir():  # a Hub repo: fetch its prototype pictures
        from huggingface_hub import snapshot_download

        pictures = Path(snapshot_download(args.model, allow_patterns=["prototypes/*"])) / "prototypes"
    explanation.save(args.out, prototype_images=pictures)
    print(f"Panel written to {args.out}")


if __name__ == "__main__":
    main()
