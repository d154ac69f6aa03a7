"""The `peerlearn` command line. Subcommands stay thin: they parse options and
call into the library, printing JSON where a machine reads the output. This
module is the command tree and the console script; the commands live beside
it, by what they do: run_cmd (`run`), launch_cmds (`demo`, `swarm`),
admin_cmds (`status`, `secret`), bench_cmds (`bench ...`).

Every option can also come from a `PEERLEARN_<FLAG>` environment variable or a
TOML file (`--config FILE`); flags win over the environment, the environment
over the file, the file over defaults."""

from __future__ import annotations

import sys
import warnings
from typing import Optional

import typer

from peerlearn import __version__
from peerlearn.cli import launch_cmds, options, run_cmd
from peerlearn.cli.admin_cmds import WATCH_DEFAULT_S, secret_app, status
from peerlearn.cli.bench_cmds import bench
# Read here by tests/test_cli.py, beside metrics.DEFAULT_PORT.
from peerlearn.cli.run_cmd import DEFAULT_METRICS_PORT  # noqa: F401

# numpy is optional (a plain install has none), and torch says so on import in
# a warning every peer would print; the runtime never hands torch a numpy array.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

HELP = " ".join("""peerlearn trains one model together on machines scattered over the
internet, each with a few GPUs (or just CPUs): every peer trains on its own data and the
peers synchronise over slow, unreliable links; peers may come and go at any time. Try it
on this machine with `peerlearn demo`; for a real swarm, make a secret with `peerlearn
secret new`, start the first peer with `peerlearn run`, and run the join command it
prints on each other machine. Every option can also be set as a PEERLEARN_<FLAG>
environment variable or in a TOML file given with --config (flags > environment > file >
defaults).""".split())

app = typer.Typer(no_args_is_help=True, add_completion=False, help=HELP)
app.add_typer(bench, name="bench")
app.add_typer(secret_app, name="secret")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"peerlearn {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """peerlearn: decentralised training over the internet."""


# In this order in `peerlearn --help`.
app.command("run")(run_cmd.run)
app.command("demo", help=launch_cmds.DEMO_HELP)(launch_cmds.demo)
app.command("swarm")(launch_cmds.swarm)
app.command("status")(status)


def _one_line(e: Exception, ctx) -> str:
    """A click error as one line: the command, then what is wrong, naming where
    a bad value came from (flag, environment variable or config file)."""
    param = getattr(e, "param", None)
    if param is not None and ctx is not None and type(e).__name__ == "BadParameter":
        text = f"invalid value for {options.where_from(ctx, param)}: {e.message}"
    else:
        text = e.format_message()
    prog = ctx.command_path if ctx is not None else "peerlearn"
    text = " ".join(str(text).split())
    if text.startswith("Invalid value for "):
        text = "i" + text[1:]
    return f"{prog}: {text}"


def main() -> None:
    """The console script: a usage mistake is one plain line on stderr and
    exit code 2 (click's convention), whatever the terminal and whether rich is
    installed; help and everything else as typer shows it."""
    command = typer.main.get_command(app)
    options.wire_environment(command)
    args = sys.argv[1:]
    if args[:1] == ["status"]:
        args = options.optional_values(args, {"--watch": f"{WATCH_DEFAULT_S:g}"})
    try:
        code = command.main(args=args, prog_name="peerlearn", standalone_mode=False)
    except options.ClickException as e:
        if type(e).__name__ == "NoArgsIsHelpError":
            # No command given: the help, as usual (rich has printed it already).
            if e.format_message().strip():
                e.show()
        else:
            typer.echo(_one_line(e, getattr(e, "ctx", None)), err=True)
        sys.exit(e.exit_code)
    except typer.Abort as e:
        interrupted = isinstance(e.__cause__, KeyboardInterrupt)
        typer.echo("peerlearn: interrupted" if interrupted else "peerlearn: aborted", err=True)
        sys.exit(130 if interrupted else 1)
    if code == 130:  # Ctrl-C that no command caught (typer's Exit(130))
        typer.echo("peerlearn: interrupted", err=True)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
