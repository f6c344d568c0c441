"""Knowledge distillation from a teacher into a (pruned) student, and plain fine-tuning.

The loss is Hinton et al.'s (2015): ``alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T))``
plus ``(1 - alpha) * cross-entropy(student, label)`` when labels are present, plus an optional
feature loss (mean squared error between a student layer, mapped through a learned 1x1 conv, and
a teacher layer). Without labels the KL term is the whole loss.

Training keeps the state with the best validation score: accuracy when the validation data is
labeled, else top-1 agreement with the teacher (fidelity). It stops early after ``patience``
epochs without a better score.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edgeopt.builder.traindata import TrainData

log = logging.getLogger(__name__)

LOSS_TIE_TOLERANCE = 1e-4


class DistillError(ValueError):
    """Invalid distillation settings or data."""


@dataclass
class DistillConfig:
    """Distillation and fine-tuning settings."""

    temperature: float = 4.0
    alpha: float = 0.7  # weight of the KL term; 1 - alpha weights cross-entropy on labels
    feature_weight: float = 0.0
    feature_layers: tuple[tuple[str, str], ...] = ()  # (student module, teacher module) pairs
    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    patience: int = 5
    seed: int = 0
    freeze_batchnorm: bool = False  # keep BatchNorm running statistics fixed, for small or narrow data
    device: str = "cpu"
    progress: bool = True

    def validate(self) -> None:
        if self.temperature <= 0:
            raise DistillError(f"temperature {self.temperature} must be positive, e.g. 4")
        if not 0.0 <= self.alpha <= 1.0:
            raise DistillError(f"alpha {self.alpha} is outside [0, 1]; it weights KL against cross-entropy")
        if self.feature_weight < 0:
            raise DistillError(f"feature-loss weight {self.feature_weight} must not be negative")
        if self.feature_weight > 0 and not self.feature_layers:
            raise DistillError("a feature-loss weight needs feature layers: (student module, teacher module) pairs")
        for name, value in (("epochs", self.epochs), ("batch size", self.batch_size), ("patience", self.patience)):
            if value < 1:
                raise DistillError(f"{name} {value} must be at least 1")
        if self.lr <= 0:
            raise DistillError(f"learning rate {self.lr} must be positive, e.g. 1e-3")


@dataclass
class EpochRecord:
    """Losses and validation score of one epoch."""

    epoch: int
    train_loss: float
    val_loss: float
    val_score: float
    seconds: float


@dataclass
class DistillResult:
    """The trained student (best epoch restored) and its history."""

    student: nn.Module
    history: list[EpochRecord]
    best_epoch: int
    best_score: float
    score_name: str  # "accuracy" (labels) or "agreement" (top-1 agreement with the teacher)
    stopped_early: bool

    def history_dicts(self) -> list[dict[str, float]]:
        return [vars(record) for record in self.history]


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Return the KL term on temperature-softened logits plus cross-entropy on labels when given."""
    soft_student = F.log_softmax(student_logits / temperature, dim=1)
    soft_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    # T^2 keeps the gradient scale of the soft term independent of the temperature.
    kl = F.kl_div(soft_student, soft_teacher, reduction="batchmean", log_target=True) * temperature**2
    if labels is None:
        return kl
    return alpha * kl + (1.0 - alpha) * F.cross_entropy(student_logits, labels)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    train: TrainData,
    val: TrainData,
    config: DistillConfig | None = None,
    on_epoch_start: Callable[[int, nn.Module], None] | None = None,
    progress_bar=None,
) -> DistillResult:
    """Train ``student`` to match ``teacher`` on ``train``; return it with the best validation state restored.

    ``progress_bar`` is a running ``rich.progress.Progress`` to add a task to, for callers that
    already show one (rich allows one live display at a time). Without it, and with
    ``config.progress`` set, training shows its own bar with loss and ETA.
    """
    return _train(student, teacher, train, val, config or DistillConfig(), on_epoch_start, "distill", progress_bar)


def finetune(
    model: nn.Module,
    train: TrainData,
    val: TrainData,
    config: DistillConfig | None = None,
    on_epoch_start: Callable[[int, nn.Module], None] | None = None,
    progress_bar=None,
) -> DistillResult:
    """Fine-tune ``model`` on labeled data with cross-entropy only (no teacher); ``progress_bar`` as in :func:`distill`."""
    if not train.labeled or not val.labeled:
        raise DistillError("fine-tuning without a teacher needs labeled training and validation data (y)")
    return _train(model, None, train, val, config or DistillConfig(), on_epoch_start, "finetune", progress_bar)


class _FeatureTaps:
    """Capture outputs of named student and teacher modules and map student features to teacher width."""

    def __init__(self, student: nn.Module, teacher: nn.Module, pairs: tuple[tuple[str, str], ...], example: torch.Tensor):
        self.pairs = pairs
        self.features: dict[str, torch.Tensor] = {}
        self.handles = []
        student_modules, teacher_modules = dict(student.named_modules()), dict(teacher.named_modules())
        for student_name, teacher_name in pairs:
            for side, name, modules in (("student", student_name, student_modules), ("teacher", teacher_name, teacher_modules)):
                if name not in modules:
                    raise DistillError(f"feature layer {name!r} is not a module of the {side} model")
                self.handles.append(modules[name].register_forward_hook(self._store(f"{side}:{name}")))

        with torch.no_grad():
            student.eval(), teacher.eval()
            student(example), teacher(example)
        self.adapters = nn.ModuleList()
        for student_name, teacher_name in pairs:
            s, t = self.features[f"student:{student_name}"], self.features[f"teacher:{teacher_name}"]
            if s.shape[2:] != t.shape[2:]:
                raise DistillError(
                    f"feature layers {student_name!r} {tuple(s.shape)} and {teacher_name!r} {tuple(t.shape)} "
                    "differ in spatial size; pair layers at the same resolution"
                )
            if s.dim() == 4:
                self.adapters.append(nn.Conv2d(s.shape[1], t.shape[1], kernel_size=1, bias=False))
            else:
                self.adapters.append(nn.Linear(s.shape[-1], t.shape[-1], bias=False))
        self.features.clear()

    def _store(self, key: str):
        def hook(module, inputs, output):
            self.features[key] = output

        return hook

    def loss(self) -> torch.Tensor:
        total = 0.0
        for adapter, (student_name, teacher_name) in zip(self.adapters, self.pairs):
            mapped = adapter(self.features[f"student:{student_name}"])
            total = total + F.mse_loss(mapped, self.features[f"teacher:{teacher_name}"].detach())
        return total / len(self.pairs)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _loader(data: TrainData, batch_size: int, shuffle: bool, seed: int) -> torch.utils.data.DataLoader:
    tensors = [torch.from_numpy(np.ascontiguousarray(data.x))]
    if data.y is not None:
        tensors.append(torch.from_numpy(np.ascontiguousarray(data.y)))
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*tensors), batch_size=batch_size, shuffle=shuffle, generator=generator
    )


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[val]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


def _train(student, teacher, train, val, config, on_epoch_start, mode, progress_bar=None) -> DistillResult:
    config.validate()
    if len(train) == 0 or len(val) == 0:
        raise DistillError("training and validation data must both hold samples")
    if not val.labeled and teacher is None:
        raise DistillError("validation without labels needs a teacher to score agreement against")

    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    student.to(device)
    if teacher is not None:
        # The teacher runs under no_grad and stays in eval mode; its parameters are left as they are.
        teacher.to(device).eval()

    taps = None
    if teacher is not None and config.feature_weight > 0:
        example = torch.from_numpy(train.x[:2]).to(device)
        taps = _FeatureTaps(student, teacher, config.feature_layers, example)
        taps.adapters.to(device)

    parameters = list(student.parameters()) + (list(taps.adapters.parameters()) if taps else [])
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    train_loader = _loader(train, config.batch_size, shuffle=True, seed=config.seed)
    val_loader = _loader(val, config.batch_size, shuffle=False, seed=config.seed)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * len(train_loader))
    score_name = "accuracy" if val.labeled else "agreement"

    history: list[EpochRecord] = []
    best_state, best_score, best_loss, best_epoch = None, -math.inf, math.inf, 0
    stopped_early = False
    log.info("%s started: %d train / %d validation samples, %d epochs", mode, len(train), len(val), config.epochs)

    try:
        external = progress_bar is not None
        with contextlib.nullcontext(progress_bar) if external else _progress(config.progress) as progress:
            task = progress.add_task(mode, total=config.epochs * len(train_loader), loss="-", val="")
            for epoch in range(1, config.epochs + 1):
                started = time.perf_counter()
                if on_epoch_start is not None:
                    on_epoch_start(epoch, student)
                train_loss = _train_epoch(student, teacher, taps, train_loader, optimizer, scheduler, config, device, progress, task, epoch, mode, external)
                val_loss, val_score = _evaluate(student, teacher, val_loader, config, device)
                record = EpochRecord(epoch, train_loss, val_loss, val_score, time.perf_counter() - started)
                history.append(record)
                progress.update(task, val=f"val {score_name} {val_score:.4f} (epoch {epoch})")
                log.info("%s epoch %d: train loss %.4f, val loss %.4f, val %s %.4f", mode, epoch, train_loss, val_loss, score_name, val_score)

                # At equal score a lower validation loss counts as better only when it is lower by
                # more than LOSS_TIE_TOLERANCE, so float noise does not reset the patience.
                if val_score > best_score or (val_score == best_score and val_loss < best_loss * (1 - LOSS_TIE_TOLERANCE)):
                    best_state = copy.deepcopy(student.state_dict())
                    best_score, best_loss, best_epoch = val_score, val_loss, epoch
                elif epoch - best_epoch >= config.patience:
                    stopped_early = True
                    log.info("%s stopped early at epoch %d: no better val %s since epoch %d", mode, epoch, score_name, best_epoch)
                    break
    finally:
        if taps is not None:
            taps.close()

    student.load_state_dict(best_state)
    student.eval()
    log.info("%s finished: best val %s %.4f at epoch %d", mode, score_name, best_score, best_epoch)
    return DistillResult(student, history, best_epoch, best_score, score_name, stopped_early)


def _batch_loss(student, teacher, taps, x, y, config):
    logits = student(x)
    if teacher is None:
        return logits, F.cross_entropy(logits, y)
    with torch.no_grad():
        teacher_logits = teacher(x)
    loss = distillation_loss(logits, teacher_logits, y, config.temperature, config.alpha)
    if taps is not None:
        loss = loss + config.feature_weight * taps.loss()
    return logits, loss


def _train_epoch(student, teacher, taps, loader, optimizer, scheduler, config, device, progress, task, epoch, mode, external) -> float:
    student.train()
    if config.freeze_batchnorm:
        for module in student.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    total, count = 0.0, 0
    for batch in loader:
        x = batch[0].to(device)
        y = batch[1].to(device) if len(batch) > 1 else None
        _, loss = _batch_loss(student, teacher, taps, x, y, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += float(loss.detach()) * len(x)
        count += len(x)
        description = f"{mode} epoch {epoch}/{config.epochs}"
        if external:
            # The caller's columns do not show the loss field, so the description carries it.
            description += f", loss {total / count:.4f}"
        progress.update(task, advance=1, loss=f"{total / count:.4f}", description=description)
    return total / max(count, 1)


@torch.no_grad()
def _evaluate(student, teacher, loader, config, device) -> tuple[float, float]:
    """Return (validation loss, score): accuracy on labels, else top-1 agreement with the teacher."""
    student.eval()
    loss_sum, matches, count = 0.0, 0, 0
    for batch in loader:
        x = batch[0].to(device)
        y = batch[1].to(device) if len(batch) > 1 else None
        logits = student(x)
        teacher_logits = teacher(x) if teacher is not None else None
        if teacher_logits is not None:
            loss = distillation_loss(logits, teacher_logits, y, config.temperature, config.alpha)
        else:
            loss = F.cross_entropy(logits, y)
        reference = y if y is not None else teacher_logits.argmax(dim=1)
        matches += int((logits.argmax(dim=1) == reference).sum())
        loss_sum += float(loss) * len(x)
        count += len(x)
    return loss_sum / count, matches / count
