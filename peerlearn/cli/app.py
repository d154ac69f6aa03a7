"""The `peerlearn` command line. Subcommands stay thin: they parse options and
call into the library, printing JSON where a machine reads the output."""

from __future__ import annotations

import json
from typing import Optional

import typer

from peerlearn import __version__

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
bench = typer.Typer(no_args_is_help=True, help="Benchmarks; each prints JSON with its baseline.")
app.add_typer(bench, name="bench")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"peerlearn {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(  # noqa: UP007 - typer needs Optional on 3.10
        None, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """peerlearn: decentralised training over the internet."""


def _emit(result: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        typer.echo(json.dumps(result, indent=2))


@bench.command("codec")
def bench_codec(
    numel: int = typer.Option(64 * 2**20, help="Elements of the fp32 test tensor."),
    threads: Optional[int] = typer.Option(None, help="Threads (default: all cores)."),  # noqa: UP007
    repeat: int = typer.Option(3, help="Timed repetitions; the best is reported."),
    as_json: bool = typer.Option(True, "--json/--no-json", help="Print JSON."),
) -> None:
    """Encode/decode GB/s per codec beside PyTorch and a memory copy, in one run."""
    from peerlearn.bench import codec

    _emit(codec.run(numel=numel, threads=threads, repeat=repeat), as_json)


@bench.command("stream")
def bench_stream(
    conns: str = typer.Option("1,2,4,8,16", help="Connection counts to measure."),
    mbytes: int = typer.Option(256, help="Megabytes per timed transfer."),
    wan: Optional[str] = typer.Option(  # noqa: UP007
        None, help="RTT_MS,MBIT: also measure over the emulated wide-area path (needs root)."
    ),
    as_json: bool = typer.Option(True, "--json/--no-json", help="Print JSON."),
) -> None:
    """Striped-link throughput per connection count, beside one raw socket."""
    from peerlearn.bench import stream

    counts = [int(c) for c in conns.split(",") if c]
    wan_spec = None
    if wan:
        rtt, rate = wan.split(",")
        wan_spec = (float(rtt), float(rate))
    _emit(stream.run(conns=counts, mbytes=mbytes, wan=wan_spec), as_json)


@bench.command("allreduce")
def bench_allreduce(
    peers: int = typer.Option(4, help="Peers, each its own process (and host under --wan)."),
    numel: int = typer.Option(100_000_000, help="Elements of the fp32 tensor."),
    codec: str = typer.Option("none", help="Wire codec: none or int8."),
    wan: Optional[str] = typer.Option(  # noqa: UP007
        None, help="RTT_MS,MBIT: run over the emulated wide-area path (needs root)."
    ),
    repeat: int = typer.Option(3, help="Timed runs after one warm-up; the best is reported."),
    conns: Optional[int] = typer.Option(  # noqa: UP007
        None, help="Connections per link (default: 2 on loopback, 8 over --wan)."
    ),
    gloo: bool = typer.Option(True, "--gloo/--no-gloo", help="Also time torch.distributed gloo."),
    as_json: bool = typer.Option(True, "--json/--no-json", help="Print JSON."),
) -> None:
    """Ring all-reduce time and bus bandwidth beside gloo's, in one run."""
    from peerlearn.bench import allreduce

    wan_spec = None
    if wan:
        rtt, rate = wan.split(",")
        wan_spec = (float(rtt), float(rate))
    _emit(allreduce.run(peers=peers, numel=numel, codec=codec, wan=wan_spec, repeat=repeat,
                        conns=conns, gloo=gloo), as_json)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
