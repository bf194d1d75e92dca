"""The demo's outputs: a rich table, report.json and a timeline PNG."""

from __future__ import annotations

import json
import os
from typing import Any

from rich.console import Console
from rich.table import Table

from ._model import StageOutcome

__all__ = ["print_tables", "write_report", "write_timeline"]


def _yn(v: bool | None) -> str:
    return "-" if v is None else ("[green]yes[/green]" if v else "[red]NO[/red]")


def print_tables(console: Console, stages: list[StageOutcome], report: dict[str, Any]) -> None:
    t = Table(title=f"faultkit demo: engine {report['engine']}")
    for col in (
        "stage",
        "kills",
        "attempts",
        "work redone",
        "rows",
        "duplicates",
        "same content",
        "weights match",
        "zombie writes fenced",
        "ok",
    ):
        t.add_column(col, justify="right" if col != "stage" else "left")
    for s in stages:
        rows = "-" if s.rows_expected is None else f"{s.rows_present}/{s.rows_expected}"
        redone = f"{s.units_redone} of {s.units_total}"
        t.add_row(
            s.name,
            str(s.kills),
            str(s.attempts),
            redone,
            rows,
            "-" if s.duplicates is None else str(s.duplicates),
            _yn(s.content_equal),
            _yn(s.weights_equal),
            str(s.fenced),
            _yn(s.ok),
        )
    console.print(t)
    o = report.get("overhead") or {}
    if o:
        ov = Table(title="overhead (uninterrupted runs, same machine)")
        for col in ("path", "seconds", "ratio"):
            ov.add_column(col, justify="right" if col != "path" else "left")
        ov.add_row("plain ETL (no faultkit)", f"{o['plain_etl_s']:.2f}", "1.00")
        ov.add_row(
            "resumable ETL (faultkit)",
            f"{o['resumable_etl_s']:.2f}",
            f"{o['resumable_etl_s'] / max(o['plain_etl_s'], 1e-9):.2f}",
        )
        console.print(ov)
    n = report.get("nightly")
    if n:
        nt = Table(title="nightly ETL + publish, a source down in run 2 (fallback=)")
        for col in ("run", "partitions gave up", "published", "served from"):
            nt.add_column(col, justify="left" if col == "run" else "right")
        for r in n["runs"]:
            nt.add_row(
                r["run"],
                str(len(r["partitions_gave_up"])),
                r["published"],
                r["served_from"] or "-",
            )
        console.print(nt)
        console.print(
            f"degraded alerts received: {n.get('degraded_alerts_received', 0)}   ok: {_yn(n['ok'])}"
        )
    m = report.get("mlflow")
    if m and "skipped" not in m:
        mt = Table(title="experiment tracking (MLflow), after the training stage's kills")
        for col in ("runs", "status", "loss points", "duplicates", "every step once", "ok"):
            mt.add_column(col, justify="right")
        mt.add_row(
            str(m["runs"]),
            str(m["status"]),
            str(m["points"]),
            str(m["duplicates"]),
            _yn(m.get("all_steps")),
            _yn(m["ok"]),
        )
        console.print(mt)
    elif m:
        console.print(f"experiment tracking (MLflow): skipped ({m['skipped']})")
    verdict = "[green]OK[/green]" if report["ok"] else "[red]FAILED[/red]"
    console.print(
        f"alerts received: {report['alerts_received']} (kills: "
        f"{sum(s.kills for s in stages)})   verdict: {verdict}"
    )


def write_report(out_dir: str, report: dict[str, Any]) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "report.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2, default=str)
    return path


def write_timeline(out_dir: str, stages: list[StageOutcome]) -> str | None:
    """A PNG: one row per stage, a bar per attempt, a red mark per kill; with hosts (events
    carrying ``host``), one row per host instead."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if any("host" in ev for s in stages for ev in s.timeline):
        return _host_timeline(plt, out_dir, stages)
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.8 * len(stages)))
    for row, s in enumerate(stages):
        for ev in s.timeline:
            if ev["event"] == "attempt":
                color = "#d9534f" if ev.get("killed") else "#5cb85c"
                ax.barh(
                    row,
                    ev["end"] - ev["t"],
                    left=ev["t"],
                    color=color,
                    alpha=0.6,
                    edgecolor="black",
                )
            elif ev["event"] == "kill":
                ax.plot(ev["t"], row, "kx", markersize=10, mew=2)
    ax.set_yticks(range(len(stages)), [s.name for s in stages])
    ax.set_xlabel("seconds since the stage started")
    ax.set_title("attempts (red: SIGKILLed, green: finished), x: kill")
    fig.tight_layout()
    path = os.path.join(out_dir, "timeline.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


_STAGE_COLORS = ("#5b9bd5", "#f0ad4e", "#5cb85c", "#9b59b6")


def _host_timeline(plt: Any, out_dir: str, stages: list[StageOutcome]) -> str:
    """One row per host; the stages side by side on one time axis (each after the last)."""
    hosts = sorted({ev["host"] for s in stages for ev in s.timeline if "host" in ev})
    row = {h: i for i, h in enumerate(hosts)}
    fig, ax = plt.subplots(figsize=(11, 1.4 + 0.6 * len(hosts)))
    offset = 0.0
    for n, s in enumerate(stages):
        color = _STAGE_COLORS[n % len(_STAGE_COLORS)]
        ends = [offset]
        kills = {ev["host"]: ev["t"] for ev in s.timeline if ev["event"] == "kill"}
        for ev in s.timeline:
            if "host" not in ev:
                continue
            t, y = offset + ev["t"], row[ev["host"]]
            if ev["event"] == "attempt":
                stop = ev.get("end")
                if stop is None:  # it never ended: its host was lost
                    killed = kills.get(ev["host"])
                    stop = killed if killed is not None and killed >= ev["t"] else s.seconds
                end = offset + stop
                ends.append(end)
                lost = ev.get("fenced") or ev.get("end") is None
                ax.barh(y, end - t, left=t, color="#d9534f" if lost else color, alpha=0.7,
                        edgecolor="black")  # fmt: skip
            elif ev["event"] == "kill":
                ax.plot(t, y, "kx", markersize=12, mew=2)
            elif ev["event"] in ("cut", "heal"):
                ax.plot(t, y, "|", color="k", markersize=22, mew=2 if ev["event"] == "cut" else 1)
                ax.annotate(ev["event"], (t, y + 0.3), fontsize=8, ha="center")
        ax.barh(0, 0, color=color, label=s.name)  # for the legend
        ax.annotate(s.name, (offset, len(hosts) - 0.4), fontsize=9, color=color, weight="bold")
        offset = max([*ends, offset + s.seconds]) + 1.0
    ax.barh(0, 0, color="#d9534f", label="fenced, or lost with its host")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(range(len(hosts)), hosts)
    ax.set_ylim(-0.6, len(hosts) - 0.2)
    ax.set_xlim(left=0)
    ax.set_xlabel("seconds (ETL, then training)")
    ax.set_title(
        "attempts per worker host (red: cut off and fenced, or lost with its host); "
        "x: host SIGKILLed"
    )
    fig.tight_layout()
    path = os.path.join(out_dir, "timeline.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
