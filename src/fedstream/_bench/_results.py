"""The result records of a benchmark run and how they are judged against targets.

A :class:`Series` holds one figure's value from every repetition. Each case
has a headline series that is compared with a ceiling series measured in the
same run; the ratio is ``median(headline) / median(ceiling)`` (inverted for
latencies, so that a bigger ratio is always better). A *comparison* row
(``compare``) has no measurement of its own: its ``per_round`` series holds,
for each round, one case's headline over another's (the default callback
path against the async one, measured back to back), and its ratio is the
median of those: pairing by round keeps the machine's drift out of it, which
a ratio of the two rows' medians would not.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["CaseResult", "Ceiling", "Report", "Series", "Status", "Target", "TargetKind"]

Status = Literal["PASS", "FAIL", "INFO", "N/A", "ERROR"]


@dataclass
class Series:
    """One figure, one value per repetition."""

    unit: str
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else math.nan

    @property
    def min(self) -> float:
        return min(self.values) if self.values else math.nan

    @property
    def max(self) -> float:
        return max(self.values) if self.values else math.nan

    def to_json(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "median": _finite(self.median),
            "min": _finite(self.min),
            "max": _finite(self.max),
            "values": [_finite(v) for v in self.values],
        }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass
class Ceiling:
    """A raw-trio figure measured in the same run, same process layout."""

    key: str
    label: str
    series: Series
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "error": self.error, **self.series.to_json()}


TargetKind = Literal[
    "ratio_min",
    "ratio_max",
    "complete",
    "rss_max",
    "at_most",
    "at_least",
    "median_at_most",
    "report",
]


@dataclass(frozen=True)
class Target:
    """What a case must achieve.

    ``ratio_min``: ratio to the ceiling at least ``value``; ``ratio_max``: at
    most ``value`` (a protocol bound that a faster mode must beat by far, as
    stop-and-wait over a long link). ``complete``: every
    repetition ran and every stream finished OK. ``rss_max``: the largest RSS
    increase (sender or receiver, worst repetition) below ``value`` MiB.
    ``at_most`` / ``at_least``: every repetition's value of every metric named
    in ``metrics`` is at most / at least ``value`` (so the worst one decides).
    ``median_at_most``: the median over repetitions of every metric named in
    ``metrics`` is at most ``value``. ``report``: the issue only asks for
    the figure to be reported (``INFO``).
    """

    kind: TargetKind
    value: float
    text: str
    metrics: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "value": self.value,
            "text": self.text,
            "metrics": list(self.metrics),
        }


@dataclass
class CaseResult:
    scenario: str
    case: str
    params: dict[str, Any]
    metrics: dict[str, Series]
    headline: str
    ceiling: str | None = None
    #: The ceiling is a time (latency): ratio = ceiling / headline.
    inverse: bool = False
    target: Target | None = None
    error: str | None = None
    repetitions: int = 0
    notes: list[str] = field(default_factory=list)
    ratio: float | None = None
    status: Status = "INFO"
    #: A comparison row: ids (``scenario/case``) of the numerator and the
    #: denominator case; the median of their per-round ratios is :attr:`ratio`.
    compare: tuple[str, str] | None = None

    @property
    def id(self) -> str:
        return f"{self.scenario}/{self.case}"

    @property
    def completed(self) -> bool:
        return self.error is None and self.repetitions > 0

    def judge(self, ceilings: dict[str, Ceiling], cases: dict[str, CaseResult]) -> None:
        """Compute :attr:`ratio` and :attr:`status` from the finished figures."""
        self.ratio = None
        ceiling = ceilings.get(self.ceiling) if self.ceiling else None
        if self.compare is not None:
            top, bottom = (cases.get(key) for key in self.compare)
            if top is None or bottom is None or not (top.completed and bottom.completed):
                self.error = self.error or "a case it compares did not complete"
            else:
                ratio = self.metrics[self.headline].median
                self.ratio = ratio if math.isfinite(ratio) else None
        elif self.completed and ceiling is not None and ceiling.series.values:
            value = self.metrics[self.headline].median
            bound = ceiling.series.median
            ratio = bound / value if self.inverse else value / bound
            self.ratio = ratio if math.isfinite(ratio) else None
        if not self.completed:
            self.status = "ERROR"
        elif self.target is None or self.target.kind == "report":
            self.status = "INFO"
        elif self.target.kind == "complete":
            self.status = "PASS"
        elif self.target.kind == "rss_max":
            worst = max(
                self.metrics["sender_rss_increase"].max,
                self.metrics["receiver_rss_increase"].max,
            )
            self.status = "PASS" if worst < self.target.value else "FAIL"
        elif self.target.kind == "at_most":
            worst = max(self.metrics[key].max for key in self.target.metrics)
            self.status = "PASS" if worst <= self.target.value else "FAIL"
        elif self.target.kind == "median_at_most":
            worst = max(self.metrics[key].median for key in self.target.metrics)
            self.status = "PASS" if worst <= self.target.value else "FAIL"
        elif self.target.kind == "at_least":
            worst = min(self.metrics[key].min for key in self.target.metrics)
            self.status = "PASS" if worst >= self.target.value else "FAIL"
        elif self.ratio is None:
            self.status = "N/A"
        elif self.target.kind == "ratio_max":
            self.status = "PASS" if self.ratio <= self.target.value else "FAIL"
        else:
            self.status = "PASS" if self.ratio >= self.target.value else "FAIL"

    def to_json(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "completed": self.completed,
            "error": self.error,
            "repetitions": self.repetitions,
            "params": self.params,
            "metrics": {key: series.to_json() for key, series in self.metrics.items()},
            "headline": self.headline,
            "ceiling": self.ceiling,
            "compare": list(self.compare) if self.compare else None,
            "ratio": self.ratio,
            "target": self.target.to_json() if self.target else None,
            "status": self.status,
            "notes": self.notes,
        }


@dataclass
class Report:
    """Everything one run measured, in the order it was asked for."""

    mode: Literal["smoke", "quick", "full"]
    repeat: int
    scenarios: list[str]
    plan: dict[str, Any]
    machine: dict[str, Any]
    started: str
    ceilings: dict[str, Ceiling] = field(default_factory=dict)
    cases: list[CaseResult] = field(default_factory=list)
    duration: float = 0.0

    @property
    def completed(self) -> bool:
        return all(case.completed for case in self.cases) and all(
            c.error is None for c in self.ceilings.values()
        )

    def judge(self) -> None:
        by_id = {case.id: case for case in self.cases}
        for case in self.cases:
            case.judge(self.ceilings, by_id)

    def to_json(self) -> dict[str, Any]:
        scenarios: dict[str, Any] = {}
        for name in self.scenarios:
            cases = [case for case in self.cases if case.scenario == name]
            scenarios[name] = {
                "completed": bool(cases) and all(case.completed for case in cases),
                "cases": [case.to_json() for case in cases],
            }
        return {
            "schema": 2,
            "tool": "fedstream bench",
            "mode": self.mode,
            "repeat": self.repeat,
            "started": self.started,
            "duration_s": round(self.duration, 3),
            "completed": self.completed,
            "machine": self.machine,
            "plan": self.plan,
            "ceilings": {key: ceiling.to_json() for key, ceiling in self.ceilings.items()},
            "scenarios": scenarios,
        }
