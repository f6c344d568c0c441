"""Split scikit-learn's handwritten digits into fixed train/validation/test ``.npz`` files.

Each file holds ``x`` (float32, N x 1 x 8 x 8, pixel values 0..16 scaled to 0..1) and ``y``
(int64 class 0..9). The split is stratified by class with a fixed seed, so every run writes the
same files: 1,797 images become 1,077 train, 360 validation and 360 test.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SPLIT_SEED = 20240601
VALIDATION_FRACTION = 0.2
TEST_FRACTION = 0.2


def load_split(seed: int = SPLIT_SEED) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Return ``{"train"|"val"|"test": (x, y)}`` from ``sklearn.datasets.load_digits``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)

    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=TEST_FRACTION, stratify=y, random_state=seed)
    validation_share = VALIDATION_FRACTION / (1.0 - TEST_FRACTION)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=validation_share, stratify=y_rest, random_state=seed
    )
    return {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}


def write_split(out_dir: Path, seed: int = SPLIT_SEED) -> dict[str, Path]:
    """Write ``train.npz``, ``val.npz`` and ``test.npz`` into ``out_dir`` and return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, (x, y) in load_split(seed).items():
        path = out_dir / f"{name}.npz"
        np.savez(path, x=x, y=y)
        paths[name] = path
        log.info("wrote %s: %d images", path, len(y))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/digits"), help="output folder (default: out/digits)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    for name, path in write_split(args.out).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
