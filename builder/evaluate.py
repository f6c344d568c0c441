"""Fidelity of a candidate against the FP32 source model, and the gate that decides on it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgeopt.agent.backends import Backend
from edgeopt.builder.data import Dataset

EVAL_BATCH = 16


def run_backend(backend: Backend, dataset: Dataset, batch_size: int = EVAL_BATCH) -> dict[str, np.ndarray]:
    """Run ``dataset`` through ``backend`` in batches and concatenate the outputs."""
    collected: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(dataset), batch_size):
        outputs = backend.run(dataset.batch(start, start + batch_size))
        for name, value in outputs.items():
            collected.setdefault(name, []).append(np.asarray(value))
    return {name: np.concatenate(parts) for name, parts in collected.items()}


def run_torch(module, dataset: Dataset, output_names: list[str], batch_size: int = EVAL_BATCH) -> dict[str, np.ndarray]:
    """Run a torch module on ``dataset`` (eval mode, no grad) and return named outputs."""
    import torch

    collected: dict[str, list[np.ndarray]] = {name: [] for name in output_names}
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = dataset.batch(start, start + batch_size)
            result = module(*(torch.from_numpy(np.ascontiguousarray(batch[name])) for name in dataset.inputs))
            result = result if isinstance(result, (tuple, list)) else (result,)
            for name, value in zip(output_names, result):
                collected[name].append(value.detach().float().numpy())
    return {name: np.concatenate(parts) for name, parts in collected.items()}


def is_classifier_output(array: np.ndarray) -> bool:
    """Return whether ``array`` is a 2-D [N, C] class-score output with C >= 2."""
    return array.ndim == 2 and array.shape[1] >= 2


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _as_log_probabilities(x: np.ndarray) -> np.ndarray:
    """Treat rows that already sum to 1 as probabilities, anything else as logits."""
    x = x.astype(np.float64)
    if np.all(x >= 0) and np.allclose(x.sum(axis=-1), 1.0, atol=1e-3):
        return np.log(np.clip(x, 1e-12, None))
    return _log_softmax(x)


@dataclass
class Fidelity:
    """Agreement of one candidate with the source model on the evaluation set."""

    samples: int
    metric: str  # "top1_agreement" or "cosine": the quantity the gate uses
    score: float  # 1.0 = identical to the source
    top1_agreement: float | None = None
    mean_kl: float | None = None
    cosine: float | None = None
    max_abs_diff: float = 0.0
    accuracy: float | None = None
    source_accuracy: float | None = None
    per_output: dict[str, dict[str, float]] = field(default_factory=dict)
    # Set for pruned or retrained students: their weights differ from the source's by design,
    # so with labels the gate compares accuracy only, not agreement with the source.
    accuracy_decides: bool = False

    @property
    def drop(self) -> float:
        """Loss against the source on the gate metric, or in accuracy when labels exist, whichever is worse."""
        has_accuracy = self.accuracy is not None and self.source_accuracy is not None
        if self.accuracy_decides and has_accuracy:
            return max(0.0, self.source_accuracy - self.accuracy)
        drop = 1.0 - self.score
        if has_accuracy:
            drop = max(drop, self.source_accuracy - self.accuracy)
        return max(0.0, drop)

    def to_dict(self) -> dict:
        metric = "accuracy" if self.accuracy_decides and self.accuracy is not None else self.metric
        data = {"samples": self.samples, "gate_metric": metric, "score": round(self.score, 6), "drop": round(self.drop, 6), "max_abs_diff": round(self.max_abs_diff, 6)}
        for key in ("top1_agreement", "mean_kl", "cosine", "accuracy", "source_accuracy"):
            value = getattr(self, key)
            if value is not None:
                data[key] = round(float(value), 6)
        return data


def compare_outputs(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], labels: np.ndarray | None = None) -> Fidelity:
    """Compare candidate outputs with the source model's, output by output.

    Class-score outputs get top-1 agreement, the gate metric, and the mean KL divergence of
    the candidate's softmax from the source's. Other outputs get the mean per-sample cosine
    similarity. With labels, both models' top-1 accuracy on the first class-score output is
    reported as well.
    """
    per_output: dict[str, dict[str, float]] = {}
    agreements, kls, cosines = [], [], []
    accuracy = source_accuracy = None
    max_abs = 0.0
    samples = 0

    for name, ref in reference.items():
        got = candidate[name].astype(np.float64)
        ref = ref.astype(np.float64)
        samples = len(ref)
        max_abs = max(max_abs, float(np.max(np.abs(got - ref))) if ref.size else 0.0)

        if is_classifier_output(ref):
            agreement = float(np.mean(ref.argmax(axis=1) == got.argmax(axis=1)))
            ref_log = _as_log_probabilities(ref)
            got_log = _as_log_probabilities(got)
            kl = float(np.mean(np.sum(np.exp(ref_log) * (ref_log - got_log), axis=1)))
            per_output[name] = {"top1_agreement": agreement, "mean_kl": kl}
            agreements.append(agreement)
            kls.append(kl)
            if labels is not None and accuracy is None:
                accuracy = float(np.mean(got.argmax(axis=1) == labels))
                source_accuracy = float(np.mean(ref.argmax(axis=1) == labels))
        else:
            flat_ref = ref.reshape(len(ref), -1)
            flat_got = got.reshape(len(got), -1)
            norms = np.linalg.norm(flat_ref, axis=1) * np.linalg.norm(flat_got, axis=1)
            cosine_rows = np.where(norms > 0, np.sum(flat_ref * flat_got, axis=1) / np.maximum(norms, 1e-30), 1.0)
            cosine = float(np.mean(cosine_rows))
            per_output[name] = {"cosine": cosine}
            cosines.append(cosine)

    if agreements:
        metric, score = "top1_agreement", min(agreements)
    else:
        metric, score = "cosine", min(cosines) if cosines else 1.0
    return Fidelity(
        samples=samples,
        metric=metric,
        score=score,
        top1_agreement=min(agreements) if agreements else None,
        mean_kl=max(kls) if kls else None,
        cosine=min(cosines) if cosines else None,
        max_abs_diff=max_abs,
        accuracy=accuracy,
        source_accuracy=source_accuracy,
        per_output=per_output,
    )


@dataclass(frozen=True)
class Gate:
    """Pass when the fidelity drop stays within ``max_drop`` (e.g. 0.01 = one point)."""

    max_drop: float

    def passes(self, fidelity: Fidelity) -> bool:
        return fidelity.drop <= self.max_drop + 1e-12
