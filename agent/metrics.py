"""Per-model request counters and latency histograms for telemetry.

The data plane records every ModelInfer here; the telemetry reporter reads and resets the
counters once per reporting interval with ``snapshot()``.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

# Log-spaced bucket bounds from 10 us to about 10 min, each 10 % wider than the one below,
# so a reported percentile is within 5 % of the true value.
_BUCKET_RATIO = 1.1
_BUCKET_MIN_MS = 0.01
_BUCKET_BOUNDS_MS: tuple[float, ...] = tuple(
    _BUCKET_MIN_MS * _BUCKET_RATIO**i for i in range(int(math.log(6e7) / math.log(_BUCKET_RATIO)) + 2)
)


@dataclass
class _ModelCounters:
    version: str = ""
    requests: int = 0
    errors: int = 0
    queue_depth: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(_BUCKET_BOUNDS_MS) + 1))
    min_ms: float = math.inf
    max_ms: float = 0.0

    def reset(self) -> None:
        self.requests = 0
        self.errors = 0
        self.buckets = [0] * (len(_BUCKET_BOUNDS_MS) + 1)
        self.min_ms = math.inf
        self.max_ms = 0.0

    def percentile(self, q: float) -> float:
        """Estimate the q-quantile (0..1) as the geometric middle of the bucket that holds it."""
        total = sum(self.buckets)
        if total == 0:
            return 0.0
        rank = q * total
        seen = 0
        for index, count in enumerate(self.buckets):
            seen += count
            if count and seen >= rank:
                lower = _BUCKET_BOUNDS_MS[index - 1] if index > 0 else 0.0
                upper = _BUCKET_BOUNDS_MS[index] if index < len(_BUCKET_BOUNDS_MS) else self.max_ms
                middle = math.sqrt(lower * upper) if lower > 0 else upper
                return min(max(middle, self.min_ms), self.max_ms)
        return self.max_ms


class ServerStats:
    """Thread-safe request, error and latency statistics per model."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, _ModelCounters] = {}
        self._interval_start = time.monotonic()

    def _counters(self, model: str) -> _ModelCounters:
        counters = self._models.get(model)
        if counters is None:
            counters = self._models[model] = _ModelCounters()
        return counters

    def record(self, model: str, version: str, latency_ms: float, ok: bool) -> None:
        """Count one finished request of ``model`` and add its latency to the histogram."""
        index = bisect.bisect_left(_BUCKET_BOUNDS_MS, latency_ms)
        with self._lock:
            counters = self._counters(model)
            counters.version = version
            counters.requests += 1
            if not ok:
                counters.errors += 1
            counters.buckets[index] += 1
            counters.min_ms = min(counters.min_ms, latency_ms)
            counters.max_ms = max(counters.max_ms, latency_ms)

    def set_queue_depth(self, model: str, depth: int) -> None:
        """Store the number of requests of ``model`` waiting or running now."""
        with self._lock:
            self._counters(model).queue_depth = depth

    def forget(self, model: str) -> None:
        """Drop the counters of an unloaded model."""
        with self._lock:
            self._models.pop(model, None)

    def snapshot(self, reset: bool = True) -> dict[str, Any]:
        """Return the statistics since the last reset; ``reset`` starts a new interval."""
        now = time.monotonic()
        with self._lock:
            interval = max(now - self._interval_start, 1e-9)
            models = {}
            for name, counters in self._models.items():
                models[name] = {
                    "version": counters.version,
                    "requests": counters.requests,
                    "errors": counters.errors,
                    "rps": counters.requests / interval,
                    "queue_depth": counters.queue_depth,
                    "latency_ms": {
                        "p50": counters.percentile(0.50),
                        "p90": counters.percentile(0.90),
                        "p99": counters.percentile(0.99),
                    },
                }
                if reset:
                    counters.reset()
            if reset:
                self._interval_start = now
        return {"interval_s": interval, "models": models}
