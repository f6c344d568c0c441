"""Plot candidates' quality (fidelity or accuracy) against host latency and mark the Pareto front.

A candidate is on the front when no other candidate is both at least as fast and at least as
good, and strictly better in one of the two.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """One model variant: its name, host latency in ms and quality score (higher is better)."""

    name: str
    latency_ms: float
    score: float


def pareto_front(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Return the non-dominated candidates (lower latency, higher score), fastest first."""
    front = []
    for candidate in candidates:
        dominated = any(
            other.latency_ms <= candidate.latency_ms
            and other.score >= candidate.score
            and (other.latency_ms < candidate.latency_ms or other.score > candidate.score)
            for other in candidates
        )
        if not dominated:
            front.append(candidate)
    return sorted(front, key=lambda c: (c.latency_ms, -c.score))


def plot_pareto(
    candidates: Sequence[Candidate],
    path: str | Path,
    score_label: str = "fidelity (top-1 agreement with the source model)",
    latency_label: str = "host latency p50 (ms)",
    title: str | None = None,
) -> Path:
    """Write a PNG scatter of score against latency with the Pareto front drawn as a step line."""
    if not candidates:
        raise ValueError("no candidates to plot; build at least one variant first")

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    path = Path(path)
    front = pareto_front(candidates)
    front_names = {c.name for c in front}

    # Points are numbered and the names listed beside the plot, because candidates with nearly
    # equal latency and score would otherwise print their names on top of each other.
    figure, axes = plt.subplots(figsize=(9, 4.5), dpi=120)
    try:
        for number, candidate in enumerate(candidates, start=1):
            on_front = candidate.name in front_names
            axes.scatter(
                candidate.latency_ms,
                candidate.score,
                s=60 if on_front else 36,
                color="tab:red" if on_front else "tab:gray",
                zorder=3,
                label=f"{number}: {candidate.name}" + (" (Pareto)" if on_front else ""),
            )
            axes.annotate(str(number), (candidate.latency_ms, candidate.score), textcoords="offset points", xytext=(4, 4), fontsize=8)
        axes.step(
            [c.latency_ms for c in front],
            [c.score for c in front],
            where="post",
            color="tab:red",
            linewidth=1.2,
        )
        axes.set_xlabel(latency_label)
        axes.set_ylabel(score_label)
        if title:
            axes.set_title(title)
        axes.grid(True, alpha=0.3)
        axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
        figure.tight_layout()

        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp.png")
        figure.savefig(temporary, format="png")
        temporary.replace(path)
    finally:
        plt.close(figure)
    log.info("wrote Pareto plot %s (%d candidates, %d on the front)", path, len(candidates), len(front))
    return path
