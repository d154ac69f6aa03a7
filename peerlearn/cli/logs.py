"""Log lines of `peerlearn run | swarm | demo`: a level in every line, plain
text or one JSON object per line (`--log-format json`, for a log shipper).

The level is `--log-level` (default info; `PEERLEARN_LOG_LEVEL` sets it
too), moved one step down per `-v` and up per `-q`. A record's `fields`
extra (a dict) goes into the JSON object as they are, so a machine reading
progress lines does not parse text.
"""

from __future__ import annotations

import json
import logging
import sys
import time

import typer

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")

LOG_LEVEL_OPTION = typer.Option("info", "--log-level", metavar="LEVEL",
                                help="debug | info | warning | error.")
VERBOSE_OPTION = typer.Option(0, "--verbose", "-v", count=True,
                              help="One level more verbose (repeat).")
QUIET_OPTION = typer.Option(0, "--quiet", "-q", count=True, help="One level quieter (repeat).")
LOG_FORMAT_OPTION = typer.Option("text", "--log-format", metavar="FORMAT",
                                 help="text | json (one object per line).")


def level_of(name: str, verbose: int = 0, quiet: int = 0) -> int:
    name = name.lower()
    if name not in LEVELS:
        raise typer.BadParameter(f"one of {', '.join(LEVELS)}, not {name!r}",
                                 param_hint="--log-level")
    i = min(max(LEVELS.index(name) - verbose + quiet, 0), len(LEVELS) - 1)
    return getattr(logging, LEVELS[i].upper())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
               + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name,
               "message": record.getMessage()}
        out.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup(level: str, fmt: str, verbose: int = 0, quiet: int = 0) -> int:
    """Configures the root logger on stderr; returns the level set. A bad
    level or format is a usage error (one line)."""
    n = level_of(level, verbose, quiet)
    if fmt not in FORMATS:
        raise typer.BadParameter(f"one of {', '.join(FORMATS)}, not {fmt!r}",
                                 param_hint="--log-format")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(n)
    return n


def flags(level: str, fmt: str, verbose: int, quiet: int) -> list[str]:
    """The same settings as flags, for child `peerlearn run` processes."""
    return ["--log-level", logging.getLevelName(level_of(level, verbose, quiet)).lower(),
            "--log-format", fmt]
