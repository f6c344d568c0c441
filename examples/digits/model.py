"""A small CNN for the 8 x 8 scikit-learn digits, used as the distillation teacher."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

NUM_CLASSES = 10
INPUT_SHAPE = (1, 8, 8)


def digits_cnn(width: int = 32, num_classes: int = NUM_CLASSES, dropout: float = 0.2) -> nn.Module:
    """Build the digits CNN: three conv-BN-ReLU stages (width, 2x, 4x channels) and a linear classifier.

    Plain ``nn.Conv2d``/``nn.Linear`` layers in one ``nn.Sequential`` so that Torch-Pruning and FX
    quantization both trace it without custom rules.
    """
    return nn.Sequential(
        nn.Conv2d(1, width, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 4 * width, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(4 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(4 * width, num_classes),
    )


TEACHER_PATH_VARIABLE = "EDGEOPT_DIGITS_TEACHER"
DEFAULT_TEACHER_PATH = Path("out/digits/teacher.pt")


def load_digits_cnn(path: str | Path) -> nn.Module:
    """Rebuild a digits CNN from a ``teacher.pt`` checkpoint (``{"width", "state_dict"}``) in eval mode."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model = digits_cnn(width=int(checkpoint["width"]))
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def digits_cnn_pretrained() -> nn.Module:
    """Load the teacher that ``train_teacher.py`` wrote, as an ``edgeopt build --model`` factory.

    The checkpoint path is ``$EDGEOPT_DIGITS_TEACHER`` when set, else ``out/digits/teacher.pt``
    relative to the working directory.
    """
    path = Path(os.environ.get(TEACHER_PATH_VARIABLE) or DEFAULT_TEACHER_PATH)
    if not path.is_file():
        raise FileNotFoundError(
            f"digits teacher {path} not found: run python examples/digits/train_teacher.py --data {path.parent}, "
            f"or set {TEACHER_PATH_VARIABLE} to its teacher.pt"
        )
    return load_digits_cnn(path)


digits_cnn_pretrained.input_shape = (1, *INPUT_SHAPE)
digits_cnn_pretrained.labels = [str(digit) for digit in range(NUM_CLASSES)]
