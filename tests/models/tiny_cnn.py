"""A small CNN trained in about a second on scikit-learn's digits, for builder tests."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Return the 1,797 digits as float32 N x 1 x 8 x 8 in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None]
    return x, digits.target.astype(np.int64)


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2),
            nn.BatchNorm2d(32),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def tiny_cnn() -> nn.Module:
    """Train TinyCNN on the first 1,000 digits (fixed seed) and return it in eval mode."""
    torch.manual_seed(0)
    x, y = digits_arrays()
    model = TinyCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    inputs, targets = torch.from_numpy(x[:1000]), torch.from_numpy(y[:1000])
    for _ in range(8):
        for start in range(0, 1000, 50):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(inputs[start : start + 50]), targets[start : start + 50])
            loss.backward()
            optimizer.step()
    return model.eval()


tiny_cnn.input_shape = (1, 1, 8, 8)
tiny_cnn.labels = [str(d) for d in range(10)]


def broken_factory() -> nn.Module:
    raise RuntimeError("weights file missing")


def not_a_module():
    return "not a module"
