"""Structured channel pruning with Torch-Pruning.

Torch-Pruning's dependency graph removes coupled channels together (a conv's output channels,
the following BatchNorm, the next layer's input channels, both sides of a residual add), so the
pruned network is physically smaller and exports like any other model.
"""

from __future__ import annotations

import copy
import difflib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from edgeopt.builder.macs import count_module_macs, count_module_parameters

log = logging.getLogger(__name__)

IMPORTANCE_CRITERIA = ("l1", "l2", "taylor")

# With --target-macs the pruner takes many small steps up to this channel ratio and stops at
# the first step whose MACs reach the target.
TARGET_MACS_MAX_RATIO = 0.9
TARGET_MACS_STEPS = 30


class PruneError(ValueError):
    """Invalid pruning settings, or a model Torch-Pruning cannot prune as requested."""


@dataclass
class PruneResult:
    """A pruned copy of a model and its size before and after."""

    model: nn.Module
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    importance: str
    ratio: float | None
    target_macs: int | None
    kept_layers: list[str] = field(default_factory=list)

    @property
    def macs_reduction(self) -> float:
        """Fraction of MACs removed, 0..1."""
        return 1.0 - self.macs_after / self.macs_before if self.macs_before else 0.0

    @property
    def params_reduction(self) -> float:
        """Fraction of parameters removed, 0..1."""
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    def summary(self) -> dict[str, object]:
        return {
            "importance": self.importance,
            "ratio": self.ratio,
            "target_macs": self.target_macs,
            "kept_layers": self.kept_layers,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
        }


def prune_model(
    model: nn.Module,
    example_inputs: torch.Tensor,
    ratio: float | None = None,
    target_macs: int | None = None,
    importance: str = "l2",
    keep: Iterable[str] = (),
    calibration: Iterable | None = None,
    round_to: int | None = None,
    global_pruning: bool = False,
    in_place: bool = False,
) -> PruneResult:
    """Prune output channels of conv and linear layers of ``model``.

    ``ratio`` is the fraction of channels removed per layer group (0.5 removes half, which cuts
    the MACs of a conv between two pruned layers by about three quarters). ``target_macs`` prunes
    in small steps until the MACs of one forward pass of ``example_inputs`` are at or below it.
    Give exactly one of the two.

    ``keep`` names modules (as in ``model.named_modules()``) whose output channels stay. The
    layer that produces the model output is always kept, so the number of classes never changes.

    ``importance`` is ``l1`` or ``l2`` (weight magnitude) or ``taylor`` (first-order Taylor
    expansion of the loss, needs ``calibration``: an iterable of ``(x, y)`` or ``x`` batches;
    without labels the unpruned model's own top-1 predictions serve as the targets).

    The model is deep-copied unless ``in_place`` is true.
    """
    _check_settings(ratio, target_macs, importance, calibration)

    if not in_place:
        model = copy.deepcopy(model)
    model.eval()

    params_before = count_module_parameters(model)
    macs_before = count_module_macs(model, example_inputs)
    if target_macs is not None and target_macs >= macs_before:
        raise PruneError(
            f"target MACs {target_macs:,} is not below the model's {macs_before:,} MACs; "
            "give a smaller --target-macs"
        )

    kept = _resolve_kept_layers(model, example_inputs, keep)
    pruner = _make_pruner(model, example_inputs, ratio, target_macs, importance, kept, round_to, global_pruning)

    steps = 1 if target_macs is None else TARGET_MACS_STEPS
    macs_after = macs_before
    for step in range(steps):
        if importance == "taylor":
            _accumulate_taylor_gradients(model, calibration)
        pruner.step()
        model.zero_grad(set_to_none=True)
        macs_after = count_module_macs(model, example_inputs)
        log.debug("pruning step %d: %d MACs", step + 1, macs_after)
        if target_macs is not None and macs_after <= target_macs:
            break

    if target_macs is not None and macs_after > target_macs:
        log.warning(
            "pruning stopped at the maximum channel ratio %.2f with %d MACs, above the target %d",
            TARGET_MACS_MAX_RATIO, macs_after, target_macs,
        )

    params_after = count_module_parameters(model)
    log.info(
        "pruned with %s importance: parameters %d -> %d, MACs %d -> %d",
        importance, params_before, params_after, macs_before, macs_after,
    )
    return PruneResult(
        model=model,
        params_before=params_before,
        params_after=params_after,
        macs_before=macs_before,
        macs_after=macs_after,
        importance=importance,
        ratio=ratio,
        target_macs=target_macs,
        kept_layers=sorted(kept),
    )


def _check_settings(ratio, target_macs, importance, calibration) -> None:
    if (ratio is None) == (target_macs is None):
        raise PruneError("give exactly one of --prune RATIO or --target-macs N")
    if ratio is not None and not 0.0 < ratio < 1.0:
        raise PruneError(f"pruning ratio {ratio} is outside (0, 1); give the fraction of channels to remove, e.g. 0.3")
    if target_macs is not None and target_macs <= 0:
        raise PruneError(f"target MACs {target_macs} must be a positive integer")
    if importance not in IMPORTANCE_CRITERIA:
        raise PruneError(f"unknown importance {importance!r}; choose one of {', '.join(IMPORTANCE_CRITERIA)}")
    if importance == "taylor" and calibration is None:
        raise PruneError("taylor importance needs calibration batches for its backward pass; pass --train-data")


def find_output_layer(model: nn.Module, example_inputs: torch.Tensor) -> str:
    """Return the name of the conv or linear module whose output becomes the model output.

    A module whose output tensor is the model output wins. Otherwise the last conv or linear
    module executed whose channel count equals the output's class dimension is taken, which
    covers a flatten or reshape after the classifier.
    """
    executed: list[tuple[str, torch.Tensor]] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            handles.append(module.register_forward_hook(lambda m, i, o, name=name: executed.append((name, o))))
    try:
        with torch.no_grad():
            output = model(example_inputs)
    finally:
        for handle in handles:
            handle.remove()

    if isinstance(output, (tuple, list)):
        output = output[0]
    for name, tensor in reversed(executed):
        if tensor is output:
            return name
    classes = output.shape[1] if output.dim() > 1 else output.shape[0]
    for name, tensor in reversed(executed):
        channels = tensor.shape[-1] if tensor.dim() == 2 else tensor.shape[1]
        if channels == classes:
            return name
    raise PruneError(
        "could not find the layer that produces the model output; name it with keep=(\"<module name>\",)"
    )


def _resolve_kept_layers(model: nn.Module, example_inputs: torch.Tensor, keep: Iterable[str]) -> set[str]:
    modules = dict(model.named_modules())
    keep = tuple(keep)
    try:
        kept = {find_output_layer(model, example_inputs)}
    except PruneError:
        if not keep:
            raise
        log.warning("found no layer producing the model output; keeping only the named layers %s", ", ".join(keep))
        kept = set()
    for name in keep:
        if name not in modules:
            close = difflib.get_close_matches(name, [n for n in modules if n], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; list them with model.named_modules()"
            raise PruneError(f"layer to keep {name!r} is not a module of the model{hint}")
        kept.add(name)
    return kept


def _make_pruner(model, example_inputs, ratio, target_macs, importance, kept, round_to, global_pruning):
    import torch_pruning as tp

    criteria = {
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "taylor": lambda: tp.importance.GroupTaylorImportance(),
    }
    modules = dict(model.named_modules())
    ignored = [modules[name] for name in kept]

    if target_macs is None:
        pruning_ratio, steps = ratio, 1
    else:
        pruning_ratio, steps = TARGET_MACS_MAX_RATIO, TARGET_MACS_STEPS

    try:
        return tp.pruner.MetaPruner(
            model,
            example_inputs,
            importance=criteria[importance](),
            pruning_ratio=pruning_ratio,
            iterative_steps=steps,
            ignored_layers=ignored,
            round_to=round_to,
            global_pruning=global_pruning,
        )
    except (RuntimeError, ValueError, KeyError) as exc:
        raise PruneError(f"Torch-Pruning could not build the dependency graph of this model: {exc}") from exc


def _accumulate_taylor_gradients(model: nn.Module, calibration: Iterable) -> None:
    """Run a backward pass of the cross-entropy loss over ``calibration`` so Taylor importance has gradients."""
    model.zero_grad(set_to_none=True)
    batches = 0
    for batch in calibration:
        x, y = batch if isinstance(batch, (tuple, list)) else (batch, None)
        x = torch.as_tensor(x)
        logits = model(x)
        if y is None:
            y = logits.detach().argmax(dim=1)
        loss = nn.functional.cross_entropy(logits, torch.as_tensor(y))
        loss.backward()
        batches += 1
    if batches == 0:
        raise PruneError("taylor importance got no calibration batches; --train-data is empty")
