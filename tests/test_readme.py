"""The README is executable documentation: every code block runs here exactly as written.

Blocks are read from README.md in order and grouped by ``##`` section; the blocks of one
section run in one fresh folder, in order (a tour's commands inspect what its snippet made).
A ``python`` block runs as a script (a block defining ``test_`` functions runs under pytest);
each line of an ``sh`` block runs in bash and must exit 0, or the ``(exit N)`` its comment
ends with. An HTML comment right before a block changes that:

* ``<!-- not run: why -->`` — commands that cannot run inside the suite, with the reason;
* ``<!-- same as: FILE -->`` — commands that FILE runs (the install lines are the Makefile's);
* ``<!-- server: TEXT -->`` — a long-running server: started, and once its output shows TEXT
  it is interrupted (Ctrl-C) and must exit 0;
* ``<!-- cwd: repository root -->`` — commands run from a checkout's root, with nothing on
  ``PYTHONPATH``.

Nothing is filled in: the only help a section gets is an environment a user would have (a
migrated Airflow home for the Airflow tour, a fresh Prefect home for the Prefect one).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from faultkit.testing import wait_until

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent

_FENCE = re.compile(
    r"(?:<!--\s*(?P<mark>[^>]*?)\s*-->\s*\n)?```(?P<lang>[a-z]*)\n(?P<body>.*?)```", re.S
)


@dataclass
class Block:
    section: str
    lang: str
    body: str
    mark: str
    line: int

    @property
    def kind(self) -> str:
        return self.mark.split(":", 1)[0].strip() if self.mark else ""

    @property
    def arg(self) -> str:
        return self.mark.split(":", 1)[1].strip() if ":" in self.mark else ""


def _blocks() -> list[Block]:
    text = README.read_text()
    heads = [(m.start(), m.group(1)) for m in re.finditer(r"^## (.+)$", text, re.M)]
    out = []
    for m in _FENCE.finditer(text):
        section = next((h for pos, h in reversed(heads) if pos < m.start()), "intro")
        line = text.count("\n", 0, m.start("body"))
        out.append(Block(section, m.group("lang"), m.group("body"), m.group("mark") or "", line))
    return out


BLOCKS = _blocks()
SECTIONS = list(dict.fromkeys(b.section for b in BLOCKS))


def _commands(body: str) -> list[str]:
    """The command lines of an sh block (backslash continuations joined)."""
    return [c for c in body.replace("\\\n", " ").splitlines() if c.strip()]


def _expected(cmd: str) -> int:
    m = re.search(r"\(exit (\d+)\)\s*$", cmd)
    return int(m.group(1)) if m else 0


def _env(section: str, cwd: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    if "Airflow" in section:
        home = cwd / "airflow-home"
        home.mkdir()
        env.update(
            {
                "AIRFLOW_HOME": str(home),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__DAGS_FOLDER": str(cwd),
            }
        )
    if "Prefect" in section:
        for name in [n for n in env if n.startswith("PREFECT_API_")]:
            del env[name]
        env["PREFECT_HOME"] = str(cwd / "prefect-home")
        env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
        env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    return env


def _run_sh(b: Block, cwd: Path, env: dict[str, str]) -> None:
    for cmd in _commands(b.body):
        r = subprocess.run(
            ["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
        )
        want = _expected(cmd)
        assert r.returncode == want, (
            f"README line {b.line}: {cmd!r} exited {r.returncode}, documented {want}\n"
            f"{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        )


def _run_server(b: Block, cwd: Path, env: dict[str, str]) -> None:
    (cmd,) = _commands(b.body)
    log = cwd / "server.log"
    with open(log, "wb") as out:
        p = subprocess.Popen(
            ["bash", "-c", f"exec {cmd}"],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(
            lambda: p.poll() is not None or b.arg in log.read_text(errors="replace"),
            120,
            f"{cmd!r} to print {b.arg!r}",
            interval=0.2,
        )
        assert p.poll() is None, log.read_text()[-3000:]
        p.send_signal(signal.SIGINT)
        assert p.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(30)


def _run_python(b: Block, cwd: Path, env: dict[str, str], name: str, **extra: str) -> str:
    script = cwd / f"{name}.py"
    script.write_text(b.body)
    if re.search(r"^def test_", b.body, re.M):
        args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", script.name]
    else:
        args = [sys.executable, script.name]
    r = subprocess.run(
        args, cwd=cwd, env={**env, **extra}, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, (
        f"README block at line {b.line} failed ({r.returncode}):\n{r.stdout[-3000:]}\n"
        f"{r.stderr[-4000:]}"
    )
    return r.stdout


def _same_as(b: Block) -> None:
    """Each command of the block is a command of the named file (modulo pip's -q)."""
    target = (ROOT / b.arg).read_text().replace("$(PIP)", "pip").replace(" -q ", " ")
    for cmd in _commands(b.body):
        bare = cmd.split("#", 1)[0].strip()
        assert bare in target, f"README line {b.line}: {bare!r} is not what {b.arg} runs"


def _bitwise_after_kill(b: Block, cwd: Path, env: dict[str, str]) -> None:
    """The training tour, killed after its second checkpoint and run again, ends with the
    same weights as an uninterrupted run."""
    once = cwd / "uninterrupted"
    once.mkdir()
    ref = _run_python(b, once, env, "train").split()[-1]
    killed = cwd / "killed"
    killed.mkdir()
    script = killed / "train.py"
    script.write_text(b.body)
    r = subprocess.run(
        [sys.executable, script.name],
        cwd=killed,
        env={**env, "FAULTKIT_FAILPOINTS": "save.committed=kill@2"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]  # the kill really landed
    out = _run_python(b, killed, env, "train")
    assert out.split()[-1] == ref, "the resumed run's weights differ"


def _rows(db: Path, table: str = "orders") -> int:
    import sqlite3

    with sqlite3.connect(db) as c:
        return c.execute(f"SELECT COUNT(*), COUNT(DISTINCT order_id) FROM {table}").fetchone()


# What each section's code must have done, beyond exiting 0.
OUTCOMES = {
    "Five-minute tour: plain Python": lambda d, out: (
        _rows(d / "orders.db") == (4800, 4800) and "newest valid snapshot: 100" in out
    ),
    "Five-minute tour: Dask": lambda d, out: (
        _rows(d / "dask-orders.db") == (800, 800) and "'rows': 100" in out
    ),
    "Five-minute tour: Airflow 3": lambda d, out: _rows(d / "airflow-orders.db") == (40, 40),
    "Five-minute tour: Prefect 3": lambda d, out: out.split()[-1] == "4000",
    "Alerts and retries (any orchestrator)": lambda d, out: "ok after 3 calls" in out,
    "Test your own pipeline: `faultkit.chaos`": lambda d, out: "1 passed" in out,
}


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("section", SECTIONS)
def test_readme_section_runs_as_written(section, tmp_path):
    """Every block of this README section runs as written, with its documented exit codes."""
    env = _env(section, tmp_path)
    out = ""
    for i, b in enumerate(x for x in BLOCKS if x.section == section):
        if b.kind == "not run":
            assert b.arg, f"README line {b.line}: say why the block is not run"
            continue
        if b.kind == "same as":
            _same_as(b)
        elif b.kind == "server":
            _run_server(b, tmp_path, env)
        elif b.kind == "cwd":
            assert b.arg == "repository root", b.mark
            bare = {k: v for k, v in env.items() if k != "PYTHONPATH"}
            _run_sh(b, ROOT, bare)
        elif b.lang == "python" and "TrainingCheckpointer" in b.body:
            _bitwise_after_kill(b, tmp_path, env)
        elif b.lang == "python":
            out += _run_python(b, tmp_path, env, f"block{i}")
        elif b.lang == "sh":
            _run_sh(b, tmp_path, env)
        else:
            pytest.fail(f"README line {b.line}: a ``{b.lang}`` block is neither run nor marked")
    check = OUTCOMES.get(section)
    assert check is None or check(tmp_path, out), f"{section}: wrong outcome:\n{out[-3000:]}"


def test_every_block_is_run_or_says_why():
    """No block is silently skipped: python always runs; others run or carry a marker."""
    for b in BLOCKS:
        assert b.kind in ("", "not run", "same as", "server", "cwd"), b.mark
        if b.lang == "python":
            assert b.kind == "", f"README line {b.line}: python blocks always run"
        elif b.kind == "":
            assert b.lang == "sh", f"README line {b.line}: unmarked ``{b.lang}`` block"
