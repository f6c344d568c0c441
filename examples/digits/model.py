"""A small CNN for the 8 x 8 scikit-learn digits, used as the distillation teacher."""

from __future__ import annotations

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
