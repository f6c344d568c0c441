"""Alert rules of the fleet monitor: p99 latency above a limit, power above a limit, device offline.

An alert fires when its condition starts and clears when it ends, so a device that stays slow
produces one alert line instead of one per metrics message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AlertRules:
    """Limits; None disables that rule. Offline alerts are always on."""

    max_p99_ms: float | None = None
    max_power_w: float | None = None


@dataclass(frozen=True)
class Alert:
    """One change of an alert condition: ``state`` is ``firing`` or ``resolved``."""

    kind: str
    device_id: str
    state: str
    message: str
    model: str | None = None
    value: float | None = None
    limit: float | None = None

    @property
    def key(self) -> tuple[str, str, str | None]:
        return self.kind, self.device_id, self.model

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "alert",
            "kind": self.kind,
            "state": self.state,
            "device_id": self.device_id,
            "model": self.model,
            "value": self.value,
            "limit": self.limit,
            "message": self.message,
        }


class AlertTracker:
    """Evaluate the rules on every update and return the alerts that changed state."""

    def __init__(self, rules: AlertRules):
        self.rules = rules
        self._active: dict[tuple[str, str, str | None], Alert] = {}

    @property
    def active(self) -> list[Alert]:
        return list(self._active.values())

    def _transition(self, condition: bool, alert: Alert) -> list[Alert]:
        if condition and alert.key not in self._active:
            self._active[alert.key] = alert
            return [alert]
        if not condition and alert.key in self._active:
            del self._active[alert.key]
            return [Alert(**{**alert.__dict__, "state": "resolved", "message": f"resolved: {alert.message}"})]
        return []

    def check_metrics(self, device_id: str, models: dict[str, Any], power_w: float | None, power_source: str | None) -> list[Alert]:
        changes: list[Alert] = []
        if self.rules.max_p99_ms is not None:
            limit = self.rules.max_p99_ms
            for name, model in models.items():
                # An interval without requests carries no latency, so it changes no state.
                if not model.get("requests"):
                    continue
                p99 = float(model.get("latency_ms", {}).get("p99", 0.0))
                alert = Alert(
                    kind="p99",
                    device_id=device_id,
                    state="firing",
                    model=name,
                    value=round(p99, 3),
                    limit=limit,
                    message=f"{device_id} {name}: p99 latency {p99:.1f} ms is above {limit:g} ms",
                )
                changes += self._transition(p99 > limit, alert)

        if self.rules.max_power_w is not None and power_w is not None:
            limit = self.rules.max_power_w
            label = f"{power_w:.2f} W ({power_source})"
            alert = Alert(
                kind="power",
                device_id=device_id,
                state="firing",
                value=round(power_w, 3),
                limit=limit,
                message=f"{device_id}: power {label} is above {limit:g} W",
            )
            changes += self._transition(power_w > limit, alert)
        return changes

    def check_online(self, device_id: str, online: bool, reason: str = "") -> list[Alert]:
        alert = Alert(kind="offline", device_id=device_id, state="firing", message=f"{device_id} is offline ({reason or 'no reason given'})")
        return self._transition(not online, alert)
