"""Knowledge distillation and fine-tuning on the real scikit-learn digits."""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from digits.model import digits_cnn  # noqa: E402
from digits.prepare_data import load_split  # noqa: E402

from edgeopt.builder.distill import DistillConfig, DistillError, distill, distillation_loss, finetune  # noqa: E402
from edgeopt.builder.prune import prune_model  # noqa: E402
from edgeopt.builder.traindata import TrainData  # noqa: E402


@pytest.fixture(scope="module")
def digits() -> dict[str, TrainData]:
    return {name: TrainData(x, y) for name, (x, y) in load_split().items()}


@pytest.fixture(scope="module")
def small(digits) -> TrainData:
    """The first 256 training images, for tests that check training mechanics, not accuracy."""
    return digits["train"].subset(np.arange(256))


@pytest.fixture(scope="module")
def teacher(digits) -> torch.nn.Module:
    torch.manual_seed(0)
    model = digits_cnn(width=16)
    finetune(model, digits["train"], digits["val"], DistillConfig(epochs=8, lr=3e-3, progress=False))
    return model


def accuracy(model: torch.nn.Module, data: TrainData) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(data.x)).argmax(1).numpy() == data.y).mean())


def test_loss_without_labels_is_scaled_kl():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(8, 10, generator=generator), torch.randn(8, 10, generator=generator)
    expected = F.kl_div(F.log_softmax(student / 2, 1), F.softmax(teacher / 2, 1), reduction="batchmean") * 4

    torch.testing.assert_close(distillation_loss(student, teacher, None, temperature=2.0, alpha=0.3), expected)
    assert float(distillation_loss(teacher, teacher, None, temperature=2.0, alpha=0.3)) == pytest.approx(0.0, abs=1e-6)


def test_loss_alpha_weights_cross_entropy():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(8, 10, generator=generator), torch.randn(8, 10, generator=generator)
    labels = torch.randint(0, 10, (8,), generator=generator)

    cross_entropy = F.cross_entropy(student, labels)
    torch.testing.assert_close(distillation_loss(student, teacher, labels, 4.0, alpha=0.0), cross_entropy)
    kl = distillation_loss(student, teacher, None, 4.0, alpha=1.0)
    torch.testing.assert_close(distillation_loss(student, teacher, labels, 4.0, alpha=0.25), 0.25 * kl + 0.75 * cross_entropy)


def test_teacher_learns_digits(teacher, digits):
    assert accuracy(teacher, digits["test"]) > 0.9


def test_distillation_loss_falls(teacher, digits):
    student = prune_model(teacher, torch.zeros(1, 1, 8, 8), ratio=0.5).model
    config = DistillConfig(epochs=4, lr=2e-3, patience=10, seed=0, progress=False)

    result = distill(student, teacher, digits["train"], digits["val"], config)

    losses = [record.train_loss for record in result.history]
    assert len(losses) == 4
    assert losses[-1] < losses[0]
    assert result.score_name == "accuracy"
    assert result.best_score == max(record.val_score for record in result.history)


def test_same_seed_same_history(teacher, digits, small):
    config = DistillConfig(epochs=2, lr=2e-3, seed=3, progress=False)
    runs = []
    for _ in range(2):
        student = prune_model(teacher, torch.zeros(1, 1, 8, 8), ratio=0.5).model
        runs.append([record.train_loss for record in distill(student, teacher, small, digits["val"], config).history])
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)


def test_best_checkpoint_restored(teacher, digits):
    student = prune_model(teacher, torch.zeros(1, 1, 8, 8), ratio=0.5).model
    result = distill(student, teacher, digits["train"], digits["val"], DistillConfig(epochs=3, progress=False))

    assert accuracy(result.student, digits["val"]) == pytest.approx(result.best_score)


def test_unlabeled_scores_agreement(teacher, digits, small):
    unlabeled = {name: TrainData(data.x) for name, data in (("train", small), ("val", digits["val"]))}
    student = prune_model(teacher, torch.zeros(1, 1, 8, 8), ratio=0.5).model

    result = distill(student, teacher, unlabeled["train"], unlabeled["val"], DistillConfig(epochs=2, progress=False))

    assert result.score_name == "agreement"
    assert 0.0 <= result.best_score <= 1.0
    assert result.history[-1].train_loss < result.history[0].train_loss


def test_feature_loss_trains(teacher, digits, small):
    student = prune_model(teacher, torch.zeros(1, 1, 8, 8), ratio=0.5).model
    config = DistillConfig(epochs=2, feature_weight=1.0, feature_layers=(("8", "8"),), progress=False)

    result = distill(student, teacher, small, digits["val"], config)

    assert all(math.isfinite(record.train_loss) for record in result.history)
    assert not student[8]._forward_hooks


def test_feature_layer_must_exist(teacher, digits):
    config = DistillConfig(epochs=1, feature_weight=1.0, feature_layers=(("8", "missing"),), progress=False)
    with pytest.raises(DistillError, match="missing"):
        distill(digits_cnn(width=8), teacher, digits["train"], digits["val"], config)


def test_early_stopping_after_patience(teacher, digits, small):
    student = prune_model(teacher, torch.zeros(1, 1, 8, 8), ratio=0.5).model
    config = DistillConfig(epochs=10, lr=1e-12, patience=2, freeze_batchnorm=True, progress=False)

    result = distill(student, teacher, small, digits["val"], config)

    assert result.stopped_early
    assert len(result.history) < 10


def test_finetune_without_labels_raises(digits):
    with pytest.raises(DistillError, match="labeled"):
        finetune(digits_cnn(width=8), TrainData(digits["train"].x), digits["val"], DistillConfig(epochs=1))


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"temperature": 0}, "temperature"),
        ({"alpha": 1.5}, "alpha"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch size"),
        ({"lr": -1.0}, "learning rate"),
        ({"feature_weight": 1.0}, "feature layers"),
    ],
)
def test_invalid_config_raises(digits, settings, message):
    with pytest.raises(DistillError, match=message):
        finetune(digits_cnn(width=8), digits["train"], digits["val"], DistillConfig(progress=False, **settings))


def test_split_fixed_and_stratified(digits):
    again = load_split()
    np.testing.assert_array_equal(again["test"][1], digits["test"].y)
    assert [len(digits[name]) for name in ("train", "val", "test")] == [1077, 360, 360]
    assert np.bincount(digits["test"].y).min() >= 35


def test_freeze_batchnorm_keeps_statistics(teacher, digits, small):
    student = prune_model(teacher, torch.zeros(1, 1, 8, 8), ratio=0.5).model
    before = student[1].running_mean.clone()

    distill(student, teacher, small, digits["val"], DistillConfig(epochs=1, freeze_batchnorm=True, progress=False))

    torch.testing.assert_close(student[1].running_mean, before)


def test_reports_into_running_progress(teacher, digits, small):
    from rich.console import Console
    from rich.progress import Progress

    student = prune_model(teacher, torch.zeros(1, 1, 8, 8), ratio=0.5).model
    console = Console(file=io.StringIO(), force_terminal=False)
    with Progress(console=console) as progress:
        distill(student, teacher, small, digits["val"], DistillConfig(epochs=1, progress=True), progress_bar=progress)
        (task,) = progress.tasks

    assert task.completed == task.total
    assert task.description.startswith("distill epoch 1/1, loss ")
