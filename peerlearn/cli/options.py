"""Where a command's settings come from, in order: flags, then `PEERLEARN_*`
environment variables, then a TOML file (`--config FILE`), then defaults.

Every option of every command reads the environment variable named after
its long flag (`--data-port` <- `PEERLEARN_DATA_PORT`; `--help` shows each).
The file is read by an eager `--config` option that fills click's
`default_map`, which click consults after the command line and the
environment: the precedence above is click's own, not re-implemented here.

A config file holds settings by long flag name (`data-port` or `data_port`),
at the top level for the command being run, or in a table named after a
command (`[run]`, `[status]`) for that command only:

    listen = "0.0.0.0:7400"
    advertise = "203.0.113.7:7400"
    secret-file = "/etc/peerlearn/secret"
    [run]
    algo = "diloco"
    set = ["n_layer=2"]

A setting the command does not have is refused with one line.
"""

from __future__ import annotations

import tomllib
from typing import Optional

import typer

ENV_PREFIX = "PEERLEARN_"
CONFIG_ENV = "PEERLEARN_CONFIG"
# Options that are not settings (or that name the source of the others).
_NOT_SETTINGS = {"help", "version", "config"}
PRECEDENCE = "flags > PEERLEARN_* environment > --config file > defaults"


def _is_option(param) -> bool:
    # Duck-typed: typer vendors click in recent versions, so no one Option class.
    return getattr(param, "param_type_name", None) == "option"


def _long_flag(param) -> str | None:
    return next((o[2:] for o in param.opts if o.startswith("--")), None)


def env_name(param) -> str | None:
    flag = _long_flag(param)
    return None if flag is None else ENV_PREFIX + flag.upper().replace("-", "_")


def _settings_of(command) -> dict[str, str]:
    """Config-file key (the long flag, dashes) -> parameter name."""
    out = {}
    for p in command.params:
        flag = _long_flag(p) if _is_option(p) else None
        if flag and p.name not in _NOT_SETTINGS:
            out[flag] = p.name
    return out


def load_config(ctx, param, value: Optional[str]) -> Optional[str]:
    """Eager callback of --config: the file's settings become this command's
    defaults (below flags and environment, as click consults them)."""
    if not value:
        return value
    try:
        with open(value, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise typer.BadParameter(f"cannot read {value}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise typer.BadParameter(f"{value} is not valid TOML: {e}") from None
    name = ctx.info_name
    settings = {k: v for k, v in data.items() if not isinstance(v, dict)}
    settings.update(data.get(name, {}))
    known = _settings_of(ctx.command)
    defaults = dict(ctx.default_map or {})
    for key, v in settings.items():
        flag = key.replace("_", "-")
        if flag not in known:
            raise typer.BadParameter(
                f"{value}: `peerlearn {name}` has no setting {key!r}")
        defaults[known[flag]] = v
    ctx.default_map = defaults
    return value


CONFIG_OPTION = typer.Option(
    None, "--config", is_eager=True, callback=load_config, metavar="FILE",
    help=f"TOML file of settings (keys: long flag names; a [COMMAND] table for one "
         f"command). Precedence: {PRECEDENCE}.")


def wire_environment(command) -> None:
    """Every option of every command of `command` reads PEERLEARN_<FLAG>
    (shown in --help)."""
    for sub in getattr(command, "commands", {}).values():
        wire_environment(sub)
    for p in getattr(command, "params", []):
        if not _is_option(p) or p.name in ("help", "version"):
            continue
        if p.name == "config":
            p.envvar = CONFIG_ENV
        elif p.envvar is None:
            p.envvar = env_name(p)
        p.show_envvar = True


def optional_values(argv: list[str], flags: dict[str, str]) -> list[str]:
    """`--watch` alone means `--watch 2`: a flag in `flags` not followed by a
    number gets its default value (the vendored click has no optional values)."""
    out = list(argv)
    i = 0
    while i < len(out):
        if out[i] in flags:
            nxt = out[i + 1] if i + 1 < len(out) else None
            try:
                float(nxt) if nxt is not None else None
                ok = nxt is not None
            except ValueError:
                ok = False
            if not ok:
                out.insert(i + 1, flags[out[i]])
            i += 1
        i += 1
    return out
