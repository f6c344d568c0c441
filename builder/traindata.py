"""Load training data for distillation and quantization-aware training (``--train-data``).

Two forms are accepted:

- an ``.npz`` file with ``x`` (float32, already preprocessed, N x C x H x W or any shape the
  model takes) and optionally ``y`` (int64 class indexes, length N);
- an image folder: one subfolder per class (``root/<class>/*.png``), or images directly under
  ``root`` for unlabeled data (distillation from a teacher needs no labels).

Images are resized (shorter side) and center-cropped to the model input size, then
normalized as ``(pixel - mean) / std`` into NCHW float32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


class TrainDataError(ValueError):
    """``--train-data`` is missing, empty or not in a supported form."""


@dataclass
class TrainData:
    """Model-ready inputs ``x`` and optional class labels ``y``."""

    x: np.ndarray
    y: np.ndarray | None = None
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.y is not None and len(self.y) != len(self.x):
            raise TrainDataError(f"x has {len(self.x)} samples but y has {len(self.y)}; they must match")

    def __len__(self) -> int:
        return len(self.x)

    @property
    def labeled(self) -> bool:
        return self.y is not None

    def subset(self, indexes: np.ndarray) -> "TrainData":
        return TrainData(self.x[indexes], None if self.y is None else self.y[indexes], self.class_names)

    def split(self, validation_fraction: float, seed: int = 0) -> tuple["TrainData", "TrainData"]:
        """Split into (train, validation) with a fixed shuffle."""
        if not 0.0 < validation_fraction < 1.0:
            raise TrainDataError(f"validation fraction {validation_fraction} is outside (0, 1)")
        order = np.random.default_rng(seed).permutation(len(self))
        count = max(1, int(round(len(self) * validation_fraction)))
        if count >= len(self):
            raise TrainDataError(f"{len(self)} samples are too few to hold out a validation split")
        return self.subset(order[count:]), self.subset(order[:count])


@dataclass(frozen=True)
class ImagePreprocess:
    """Image-to-input conversion settings: size, channels and normalization."""

    height: int = 224
    width: int = 224
    mean: float = 127.0
    std: float = 128.0
    grayscale: bool = False

    def apply(self, image) -> np.ndarray:
        """Resize the shorter side, center-crop and normalize one PIL image to C x H x W float32."""
        image = image.convert("L" if self.grayscale else "RGB")
        scale = max(self.height / image.height, self.width / image.width)
        resized = image.resize((max(self.width, round(image.width * scale)), max(self.height, round(image.height * scale))))
        left = (resized.width - self.width) // 2
        top = (resized.height - self.height) // 2
        cropped = resized.crop((left, top, left + self.width, top + self.height))
        return self.normalize(np.asarray(cropped))

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """Turn H x W (x C) uint8 pixels into C x H x W float32 model input."""
        array = (pixels.astype(np.float32) - self.mean) / self.std
        if array.ndim == 2:
            array = array[None, :, :]
        else:
            array = array.transpose(2, 0, 1)
        return np.ascontiguousarray(array)


def load_train_data(path: str | Path, preprocess=None) -> TrainData:
    """Load ``--train-data`` from an ``.npz`` file or an image folder.

    ``preprocess`` turns one PIL image into one sample through its ``apply(image)`` method
    (:class:`ImagePreprocess`, or the build's ``edgeopt.builder.data.Preprocess``).
    """
    path = Path(path)
    if not path.exists():
        raise TrainDataError(f"training data {path} not found; give an .npz file with x/y or an image folder")
    if path.is_file():
        if path.suffix != ".npz":
            raise TrainDataError(f"training data {path} is a {path.suffix or 'suffix-less'} file; give an .npz file with x/y or an image folder")
        return _load_npz(path)
    return _load_image_folder(path, preprocess or ImagePreprocess())


def _load_npz(path: Path) -> TrainData:
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise TrainDataError(f"could not read {path} as .npz: {exc}") from exc
    with archive:
        if "x" not in archive.files:
            raise TrainDataError(f"{path} has no array 'x' (found: {', '.join(archive.files) or 'none'}); save inputs as x=")
        x = archive["x"].astype(np.float32, copy=False)
        y = archive["y"] if "y" in archive.files else None
    if len(x) == 0:
        raise TrainDataError(f"{path} contains no samples in 'x'")
    if y is not None:
        if not np.issubdtype(y.dtype, np.integer):
            raise TrainDataError(f"{path}: 'y' has dtype {y.dtype}; save class indexes as integers")
        y = y.astype(np.int64, copy=False)
    log.info("loaded %d samples from %s (%s)", len(x), path, "labeled" if y is not None else "unlabeled")
    return TrainData(x, y)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _load_image_folder(root: Path, preprocess) -> TrainData:
    from PIL import Image, UnidentifiedImageError

    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and _images_in(p))
    loose_images = _images_in(root)
    if class_dirs and loose_images:
        raise TrainDataError(
            f"{root} has both class subfolders and loose images; put every image in a class folder, "
            "or use a flat folder for unlabeled data"
        )
    if not class_dirs and not loose_images:
        raise TrainDataError(f"{root} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})")

    if class_dirs:
        files = [(image, label) for label, folder in enumerate(class_dirs) for image in _images_in(folder)]
        class_names = tuple(folder.name for folder in class_dirs)
    else:
        files = [(image, None) for image in loose_images]
        class_names = ()

    arrays, labels = [], []
    for image_path, label in files:
        try:
            with Image.open(image_path) as image:
                arrays.append(preprocess.apply(image))
        except (UnidentifiedImageError, OSError) as exc:
            raise TrainDataError(f"could not read image {image_path}: {exc}") from exc
        labels.append(label)

    y = np.asarray(labels, dtype=np.int64) if class_names else None
    log.info("loaded %d images from %s (%d classes)", len(arrays), root, len(class_names))
    return TrainData(np.stack(arrays), y, class_names)


def random_resized_crops(
    images: list[np.ndarray],
    count: int,
    preprocess: ImagePreprocess,
    scale: tuple[float, float] = (0.25, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    seed: int = 0,
) -> np.ndarray:
    """Cut ``count`` random resized crops with random horizontal flips from H x W x 3 uint8 images.

    Each crop covers a random share ``scale`` of an image's area with an aspect ratio in ``ratio``
    (the usual ImageNet training augmentation), resized to the preprocess size and normalized.
    """
    from PIL import Image

    if not images:
        raise TrainDataError("no images to crop")
    rng = np.random.default_rng(seed)
    crops = []
    for index in range(count):
        pixels = images[index % len(images)]
        height, width = pixels.shape[:2]
        area = height * width * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        crop_w = int(min(width, round(np.sqrt(area * aspect))))
        crop_h = int(min(height, round(np.sqrt(area / aspect))))
        top = int(rng.integers(0, height - crop_h + 1))
        left = int(rng.integers(0, width - crop_w + 1))
        patch = Image.fromarray(pixels[top : top + crop_h, left : left + crop_w])
        patch = patch.convert("L" if preprocess.grayscale else "RGB").resize((preprocess.width, preprocess.height))
        array = np.asarray(patch)
        if rng.random() < 0.5:
            array = array[:, ::-1]
        crops.append(preprocess.normalize(array))
    return np.stack(crops)
