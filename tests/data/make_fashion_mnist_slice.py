"""Cut the Fashion-MNIST slice under tests/data/fashion-mnist from Debian's `dataset-fashion-mnist` package.

The slice keeps the first 2000 training and the first 500 test images (and their labels) in the original gzipped
idx format and file names, with the counts in the headers updated. gzip's timestamp is fixed, so the output is
byte-for-byte reproducible.

    apt-get install -y dataset-fashion-mnist
    python tests/data/make_fashion_mnist_slice.py  # [--source /usr/share/datasets/fashion-mnist] [--train 2000]
"""

import argparse
import gzip
import struct
from pathlib import Path


def cut(source: Path, target: Path, count: int) -> None:
    """Write the first `count` entries of the idx file `source` to `target` (both gzipped)."""
    with gzip.open(source, "rb") as f:
        header = f.read(4)
        ndim = header[3]
        dims = list(struct.unpack(f">{ndim}I", f.read(4 * ndim)))
        if count > dims[0]:
            raise ValueError(f"{source} holds {dims[0]} entries, fewer than the {count} asked for.")
        per_item = 1
        for size in dims[1:]:
            per_item *= size
        body = f.read(count * per_item)
    dims[0] = count
    with open(target, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as out:
        out.write(header + struct.pack(f">{ndim}I", *dims) + body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--target", type=Path, default=Path(__file__).parent / "fashion-mnist")
    parser.add_argument("--train", type=int, default=2000, help="training images to keep (the first ones)")
    parser.add_argument("--test", type=int, default=500, help="test (t10k) images to keep (the first ones)")
    args = parser.parse_args()
    args.target.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", args.train), ("t10k", args.test)):
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{prefix}-{kind}-ubyte.gz"
            cut(args.source / name, args.target / name, count)
            print(f"{args.target / name}: first {count} of {args.source / name}")


if __name__ == "__main__":
    main()
