"""Output of `peerlearn swarm` and `peerlearn demo`: several peer processes,
one terminal.

Each child logs one JSON object per line (`--log-format json`); a pump
thread per child reads them and hands them to one `Board`, which writes
whole lines under a lock with the peer's name in front (lines of different
peers never run together), or, on a terminal with rich installed, keeps a
live table of every peer's progress. rich is optional (the `progress`
extra): without it, or when stderr is not a terminal (a log file, CI), the
plain lines are the output.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable
from typing import IO

MODES = ("auto", "rich", "plain")


def rich_available() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def choose(mode: str) -> str:
    """'rich' or 'plain' for `--progress MODE`; a bad mode exits with one line."""
    if mode not in MODES:
        raise SystemExit(f"--progress: one of {', '.join(MODES)}, not {mode!r}")
    if mode == "auto":
        return "rich" if sys.stderr.isatty() and rich_available() else "plain"
    if mode == "rich" and not rich_available():
        raise SystemExit("--progress rich needs rich: pip install 'peerlearn[progress]'")
    return mode


def write_line(fd: int, text: str) -> None:
    """One line in as few writes as the OS allows (one, below PIPE_BUF)."""
    data = (text.rstrip("\n") + "\n").encode(errors="replace")
    while data:
        data = data[os.write(fd, data):]


def progress_text(f: dict) -> str:
    parts = [f"step {f['step']}"]
    if "loss" in f:
        parts.append(f"loss {f['loss']:.4f}")
    if "tokens_per_s" in f:
        parts.append(f"tokens/s {f['tokens_per_s']:.0f}")
    if "swarm_step" in f:
        parts.append(f"swarm step {f['swarm_step']}")
    return " ".join(parts)


class Board:
    """Where the children's lines go. Thread-safe; close() ends the live view."""

    def __init__(self, mode: str, names: list[str], fd: int | None = None):
        self.fd = sys.stderr.fileno() if fd is None else fd
        self.lock = threading.Lock()
        self.rows: dict[str, dict] = {n: {} for n in names}
        self.live = None
        if mode == "rich":
            from rich.console import Console
            from rich.live import Live

            self.console = Console(stderr=True)
            self.live = Live(self._table(), console=self.console, refresh_per_second=4,
                             transient=False)
            self.live.start()

    def _table(self):
        from rich.table import Table

        t = Table(box=None)
        for col in ("peer", "step", "loss", "tokens/s", "swarm step", "last message"):
            t.add_column(col)
        for name, r in self.rows.items():
            p = r.get("progress", {})
            t.add_row(name, str(p.get("step", "")),
                      f"{p['loss']:.4f}" if "loss" in p else "",
                      f"{p['tokens_per_s']:.0f}" if "tokens_per_s" in p else "",
                      str(p.get("swarm_step", "")), r.get("message", "")[:60])
        return t

    def line(self, name: str, text: str) -> None:
        """A line from `name` that is not progress (a warning, a view change)."""
        with self.lock:
            if self.live is not None:
                if name in self.rows:  # the launcher's own lines get no row
                    self.rows[name]["message"] = text
                self.live.console.print(f"[{name}] {text}", markup=False, highlight=False)
                self.live.update(self._table())
            else:
                write_line(self.fd, f"[{name}] {text}")

    def progress(self, name: str, fields: dict) -> None:
        with self.lock:
            if self.live is not None:
                self.rows.setdefault(name, {})["progress"] = fields
                self.live.update(self._table())
            else:
                write_line(self.fd, f"[{name}] {progress_text(fields)}")

    def close(self) -> None:
        with self.lock:
            if self.live is not None:
                self.live.stop()
                self.live = None


def pump(stream: IO[str], name: str, board: Board,
         other: Callable[[str], bool] | None = None) -> None:
    """Reads a child's lines until EOF. JSON log records go to the board (a
    record with a `step` field is progress); `other(line)` may claim a line
    (True: handled, e.g. a report); anything else is shown as it is."""
    for raw in stream:
        line = raw.rstrip("\n")
        if other is not None and other(line):
            continue
        try:
            rec = json.loads(line) if line.startswith("{") else None
        except ValueError:
            rec = None
        if isinstance(rec, dict) and "level" in rec and "message" in rec:
            if "step" in rec and rec.get("logger") in ("peerlearn.train", "peerlearn.synthetic"):
                board.progress(name, rec)
            else:
                board.line(name, f"{rec['level'].upper()} {rec['message']}")
        elif line:
            board.line(name, line)
