"""Train the digits CNN teacher on the fixed train split and save its state_dict.

Writes ``teacher.pt`` (``{"width": int, "state_dict": ...}``) next to the split files and prints
validation and test accuracy. About a minute on two CPU cores.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from digits.model import digits_cnn  # noqa: E402
from digits.prepare_data import write_split  # noqa: E402

from edgeopt.builder.distill import DistillConfig, finetune  # noqa: E402
from edgeopt.builder.traindata import load_train_data  # noqa: E402

TEACHER_WIDTH = 32
TEACHER_CONFIG = DistillConfig(epochs=60, lr=3e-3, batch_size=64, patience=15, seed=0)


def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of ``model`` on (x, y), 0..1."""
    model.eval()
    with torch.no_grad():
        predictions = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float((predictions == y).mean())


def load_teacher(path: Path) -> torch.nn.Module:
    """Rebuild the teacher from a ``teacher.pt`` file written by this script."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model = digits_cnn(width=int(checkpoint["width"]))
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def train_teacher(data_dir: Path, progress: bool = True, config: DistillConfig = TEACHER_CONFIG) -> tuple[torch.nn.Module, Path]:
    """Write the split if missing, train the teacher and save it to ``data_dir/teacher.pt``."""
    if not (data_dir / "train.npz").exists():
        write_split(data_dir)
    train = load_train_data(data_dir / "train.npz")
    val = load_train_data(data_dir / "val.npz")

    torch.manual_seed(config.seed)
    model = digits_cnn(width=TEACHER_WIDTH)
    config = DistillConfig(**{**vars(config), "progress": progress})
    finetune(model, train, val, config)

    path = data_dir / "teacher.pt"
    temporary = path.with_suffix(".pt.tmp")
    torch.save({"width": TEACHER_WIDTH, "state_dict": model.state_dict()}, temporary)
    temporary.replace(path)
    return model, path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("out/digits"), help="folder of the split files (default: out/digits)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    model, path = train_teacher(args.data)
    for split in ("val", "test"):
        data = load_train_data(args.data / f"{split}.npz")
        print(f"{split} accuracy: {accuracy(model, data.x, data.y):.4f}")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
