"""`peerlearn status` and `peerlearn secret new`: looking at a swarm, and
making the secret one is founded with; neither trains."""

from __future__ import annotations

import json
import sys
import time
from typing import Optional

import typer

from peerlearn.cli import options

WATCH_DEFAULT_S = 2.0
secret_app = typer.Typer(no_args_is_help=True, help="Swarm secrets.")


@secret_app.command("new")
def secret_new(
    out: Optional[str] = typer.Option(
        None, "--out", help="Write it to this file (mode 0600, atomically) instead of printing."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out file."),
) -> None:
    """A fresh 256-bit swarm secret (base64url), for --secret-file or $PEERLEARN_SECRET."""
    from pathlib import Path

    from peerlearn.state.atomic import write_atomic
    from peerlearn.transport.swarm_secret import new_secret

    secret = new_secret()
    if out is None:
        typer.echo(secret)
        return
    # Replacing a swarm's secret file would lock its peer out of the swarm.
    if Path(out).exists() and not force:
        typer.echo(f"{out} exists; pass --force to replace it", err=True)
        raise typer.Exit(1)
    write_atomic(out, [secret.encode() + b"\n"], mode=0o600)


def status(
    config: Optional[str] = options.CONFIG_OPTION,
    target: str = typer.Argument(
        ..., help="HOST:PORT of a peer's control socket (PEER_ID@HOST:PORT: allowlist swarm)."),
    secret_file: Optional[str] = typer.Option(
        None, help="File holding the swarm secret (else $PEERLEARN_SECRET)."),
    allowlist: Optional[str] = typer.Option(
        None, help="An allowlist swarm's key file; then --data-dir names a listed identity."),
    data_dir: Optional[str] = typer.Option(
        None, help="Data directory whose identity is on the allowlist (with --allowlist)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    watch: Optional[float] = typer.Option(
        None, "--watch", metavar="[SECONDS]",
        help=f"Ask again every SECONDS ({WATCH_DEFAULT_S:g} if omitted) until Ctrl-C."),
) -> None:
    """The swarm as one peer sees it: each peer's id, address, role, step and state hash."""
    from peerlearn.cli import credentials, status_query

    secret, keys = credentials.read_credentials(secret_file, allowlist)
    if watch is not None and watch <= 0:
        raise typer.BadParameter("SECONDS must be above 0", param_hint="--watch")
    def show(first: bool) -> None:
        rows = status_query.query_status(target, secret, data_dir=data_dir, allowlist=keys)
        if watch is not None and not as_json and sys.stdout.isatty():
            typer.echo("\x1b[H\x1b[2J", nl=False)  # a terminal shows the latest table only
        if as_json:
            typer.echo(json.dumps(rows, indent=None if watch is not None else 2))
            return
        if watch is not None:
            typer.echo(time.strftime("%H:%M:%S ") + f"{target}: {len(rows)} peers")
        for r in rows:
            typer.echo(f"{r['id'][:12]}  {r['control']:<21} {r['role']:<11} "
                       f"step {r['step']:<6} {r['state_hash']}")
        verdict = quorum_line(rows)
        if verdict:
            typer.echo(verdict)
        if first or sys.stdout.isatty():
            # What equal hashes prove differs by algorithm; say it where they are shown.
            typer.echo("state hash: the agreed state (parity: equal at equal steps). DiLoCo "
                       "family: outer params and optimizer. Gossip runs (noloco, gossip, "
                       "gossip-vc): step, configuration and merged params only; each peer's "
                       "own params differ by design.")

    if watch is None:
        show(True)
        return
    first = True
    try:
        while True:
            show(first)
            first = False
            time.sleep(watch)
    except KeyboardInterrupt:
        return  # Ctrl-C is how a watch ends, wherever it lands: not an error


def quorum_line(rows: list[dict]) -> str | None:
    """What `status` says when the view has lost its majority: lost members
    (unreachable, still in the view) too many for a quorum. The rows are one
    peer's view: members that left with Ctrl-C are not in it."""
    in_view = [r for r in rows if r["role"] in ("coordinator", "member", "lost")]
    lost = [r for r in in_view if r["role"] == "lost"]
    if not lost or 2 * (len(in_view) - len(lost)) > len(in_view):
        return None
    names = ", ".join(f"{r['id'][:8]} ({r['control']})" for r in lost)
    return (f"NO MAJORITY: {len(lost)} of the view's {len(in_view)} members are unreachable "
            f"({names}); no round can apply until enough come back. Start them again, or see "
            f"the ERROR line in a survivor's log for how to go on without them.")
