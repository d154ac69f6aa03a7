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

A setting the command does not have, or a table that names no command, is
refused with one line naming the file, the key and the nearest valid name; a
value an option cannot take is refused by click with the file and key named
(`where_from`: errors say where a bad value came from).
"""

from __future__ import annotations

import difflib
import tomllib
from typing import Optional

import typer

try:  # recent typer vendors click; earlier versions use click itself
    from typer._click.exceptions import ClickException, UsageError  # noqa: F401 - app.main uses it
except ImportError:  # pragma: no cover - depends on the typer installed
    from click.exceptions import ClickException, UsageError  # noqa: F401 - app.main uses it

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


def _nearest(word: str, choices) -> str:
    """ "; did you mean 'x'?" for the closest of `choices`, else ""."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _commands_with_config(ctx) -> dict:
    """Command name -> command, for every command that reads --config (the
    tables a config file may hold)."""
    root = ctx.find_root().command
    subs = getattr(root, "commands", None) or {ctx.info_name: ctx.command}
    return {n: c for n, c in subs.items()
            if any(getattr(p, "name", None) == "config" for p in getattr(c, "params", []))}


class ConfigError(ValueError):
    """A mistake in a --config file (one line: the file, the key, the fix)."""


def read_config(ctx, path: str) -> dict:
    """The settings `path` gives the command being run: parameter name ->
    (key as written, value). Every table must name a command that reads
    --config and every key a setting of its command, or ConfigError says
    which, with the nearest valid name. (A value the option cannot take is
    refused by click when it converts it; `where_from` names the file then.)"""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    name = ctx.info_name
    commands = _commands_with_config(ctx)
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    for table, body in tables.items():
        if table not in commands:
            raise ConfigError(f"{path}: [{table}] is not a command{_nearest(table, commands)} "
                              f"(tables: {', '.join(f'[{c}]' for c in commands)})")
        command = commands[table]
        for key in body:
            _check_key(command, table, path, key)
    top = {k: v for k, v in data.items() if not isinstance(v, dict)}
    for key in top:
        _check_key(ctx.command, name, path, key)
    settings = {**top, **tables.get(name, {})}
    known = _settings_of(ctx.command)
    return {known[k.replace("_", "-")]: (k, v) for k, v in settings.items()}


def _check_key(command, name: str, path: str, key: str) -> None:
    known = _settings_of(command)
    flag = key.replace("_", "-")
    if flag not in known:
        raise ConfigError(f"{path}: `peerlearn {name}` has no setting {key!r}"
                          f"{_nearest(flag, known)}")


def load_config(ctx, param, value: Optional[str]) -> Optional[str]:
    """Eager callback of --config: the file's settings become this command's
    defaults (below flags and environment, as click consults them)."""
    if not value:
        return value
    try:
        settings = read_config(ctx, value)
    except ConfigError as e:
        raise UsageError(str(e), ctx=ctx) from None
    ctx.default_map = {**(ctx.default_map or {}), **{p: v for p, (_, v) in settings.items()}}
    ctx.meta[_CONFIG_META] = (value, {p: k for p, (k, _) in settings.items()})
    return value


_CONFIG_META = "peerlearn.config"


def where_from(ctx, param) -> str:
    """Where the value of `param` came from, for an error about it: the flag,
    the environment variable, or the config file and its key."""
    flag = f"--{_long_flag(param)}" if _is_option(param) and _long_flag(param) else \
        (param.name or "").upper()
    get_source = getattr(ctx, "get_parameter_source", None)
    source = getattr(get_source(param.name), "name", None) if get_source else None
    if source == "ENVIRONMENT" and param.envvar:
        envvar = param.envvar if isinstance(param.envvar, str) else "/".join(param.envvar)
        return f"${envvar} ({flag})"
    if source == "DEFAULT_MAP" and _CONFIG_META in ctx.meta:
        path, keys = ctx.meta[_CONFIG_META]
        if param.name in keys:
            return f"{keys[param.name]} in {path} ({flag})"
    if source == "DEFAULT":
        return f"the default of {flag}"
    return flag


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
