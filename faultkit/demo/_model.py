"""What the demo runs and what it reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["DemoConfig", "StageOutcome"]


@dataclass
class DemoConfig:
    """One demo run: sizes, faults and where things live."""

    engine: str = "dask"
    kills: int = 3  # per stage
    seed: int = 0
    out: str = "demo-out"
    partitions: int = 48
    rows: int = 200
    chunk: int = 20
    unit_delay: float = 0.02
    steps: int = 60
    every_steps: int = 10
    step_delay: float = 0.03
    workers: int = 2
    hosts: int = 0  # worker hosts (network namespaces); 0: one machine
    store_url: str = ""
    sink_url: str = ""
    alert_urls: list[str] = field(default_factory=list)
    work_dir: str = ""


@dataclass
class StageOutcome:
    """The verified result of one stage of the demo."""

    name: str
    kills: int = 0
    attempts: int = 0
    units_total: int = 0
    units_redone: int = 0
    resumed_from: list[Any] = field(default_factory=list)  # per retry: units done / step
    rows_expected: int | None = None
    rows_present: int | None = None
    duplicates: int | None = None
    content_equal: bool | None = None
    weights_equal: bool | None = None
    recover_seconds: list[float] = field(default_factory=list)
    fenced: int = 0  # writes of a stale attempt (a zombie) refused
    seconds: float = 0.0
    timeline: list[dict[str, Any]] = field(default_factory=list)  # {t, event, detail}

    @property
    def ok(self) -> bool:
        checks = [self.kills >= 0]
        if self.rows_expected is not None:
            checks += [
                self.rows_present == self.rows_expected,
                self.duplicates == 0,
                self.content_equal is not False,
            ]
        if self.weights_equal is not None:
            checks.append(self.weights_equal)
        return all(checks)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d
