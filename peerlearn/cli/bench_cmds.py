"""`peerlearn bench ...`: the benchmarks, each printing JSON with its baseline.
The commands only parse options; the measuring is peerlearn.bench's."""

from __future__ import annotations

import json
from typing import Optional

import typer

from peerlearn.cli.shared_options import parse_wan

bench = typer.Typer(no_args_is_help=True, help="Benchmarks; each prints JSON with its baseline.")


def _emit(result: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    for key, value in result.items():
        typer.echo(f"{key}: {json.dumps(value)}")


@bench.command("codec")
def bench_codec(
    numel: int = typer.Option(64 * 2**20, help="Elements of the fp32 test tensor."),
    threads: Optional[int] = typer.Option(None, help="Threads (default: all cores)."),
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
    wan: Optional[str] = typer.Option(
        None, help="RTT_MS,MBIT: also measure over the emulated wide-area path (needs root)."
    ),
    as_json: bool = typer.Option(True, "--json/--no-json", help="Print JSON."),
) -> None:
    """Striped-link throughput per connection count, beside one raw socket."""
    from peerlearn.bench import stream

    counts = [int(c) for c in conns.split(",") if c]
    wan_spec = parse_wan(wan)
    _emit(stream.run(conns=counts, mbytes=mbytes, wan=wan_spec), as_json)


@bench.command("allreduce")
def bench_allreduce(
    peers: int = typer.Option(4, help="Peers, each its own process (and host under --wan)."),
    numel: int = typer.Option(100_000_000, help="Elements of the fp32 tensor."),
    codec: str = typer.Option(
        "none", help="Wire codecs, comma-separated (e.g. none,int8): each timed in the same run."
    ),
    wan: Optional[str] = typer.Option(
        None, help="RTT_MS,MBIT: run over the emulated wide-area path (needs root)."
    ),
    repeat: int = typer.Option(3, help="Timed runs after one warm-up; the best is reported."),
    conns: Optional[int] = typer.Option(
        None, help="Connections per link (default: 2 on loopback, 8 over --wan)."
    ),
    piece_elems: int = typer.Option(
        1 << 22, help="Elements per pipelined piece of a ring segment (1 = one piece per step)."
    ),
    lanes: Optional[int] = typer.Option(
        None, help="Parts all-reduced at once, each over its own connections (default: conns)."),
    gloo: bool = typer.Option(True, "--gloo/--no-gloo", help="Also time torch.distributed gloo."),
    as_json: bool = typer.Option(True, "--json/--no-json", help="Print JSON."),
) -> None:
    """Ring all-reduce time and bus bandwidth beside gloo's, in one run."""
    from peerlearn.bench import allreduce

    wan_spec = parse_wan(wan)
    _emit(allreduce.run(peers=peers, numel=numel, codecs=tuple(codec.split(",")), wan=wan_spec,
                        repeat=repeat, conns=conns, piece_elems=piece_elems, lanes=lanes,
                        gloo=gloo), as_json)


@bench.command("statesize")
def bench_statesize(
    sizes: str = typer.Option(
        "64M,512M,2G", help="State sizes in bytes of fp32 (K, M, G: binary), comma-separated."),
    duration: float = typer.Option(120.0, help="Seconds of steady rounds measured per size."),
    compute_s: float = typer.Option(
        0.5, help="Synthetic compute per round (left out of the round time)."),
    join: bool = typer.Option(True, "--join/--no-join",
                              help="Then time a 4th peer joining the running swarm."),
    mem_floor: float = typer.Option(
        2.0, help="GiB of MemAvailable below which every peer is killed at once."),
    logs: Optional[str] = typer.Option(None, help="Copy every peer's log into this directory."),
    as_json: bool = typer.Option(True, "--json/--no-json", help="Print JSON."),
) -> None:
    """3 synthetic peers per state size: round time beside the ring bound, loop stalls,
    peak RSS, checkpoint and join times."""
    from peerlearn.bench import statesize

    try:
        size_list = statesize.parse_sizes(sizes)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--sizes") from None
    _emit(statesize.run(size_list, duration=duration, compute_s=compute_s, join=join,
                        mem_floor_gib=mem_floor, logs_dir=logs), as_json)


@bench.command("wanround")
def bench_wanround(
    wan: str = typer.Option("100,100", help="RTT_MS,MBIT of the emulated path (needs root)."),
    peers: int = typer.Option(4, help="Peers, each on its own emulated host."),
    numel: int = typer.Option(262_144, help="fp32 elements of the synthetic state (1 MiB)."),
    rounds: int = typer.Option(20, help="Complete rounds measured, after the swarm settled."),
    slot_s: float = typer.Option(2.0, help="Contributions handed over at multiples of this "
                                 "(all peers at once; 0: as soon as each applied)."),
    baseline_repeat: int = typer.Option(10, help="Bare ring runs per mode."),
    no_slow_start_after_idle: bool = typer.Option(
        False, "--no-slow-start-after-idle", help="EXPERIMENT: then measure as many rounds "
        "again with net.ipv4.tcp_slow_start_after_idle=0 in every host."),
    nodelay: bool = typer.Option(False, "--nodelay", help="EXPERIMENT: then as many rounds "
                                 "again with TCP_NODELAY on the data connections."),
    cc: Optional[str] = typer.Option(None, help="EXPERIMENT: congestion control of the data "
                                     "connections (e.g. cubic; default: the machine's)."),
    mtu: int = typer.Option(65000, help="EXPERIMENT: the emulator's MTU."),
    logs: Optional[str] = typer.Option(None, help="Copy every peer's log and events here."),
    as_json: bool = typer.Option(True, "--json/--no-json", help="Print JSON."),
) -> None:
    """A small all-reduce round among synthetic peers over the emulated WAN: end to end in
    seconds and RTTs, where the round trips go, beside the bare ring and the RTT."""
    from peerlearn.bench import wanround

    _emit(wanround.run(peers=peers, numel=numel, wan=parse_wan(wan), rounds=rounds, slot_s=slot_s,
                       baseline_repeat=baseline_repeat, cc=cc, mtu=mtu, logs_dir=logs,
                       no_slow_start_after_idle=no_slow_start_after_idle, nodelay=nodelay),
          as_json)
