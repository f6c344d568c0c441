"""Calibration and evaluation data: ``.npy``, ``.npz`` or an image folder with preprocessing."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeopt.builder.errors import BuildInputError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
LABEL_KEYS = ("labels", "y")


@dataclass(frozen=True)
class Preprocess:
    """Image preprocessing: resize, then x = (pixel - mean) / std, in the given layout."""

    size: tuple[int, int]
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    layout: str = "NCHW"
    resize: str = "bilinear"

    def __post_init__(self):
        if self.layout not in ("NCHW", "NHWC"):
            raise BuildInputError(f"layout {self.layout!r} is invalid: use NCHW or NHWC")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise BuildInputError("mean and std need three values (R, G, B), e.g. --mean 127,127,127")
        if any(s == 0 for s in self.std):
            raise BuildInputError(f"std {self.std} contains 0: every channel needs a non-zero std")

    def to_manifest(self) -> dict:
        return {
            "kind": "image",
            "size": list(self.size),
            "resize": self.resize,
            "channels": "RGB",
            "mean": list(self.mean),
            "std": list(self.std),
            "layout": self.layout,
            "dtype": "FP32",
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocess":
        size = data["size"]
        if isinstance(size, int):
            size = (size, size)
        return cls(
            size=tuple(size),
            mean=tuple(float(v) for v in data.get("mean", (0, 0, 0))),
            std=tuple(float(v) for v in data.get("std", (1, 1, 1))),
            layout=data.get("layout", "NCHW"),
            resize=data.get("resize", "bilinear"),
        )

    def apply(self, image) -> np.ndarray:
        """Turn a PIL image into one float32 sample (no batch axis)."""
        from PIL import Image

        image = image.convert("RGB").resize((self.size[1], self.size[0]), Image.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32)
        sample = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return sample.transpose(2, 0, 1).copy() if self.layout == "NCHW" else sample


@dataclass
class Dataset:
    """Model inputs keyed by input name (first axis = sample) and optional integer labels."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def subset(self, indices: np.ndarray, source: str) -> "Dataset":
        labels = self.labels[indices] if self.labels is not None else None
        return Dataset({k: v[indices] for k, v in self.inputs.items()}, labels, source)

    def batch(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return {k: v[start:stop] for k, v in self.inputs.items()}

    def fingerprints(self) -> list[str]:
        """Return a hash per sample, used to prove calibration and evaluation sets are disjoint."""
        hashes = []
        for index in range(len(self)):
            digest = hashlib.sha1()
            for name in sorted(self.inputs):
                digest.update(np.ascontiguousarray(self.inputs[name][index]).tobytes())
            hashes.append(digest.hexdigest())
        return hashes


def _load_image_folder(folder: Path, input_name: str, preprocess: Preprocess | None) -> Dataset:
    from PIL import Image, UnidentifiedImageError

    if preprocess is None:
        raise BuildInputError(
            f"{folder} is an image folder but no preprocessing is declared: pass --image-size, --mean, --std "
            "(and --layout), or use a model factory that declares them"
        )

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise BuildInputError(f"image folder {folder} contains no {', '.join(IMAGE_SUFFIXES)} files")

    # Images in sub-folders named by integer class index carry labels (e.g. 281/cat.jpg).
    class_dirs = {p.parent for p in files if p.parent != folder}
    labelled = bool(class_dirs) and all(d.parent == folder and d.name.isdigit() for d in class_dirs) and all(p.parent != folder for p in files)

    samples, labels = [], []
    for path in files:
        try:
            with Image.open(path) as image:
                samples.append(preprocess.apply(image))
        except (UnidentifiedImageError, OSError) as exc:
            raise BuildInputError(f"image {path} cannot be read: {exc}") from None
        if labelled:
            labels.append(int(path.parent.name))
    return Dataset({input_name: np.stack(samples).astype(np.float32)}, np.asarray(labels, np.int64) if labelled else None, str(folder))


def load_dataset(path: Path | str, input_names: list[str], preprocess: Preprocess | None = None, option: str = "--calib") -> Dataset:
    """Load samples from ``path`` (given as ``option``); raise BuildInputError with the fix for every bad-input case."""
    path = Path(path)
    if not path.exists():
        raise BuildInputError(f"{option} {path} not found: check the path")

    if path.is_dir():
        if len(input_names) != 1:
            raise BuildInputError(f"an image folder feeds one input, but the model has {len(input_names)}: use an .npz keyed by input name")
        dataset = _load_image_folder(path, input_names[0], preprocess)

    elif path.suffix == ".npy":
        if len(input_names) != 1:
            raise BuildInputError(f"{path}: a .npy file feeds one input, but the model has inputs {input_names}: use an .npz keyed by input name")
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise BuildInputError(f"{path} is not a readable .npy array: {exc}") from None
        dataset = Dataset({input_names[0]: array}, None, str(path))

    elif path.suffix == ".npz":
        try:
            archive = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise BuildInputError(f"{path} is not a readable .npz archive: {exc}") from None
        with archive:
            keys = set(archive.files)
            if len(input_names) == 1 and input_names[0] not in keys and "x" in keys:
                inputs = {input_names[0]: archive["x"]}
            else:
                missing = [n for n in input_names if n not in keys]
                if missing:
                    raise BuildInputError(f"{path} has no array for input {missing[0]!r}; keys present: {sorted(keys)}")
                inputs = {n: archive[n] for n in input_names}
            label_key = next((k for k in LABEL_KEYS if k in keys), None)
            labels = archive[label_key].astype(np.int64) if label_key else None
        dataset = Dataset(inputs, labels, str(path))

    else:
        raise BuildInputError(f"data path {path} has unsupported type {path.suffix or '(none)'}: use .npy, .npz or an image folder")

    counts = {name: len(array) for name, array in dataset.inputs.items()}
    if any(count == 0 for count in counts.values()):
        raise BuildInputError(f"data {path} is empty: it needs at least one sample")
    if len(set(counts.values())) > 1:
        raise BuildInputError(f"data {path} has different sample counts per input: {counts}")
    if dataset.labels is not None and len(dataset.labels) != len(dataset):
        raise BuildInputError(f"data {path} has {len(dataset.labels)} labels for {len(dataset)} samples")
    return dataset


def check_input_shapes(dataset: Dataset, expected: dict[str, tuple[int, ...]], dtypes: dict[str, np.dtype]) -> Dataset:
    """Check per-sample shapes against the model's input shapes (-1 = any) and cast dtypes."""
    checked = {}
    for name, shape in expected.items():
        array = dataset.inputs[name]
        sample_shape = tuple(array.shape[1:])
        want = tuple(shape[1:])
        if len(sample_shape) != len(want) or any(w not in (-1, s) for w, s in zip(want, sample_shape)):
            pretty = "x".join("?" if d < 0 else str(d) for d in want)
            raise BuildInputError(
                f"{dataset.source}: input {name!r} samples have shape {'x'.join(map(str, sample_shape))}, "
                f"the model expects N x {pretty}: fix the data or --input-shape"
            )
        checked[name] = array.astype(dtypes.get(name, array.dtype), copy=False)
    return Dataset(checked, dataset.labels, dataset.source)


def split_calibration_evaluation(calib: Dataset, evaluation: Dataset | None, eval_fraction: float = 0.5, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Return disjoint calibration and evaluation sets.

    Without an evaluation set, the calibration data is split at random (fixed seed). With
    both, a sample present in both is an error, because calibrating on evaluation samples
    would overstate fidelity.
    """
    if evaluation is None:
        if len(calib) < 2:
            raise BuildInputError(f"{calib.source} has {len(calib)} sample; splitting it into calibration and evaluation needs at least 2, or pass --eval")
        order = np.random.default_rng(seed).permutation(len(calib))
        cut = max(1, min(len(calib) - 1, int(round(len(calib) * (1.0 - eval_fraction)))))
        log.info("split %s into %d calibration and %d evaluation samples", calib.source, cut, len(calib) - cut)
        return calib.subset(order[:cut], f"{calib.source} (calibration split)"), calib.subset(order[cut:], f"{calib.source} (evaluation split)")

    overlap = set(calib.fingerprints()) & set(evaluation.fingerprints())
    if overlap:
        raise BuildInputError(
            f"{len(overlap)} sample(s) appear in both {calib.source} and {evaluation.source}: "
            "calibration and evaluation sets must be disjoint"
        )
    return calib, evaluation
