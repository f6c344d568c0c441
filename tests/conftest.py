"""Shared fixtures: small real data sets and model files for builder and bundle tests."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS / "models"))
sys.path.insert(0, str(ROOT / "examples"))

TINY_SPEC = f"{TESTS / 'models' / 'tiny_cnn.py'}:tiny_cnn"


@pytest.fixture(scope="session")
def digits_data(tmp_path_factory) -> dict[str, Path]:
    """Calibration (.npy) and labelled evaluation (.npz) files from scikit-learn's digits."""
    from tiny_cnn import digits_arrays

    x, y = digits_arrays()
    folder = tmp_path_factory.mktemp("digits")
    paths = {"calib": folder / "calib.npy", "eval": folder / "eval.npz"}
    # Samples 0-999 trained the model; calibration and evaluation come from the rest.
    np.save(paths["calib"], x[1000:1200])
    np.savez(paths["eval"], input=x[1200:1500], labels=y[1200:1500])
    return paths
