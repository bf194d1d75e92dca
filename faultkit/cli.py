"""The ``faultkit`` command: inspect, verify and clean stores; run the demo.

    faultkit ls STORE_URL [PREFIX]           stages: epoch, units done, snapshots, last commit
    faultkit show STORE_URL KEY...           one stage in detail
    faultkit verify STORE_URL [KEY...]       check logs and snapshots; exit 1 on any damage
    faultkit gc STORE_URL [KEY...] --keep N  remove old snapshots and files of killed writers
    faultkit demo [--engine ...]             watch a pipeline lose workers and recover

A KEY is the key as stored (``etl/daily/manual__2024-01-01T00=3A00...``) or the parts given
to ``faultkit.key(...)``, one argument each (``etl daily manual__2024-01-01T00:00:00``).
Human-readable tables by default, ``--json`` for scripts. Storage options (S3 endpoint,
credentials) come from ``-o name=value`` or the ``FAULTKIT_STORAGE_OPTIONS`` JSON variable.
Exit status: 0 fine, 1 damage found (verify) or no such stage (show), 2 usage or store error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from ._errors import FaultkitError, InvalidKeyError
from ._keys import check_key, key, key_parts
from ._store import CheckpointStore

__all__ = ["main"]


_TEXT_OPTIONS = frozenset({"key", "secret", "token", "password", "username", "profile"})


def _options(pairs: Sequence[str], url: str = "") -> dict[str, Any]:
    opts: dict[str, Any] = json.loads(os.environ.get("FAULTKIT_STORAGE_OPTIONS") or "{}")
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"faultkit: -o expects name=value, got {pair!r}")
        if name in _TEXT_OPTIONS:
            opts[name] = value  # a key or secret of digits is still text
            continue
        try:
            opts[name] = json.loads(value)
        except ValueError:
            opts[name] = value
    if "endpoint_url" in opts and url.lower().startswith(("s3://", "s3a://")):
        # The one option people pass flat; s3fs wants it nested.
        opts.setdefault("client_kwargs", {})["endpoint_url"] = opts.pop("endpoint_url")
    return opts


def _age(ts: float) -> str:
    if not ts:
        return "-"
    s = max(0.0, time.time() - ts)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s / n:.1f}{unit}"
    return f"{s:.0f}s"


def _size(n: int) -> str:
    f = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if f < 1024 or unit == "GiB":
            return f"{f:.0f} {unit}" if unit == "B" else f"{f:.1f} {unit}"
        f /= 1024
    return str(n)


def _key_arg(parts: Sequence[str] | None) -> str | None:
    """The key the user meant: one stored key as given, else ``key(*parts)``."""
    if not parts:
        return None
    if len(parts) == 1:
        try:
            return check_key(parts[0])
        except InvalidKeyError:
            pass
    return key(*parts)


def _readable(k: str) -> str:
    return "/".join(key_parts(k))


def _summary(store: CheckpointStore, key: str) -> dict[str, Any]:
    v = store.read_view(key)
    snaps = v.live_snaps()
    return {
        "key": key,
        "parts": key_parts(key),
        "epoch": v.epoch,
        "units_done": len(v.units),
        "snapshots": len(snaps),
        "last_step": snaps[-1].step if snaps else None,
        "last_commit": v.last_commit or None,
        "damaged_records": len(v.damaged),
    }


def cmd_ls(store: CheckpointStore, a: argparse.Namespace, out: Console) -> int:
    rows = [_summary(store, k) for k in store.keys(a.prefix or "")]
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    t = Table(title=f"{store.url}: {len(rows)} stage(s)")
    for col in ("key", "epoch", "units done", "snapshots", "last step", "last commit"):
        t.add_column(col, justify="left" if col == "key" else "right")
    for r in rows:
        t.add_row(
            _readable(r["key"]) + (" [red](damaged log)[/red]" if r["damaged_records"] else ""),
            str(r["epoch"]),
            str(r["units_done"]),
            str(r["snapshots"]),
            "-" if r["last_step"] is None else str(r["last_step"]),
            _age(r["last_commit"] or 0) + (" ago" if r["last_commit"] else ""),
        )
    out.print(t)
    return 0


def _snap_row(rec: Any, err: str | None) -> dict[str, Any]:
    return {
        "step": rec.step,
        "epoch": rec.epoch,
        "size": rec.size,
        "created": rec.ts,
        "checksum": rec.checksum,
        "ok": err is None,
        "error": err,
        "meta": rec.meta,
    }


def _snap_rows(store: CheckpointStore, key: str) -> list[dict[str, Any]]:
    return [_snap_row(r, err) for r, err in store.verify(key)]


def cmd_show(store: CheckpointStore, a: argparse.Namespace, out: Console) -> int:
    k = _key_arg(a.key)
    assert k is not None
    v = store.read_view(k)
    if not v.cursor or k not in store.keys(k):
        out.print(f"[red]no stage {k!r} in {store.url}[/red] (faultkit ls lists them)")
        return 1
    snaps = _snap_rows(store, k)
    info = {
        **_summary(store, k),
        "claims": [{"epoch": e, "seq": s, "time": ts} for e, s, ts in v.claims],
        "units": [{"unit": r.unit, "epoch": r.epoch, "result": r.result} for r in v.units.values()],
        "snapshots_detail": snaps,
    }
    if a.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    out.print(
        f"[bold]{_readable(k)}[/bold]  epoch {v.epoch}, {len(v.units)} unit(s) done, "
        f"{len(snaps)} snapshot(s), {v.cursor} log record(s)"
    )
    if k != _readable(k):
        out.print(f"stored as {k}")
    t = Table(title="attempts")
    for col in ("epoch", "claimed", "units done by it"):
        t.add_column(col)
    for e, _s, ts in v.claims:
        n = sum(1 for r in v.units.values() if r.epoch == e)
        t.add_row(str(e), _age(ts) + " ago", str(n))
    out.print(t)
    _print_snaps(out, snaps)
    return 0


def _print_snaps(out: Console, snaps: list[dict[str, Any]], title: str = "snapshots") -> None:
    t = Table(title=title)
    for col in ("step", "epoch", "size", "age", "checksum"):
        t.add_column(col, justify="right" if col != "checksum" else "left")
    for s in snaps:
        status = "[green]ok[/green]" if s["ok"] else f"[red]CORRUPT: {s['error']}[/red]"
        t.add_row(str(s["step"]), str(s["epoch"]), _size(s["size"]), _age(s["created"]), status)
    out.print(t)


def cmd_verify(store: CheckpointStore, a: argparse.Namespace, out: Console) -> int:
    k = _key_arg(a.key)
    keys = [k] if k else store.keys()
    stray = [] if k else store._storage.anomalies("")
    report: dict[str, Any] = {}
    bad = 0
    for key_ in keys:
        r = store.report(key_)
        snaps = [_snap_row(rec, err) for rec, err in r.snapshots]
        damage = [{"record": d.seq, "kind": d.kind, "detail": d.detail} for d in r.damaged]
        report[key_] = {
            "snapshots": snaps,
            "log_damage": damage,
            "anomalies": r.anomalies,
            "problems": r.problems,
        }
        bad += len(r.problems)
    # Links elsewhere in the store (outside any stage) are reported too.
    staged = tuple(f"{k_}/" for k_ in keys)
    stray = [p for p in stray if not p.startswith(staged)]
    bad += len(stray)
    if a.json:
        print(json.dumps({"ok": bad == 0, "stages": report, "anomalies": stray}, indent=2))
    else:
        for key_, r in report.items():
            if r["snapshots"]:
                _print_snaps(out, r["snapshots"], title=_readable(key_))
            for line in r["problems"]:
                out.print(f"[red]{_readable(key_)}: {line}[/red]")
        for p in stray:
            out.print(f"[red]{p}: a symbolic link or special file; faultkit ignores it[/red]")
        verdict = "[green]all verified[/green]" if not bad else f"[red]{bad} problem(s)[/red]"
        out.print(f"{len(keys)} stage(s): {verdict}")
    return 1 if bad else 0


def _duration(text: str) -> float:
    """Seconds in ``7d``, ``12h``, ``30m``, ``45s`` or a plain number of seconds."""
    units = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration; write e.g. 7d, 12h, 30m or 45s"
        ) from None


def cmd_gc(store: CheckpointStore, a: argparse.Namespace, out: Console) -> int:
    k = _key_arg(a.key)
    if a.older_than is not None:
        gone = store.expire(a.older_than, prefix=k or "")
        if a.json:
            print(json.dumps({"deleted": gone}, indent=2))
        else:
            out.print(f"deleted {len(gone)} finished stage(s) older than {a.older_than:g} s")
            for g in gone:
                out.print(f"  {_readable(g)}")
        return 0
    keys = [k] if k else store.keys()
    report = {k: store.gc(k, keep=a.keep, grace=a.grace) for k in keys}
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        t = Table(title=f"gc keep={a.keep}")
        for col in ("key", "kept steps", "removed steps", "orphans", "temp files"):
            t.add_column(col)
        for k, r in report.items():
            cells = [str(r[c]) for c in ("kept", "removed", "orphans", "temp_files")]
            t.add_row(_readable(k), *cells)
        out.print(t)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="faultkit",
        description=__doc__.split("\n\n")[0].replace("``", ""),  # RST marks are noise here
    )
    sub = p.add_subparsers(dest="command", required=True)

    def store_cmd(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument(
            "store",
            metavar="STORE_URL",
            help="the store: file:///path, s3://bucket/prefix (never created by this command)",
        )
        sp.add_argument(
            "-o",
            "--option",
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help="storage option for fsspec (repeatable), e.g. endpoint_url=...",
        )
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        return sp

    key_help = "a stage key as stored, or the parts given to faultkit.key(...), one argument each"
    store_cmd("ls", "list stages").add_argument(
        "prefix", nargs="?", default="", help="only keys starting with this (as stored)"
    )
    store_cmd("show", "show one stage").add_argument("key", nargs="+", metavar="KEY", help=key_help)
    store_cmd("verify", "verify logs and snapshots (exit 1 on any damage)").add_argument(
        "key", nargs="*", metavar="KEY", help=key_help + "; default: every stage"
    )
    gc = store_cmd("gc", "remove old snapshots and leftovers")
    gc.add_argument("key", nargs="*", metavar="KEY", help=key_help + "; default: every stage")
    gc.add_argument("--keep", type=int, default=3, help="valid snapshots to keep (min 1)")
    gc.add_argument(
        "--grace",
        type=float,
        default=600.0,
        help="seconds before unreferenced/temp files count as abandoned",
    )
    gc.add_argument(
        "--older-than",
        type=_duration,
        metavar="AGE",
        help="instead: delete finished stages whose result is older than AGE (7d, 12h, 30m)",
    )
    demo = sub.add_parser("demo", help="run the bundled pipeline with real worker kills")
    from .demo._cli import add_arguments

    add_arguments(demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``faultkit`` console script."""
    a = _parser().parse_args(argv)
    # Piped or in CI, rich would assume 80 columns and squeeze the tables.
    out = Console(width=None if sys.stdout.isatty() else 120)
    if a.command == "demo":
        from .demo._cli import run

        return run(a, out)
    try:
        store = CheckpointStore(a.store, must_exist=True, **_options(a.option, a.store))
        return {"ls": cmd_ls, "show": cmd_show, "verify": cmd_verify, "gc": cmd_gc}[a.command](
            store, a, out
        )
    except FaultkitError as exc:
        err = Console(stderr=True, soft_wrap=True, highlight=False)
        err.print(f"faultkit {a.command}: {exc}", style="red", markup=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
