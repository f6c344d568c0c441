"""Pareto front of quality against host latency, and its PNG plot."""

from __future__ import annotations

import pytest

from edgeopt.builder.pareto import Candidate, pareto_front, plot_pareto

CANDIDATES = [
    Candidate("fp32", latency_ms=4.0, score=0.99),
    Candidate("int8", latency_ms=1.5, score=0.97),
    Candidate("pruned", latency_ms=2.0, score=0.96),  # slower and worse than int8
    Candidate("pruned-int8", latency_ms=1.0, score=0.90),
    Candidate("fp32-copy", latency_ms=4.0, score=0.99),  # ties are both kept
]


def test_front_drops_dominated():
    names = [c.name for c in pareto_front(CANDIDATES)]
    assert names == ["pruned-int8", "int8", "fp32", "fp32-copy"]


def test_single_candidate_is_front():
    assert pareto_front(CANDIDATES[:1]) == CANDIDATES[:1]


def test_plot_writes_png(tmp_path):
    path = plot_pareto(CANDIDATES, tmp_path / "plots" / "pareto.png", title="digits")

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5000
    assert sorted(p.name for p in path.parent.iterdir()) == ["pareto.png"]


def test_plot_empty_raises(tmp_path):
    with pytest.raises(ValueError, match="no candidates"):
        plot_pareto([], tmp_path / "pareto.png")
    assert not (tmp_path / "pareto.png").exists()
