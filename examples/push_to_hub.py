"""Push a trained ProtoPool model folder to the Hub in one commit: weights, code, card and prototype pictures.

    python examples/push_to_hub.py demo-output/model my-org/protopool-fashion-mnist [--private]

The folder written by the training recipe (or `protopool_hf.hub.save_model_folder`) already holds the prototype
pictures and the model card, so no dataset is needed. The pushed repo loads with
`AutoModelForImageClassification.from_pretrained(repo_id, trust_remote_code=True)` and with
`pipeline("image-classification", model=repo_id, trust_remote_code=True)`. Log in first (`hf auth login`).
"""

import argparse
from pathlib import Path

import protopool_hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("repo_id")
    parser.add_argument("--private", action="store_true")
    args = parser.parse_args()
    info = protopool_hf.push_to_hub(args.folder, args.repo_id, private=args.private or None)
    print(f"Pushed {args.folder} as one commit: {info.commit_url}")


if __name__ == "__main__":
    main()
