"""The training experiments of docs/algorithms.md: every algorithm on the
built-in task with 4 local peers, equal tokens per peer, several seeds.

    python cmd/train_experiments.py run --steps 400 --seeds 0        # all configs
    python cmd/train_experiments.py run --steps 400 --seeds 1,2 --only ddp,diloco-H50,streaming
    python cmd/train_experiments.py report                          # table + PNG plots

Each run is one `peerlearn demo ... --json` (real peer processes, loopback,
bytes counted on the wire by the transport). Results are appended to
docs/experiments/results.jsonl, one line per (config, seed, steps); a config
already there is skipped, so an interrupted sweep resumes. `report` needs
matplotlib (`pip install matplotlib`, the `experiments` extra), which the
runtime never imports.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "docs" / "experiments"

# name -> (peers, demo arguments)
CONFIGS: dict[str, tuple[int, list[str]]] = {
    "single": (1, ["--algo", "local"]),
    "ddp": (4, ["--algo", "ddp"]),
    "diloco-H10": (4, ["--algo", "diloco", "--H", "10"]),
    "diloco-H50": (4, ["--algo", "diloco", "--H", "50"]),
    "diloco-H200": (4, ["--algo", "diloco", "--H", "200"]),
    # Streaming needs H % P == 0: H = 48 against DiLoCo at the same H.
    "diloco-H48": (4, ["--algo", "diloco", "--H", "48"]),
    "streaming": (4, ["--algo", "streaming", "--H", "48", "--P", "4", "--tau", "1",
                      "--codec", "e3m0"]),
    "async": (4, ["--algo", "async", "--H", "50"]),
    "eager": (4, ["--algo", "eager", "--H", "50"]),
    # Outer-optimizer probes (the paper tuned 0.7/0.9 for 150M models after 24k
    # pretraining steps; a tiny model from scratch may want less).
    "diloco-H50-lr0.3": (4, ["--algo", "diloco", "--H", "50", "--outer-lr", "0.3"]),
    "fedavg-H50": (4, ["--algo", "diloco", "--H", "50", "--outer-lr", "1.0",
                       "--momentum", "0"]),
}

# The DiLoCo paper's protocol: every run starts from one pretrained model
# (24k steps there; WARM_STEPS single-replica steps here), then each method
# trains the same number of tokens from it. "-warm" configs do that, with the
# outer lr the grid below chose on seed 0 (1.0; the paper's 0.7 is a grid row).
WARM_STEPS = 1000
WARM_OUTER = ["--outer-lr", "1.0"]
for name in ("single", "ddp", "diloco-H10", "diloco-H50", "diloco-H200", "diloco-H48",
             "streaming", "async", "eager", "fedavg-H50"):
    peers, extra = CONFIGS[name]
    outer = WARM_OUTER if name.startswith(("diloco", "streaming", "async", "eager")) else []
    CONFIGS[f"{name}-warm"] = (peers, [*extra, *outer])
for lr, mu in ((0.7, 0.9), (0.5, 0.9), (0.7, 0.8), (1.0, 0.8), (0.7, 0.95)):
    CONFIGS[f"diloco-H50-lr{lr}-m{mu}-warm"] = (
        4, ["--algo", "diloco", "--H", "50", "--outer-lr", str(lr), "--momentum", str(mu)])
# Streaming probes from the warm start: fp32 (no quantization) separates the
# 4-bit codec's share of the gap from the schedule's; the paper's outer lr.
CONFIGS["streaming-alpha0.5-fp32-warm"] = (4, ["--algo", "streaming", "--H", "48", "--P", "4",
                                      "--tau", "1", *WARM_OUTER])
CONFIGS["streaming-alpha0.5-lr0.7-warm"] = (4, ["--algo", "streaming", "--H", "48", "--P", "4",
                                       "--tau", "1", "--codec", "e3m0"])
# The headline warm streaming row mixes with alpha 0 (the grid's choice: the
# paper's 0.5 ends 3-4 % above DiLoCo from the warm start); 0.5 stays a row.
CONFIGS["streaming-alpha0.5-warm"] = CONFIGS["streaming-warm"]
CONFIGS["streaming-warm"] = (4, [*CONFIGS["streaming-warm"][1], "--alpha", "0"])

def noloco(H: int, *, lr: float | None = None, m: float | None = None,
           g: float | None = None, nesterov: bool = False, group: int | None = None,
           merge: bool = False) -> tuple[int, list[str]]:
    """A 4-peer NoLoCo config; what is not given is the CLI's default (the
    authors' code: heavy-ball 0.5, lr 0.7, gamma 0.7, pairs)."""
    argv = ["--algo", "noloco", "--H", str(H)]
    for flag, value in (("--outer-lr", lr), ("--noloco-momentum", m), ("--gamma", g),
                        ("--group", group)):
        if value is not None:
            argv += [flag, str(value)]
    argv += ["--noloco-nesterov"] * nesterov + ["--merge-at", "end"] * merge
    return 4, argv


# Decentralized training (issue 9): no global collective except the optional
# single final merge. NoLoCo from the warm start against diloco-H50-warm, and
# from scratch against diloco-H50; gossip from independent initialisations
# (each peer permutes every tensor, seeded by its rank), with and without
# variance correction, with and without one merge at the end.
CONFIGS.update({
    "noloco-H50": (4, ["--algo", "noloco", "--H", "50"]),
    "noloco-H50-warm": noloco(50),
    # NoLoCo's outer step from the warm start, as DiLoCo's was probed (seed 0):
    # momentum 0.9 (heavy-ball), an lr grid with no momentum, and everyone in
    # one group (heavy-ball DiLoCo, the identity): heavy-ball fell short of
    # Nesterov DiLoCo even with everyone, so then Nesterov NoLoCo (the paper's
    # name for alpha) over momentum, gamma and H (the sheet's E4: NoLoCo at
    # half DiLoCo's H). The chosen row then ran seeds 1 and 2.
    "noloco-H50-lr1.0-m0.9-warm": noloco(50, lr=1.0, m=0.9, g=1.0),
    "noloco-H50-m0.9-warm": noloco(50, m=0.9),
    "noloco-H50-merge-warm": noloco(50, merge=True),
    "noloco-H25-warm": noloco(25),
    "noloco-H50-a0-b2-g1-warm": noloco(50, lr=2.0, m=0, g=1.0),
    "noloco-H50-a0-b3-g1-warm": noloco(50, lr=3.0, m=0, g=1.0),
    "noloco-H50-a0.5-b1.5-g1-warm": noloco(50, lr=1.5, m=0.5, g=1.0),
    "noloco-H50-a0.9-b1.0-g0.1-warm": noloco(50, lr=1.0, m=0.9, g=0.1),
    "noloco-H50-a0.9-b0.7-g0.1-warm": noloco(50, lr=0.7, m=0.9, g=0.1),
    "noloco-H50-a0.9-b1.0-group4-warm": noloco(50, lr=1.0, m=0.9, group=4),
    "noloco-H50-nest-a0.9-b1.0-g0.5-warm": noloco(50, lr=1.0, m=0.9, g=0.5, nesterov=True),
    "noloco-H50-nest-a0.8-b1.0-g0.5-warm": noloco(50, lr=1.0, m=0.8, g=0.5, nesterov=True),
    "noloco-H50-nest-a0.5-b1.0-g0.7-warm": noloco(50, lr=1.0, m=0.5, g=0.7, nesterov=True),
    "noloco-H50-nest-a0.8-b1.0-g0.3-warm": noloco(50, lr=1.0, m=0.8, g=0.3, nesterov=True),
    "noloco-H50-nest-a0.8-b1.0-g0.7-warm": noloco(50, lr=1.0, m=0.8, g=0.7, nesterov=True),
    "noloco-H25-nest-a0.8-b1.0-g0.5-warm": noloco(25, lr=1.0, m=0.8, g=0.5, nesterov=True),
    "noloco-H50-nest-a0.8-b1.0-g0.5-merge-warm": noloco(50, lr=1.0, m=0.8, g=0.5,
                                                        nesterov=True, merge=True),
    "noloco-H25-nest-a0.8-b1.0-g0.5-merge-warm": noloco(25, lr=1.0, m=0.8, g=0.5,
                                                        nesterov=True, merge=True),
    # DiLoCo at NoLoCo's H, so the two compare at equal outer steps as well.
    "diloco-H25-warm": (4, ["--algo", "diloco", "--H", "25", *WARM_OUTER]),
    "gossip-indep": (4, ["--algo", "gossip", "--H", "50", "--independent-init"]),
    "gossip-vc-indep": (4, ["--algo", "gossip-vc", "--H", "50", "--independent-init"]),
    "gossip-indep-merge": (4, ["--algo", "gossip", "--H", "50", "--independent-init",
                               "--merge-at", "end"]),
    "gossip-vc-indep-merge": (4, ["--algo", "gossip-vc", "--H", "50", "--independent-init",
                                  "--merge-at", "end"]),
})


def pretrain(seed: int, steps: int) -> Path:
    """One replica trained `steps` steps on the whole corpus, saved as a
    state_dict: the warm start of the "-warm" configs (a plain PyTorch loop
    over the task interface). Deterministic, cached by (seed, steps)."""
    import torch

    from peerlearn.tasks import bytelm

    path = OUT / "warm" / f"bytelm-seed{seed}-{steps}.pt"
    if path.exists():
        return path
    torch.set_num_threads(2)
    task = bytelm.task(seed=seed)
    opt = task.inner_optimizer(task.model.parameters())
    sched = task.schedule(opt, steps)
    # Another data order than the runs' shards (seed + 1000): the same corpus,
    # as a pretraining and a fine-tuning phase of one run would see it.
    batches = task.batches(0, 1, seed + 1000)
    t0 = time.monotonic()
    for step in range(1, steps + 1):
        loss = task.loss(task.model, next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            print(f"pretrain seed {seed}: step {step} loss {loss.item():.4f} "
                  f"{time.monotonic() - t0:.0f} s", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(task.model.state_dict(), tmp)
    tmp.replace(path)
    return path


def done_keys(path: Path) -> set[tuple[str, int, int]]:
    if not path.exists():
        return set()
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["config"], r["seed"], r["steps"]) for r in rows}


def run(args) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    results = OUT / "results.jsonl"
    names = args.only.split(",") if args.only else list(CONFIGS)
    for seed in (int(s) for s in args.seeds.split(",")):
        for name in names:
            if (name, seed, args.steps) in done_keys(results):
                continue
            peers, extra = CONFIGS[name]
            if name.endswith("-warm"):
                extra = [*extra, "--set", f"init={pretrain(seed, WARM_STEPS)}"]
            # The driver makes its own warm start and its own single-peer rows:
            # the demo's warm-up and reference (its defaults since issue 15) are off.
            argv = [sys.executable, "-m", "peerlearn.cli.app", "demo", "--peers", str(peers),
                    "--steps", str(args.steps), "--seed", str(seed), "--progress-every", "10",
                    "--warmup", "0", "--no-reference", "--json", *extra]
            t0 = time.monotonic()
            out = subprocess.run(argv, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{name} seed {seed}: exit {out.returncode}\n{out.stderr[-3000:]}",
                      file=sys.stderr)
                continue
            summary = json.loads(out.stdout)
            reports = summary.pop("peers_report")
            if summary["val_loss"] is None or any(r.get("error") for r in reports):
                log = OUT / f"failed-{name}-{seed}.log"
                log.write_text(out.stderr)
                print(f"{name} seed {seed}: a peer failed ({log}): {reports}", file=sys.stderr)
                continue
            row = {"config": name, "seed": seed, "steps": args.steps, "argv": argv[3:],
                   **summary,
                   "curve": reports[0].get("curve", []),
                   "algorithm": [r.get("algorithm", {}) for r in reports],
                   "hash_mismatches": hash_mismatches(reports)}
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{name} seed {seed}: val {summary['val_loss']:.4f} "
                  f"sent/peer {max(b or 0 for b in summary['bytes_sent_per_peer']) / 1e6:.1f} MB "
                  f"{time.monotonic() - t0:.0f} s", flush=True)


def hash_mismatches(reports: list[dict]) -> int:
    """Shared steps at which two peers held different agreed states (must be 0)."""
    seen: dict[str, set[str]] = {}
    for r in reports:
        for step, h in r.get("state_hashes", {}).items():
            seen.setdefault(step, set()).add(h)
    return sum(1 for hs in seen.values() if len(hs) > 1)


def val_loss(row: dict) -> float:
    """The run's validation loss: of the agreed parameters (all peers equal),
    or for a gossip run without a merge, where each peer holds its own model,
    the mean over peers (the summary's `val_loss` is their maximum)."""
    per_peer = [v for v in row.get("val_loss_per_peer", []) if v is not None]
    return statistics.mean(per_peer) if per_peer else row["val_loss"]


def report(args) -> None:
    """One table and two plots per regime: from scratch, and from the warm start."""
    import matplotlib

    matplotlib.use("Agg")

    rows = [json.loads(line) for line in (OUT / "results.jsonl").read_text().splitlines()
            if line.strip()]
    rows = [r for r in rows if r["steps"] == args.steps]
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["config"], []).append(r)
    for suffix in ("", "-warm"):
        names = [n for n in CONFIGS if n.endswith("-warm") == bool(suffix) and n in by]
        if names:
            regime_report(args.steps, suffix, names, by)
    decentral_report(args.steps, by)


# The decentralized rows beside their references (issue 9), one plot: from
# scratch (gossip from independent inits, with and without a final merge) and
# from the warm start (NoLoCo as the authors' code has it, with Nesterov
# momentum, and heavy-ball DiLoCo = NoLoCo with everyone in one group).
DECENTRAL = {
    "": ["ddp", "diloco-H50", "noloco-H50", "gossip-indep", "gossip-vc-indep",
         "gossip-indep-merge", "gossip-vc-indep-merge", "single"],
    "-warm": ["ddp-warm", "diloco-H50-warm", "diloco-H25-warm",
              "noloco-H25-nest-a0.8-b1.0-g0.5-warm",
              "noloco-H25-nest-a0.8-b1.0-g0.5-merge-warm", "noloco-H50-nest-a0.8-b1.0-g0.5-warm",
              "noloco-H25-warm", "noloco-H50-warm", "noloco-H50-a0.9-b1.0-group4-warm",
              "single-warm"],
}

# The plots (issue 15: ~30 lines under one legend could not be read). One
# panel per family, a handful of rows each, DDP and one peer drawn in every
# panel as the references, legends outside the axes. A config has one colour
# in every plot and both regimes (keyed by its name without "-warm"); a run
# with a final merge has its run's colour (hatched bars, hollow markers).
# Rows in no panel (most of the seed-0 NoLoCo grid) are in the tables only.
COLOURS = {
    "ddp": "black", "single": "tab:gray",
    "diloco-H50": "tab:blue", "streaming": "tab:orange", "noloco-H50": "tab:green",
    "noloco-H25-nest-a0.8-b1.0-g0.5": "tab:purple",
    "diloco-H10": "tab:red", "diloco-H25": "tab:cyan", "diloco-H48": "tab:brown",
    "diloco-H200": "tab:olive",
    "diloco-H50-lr0.3": "tab:pink", "fedavg-H50": "goldenrod",
    "diloco-H50-lr0.7-m0.9": "teal", "diloco-H50-lr0.5-m0.9": "slateblue",
    "diloco-H50-lr0.7-m0.8": "crimson", "diloco-H50-lr1.0-m0.8": "sienna",
    "streaming-alpha0.5": "darkmagenta", "streaming-alpha0.5-fp32": "navy",
    "streaming-alpha0.5-lr0.7": "yellowgreen",
    "async": "deeppink", "eager": "olivedrab",
    "gossip-indep": "salmon", "gossip-vc-indep": "indigo",
    "noloco-H50-nest-a0.8-b1.0-g0.5": "hotpink", "noloco-H25": "peru",
    "noloco-H50-a0.9-b1.0-group4": "darkkhaki",
}
REFERENCES = ("ddp", "single")
# (title, rows without "-warm"; rows absent from a regime are skipped). A row
# "X-merge" is drawn in the loss-vs-bytes panels only: until its one merge at
# the end it is the run X (the same training curve, within timing noise).
PANELS: dict[str, list[tuple[str, list[str]]]] = {
    "": [
        ("headline rows", ["diloco-H50", "streaming", "noloco-H50"]),
        ("DiLoCo: sync interval H", ["diloco-H10", "diloco-H48", "diloco-H50", "diloco-H200"]),
        ("DiLoCo H = 50: outer lr and momentum", ["diloco-H50", "diloco-H50-lr0.3", "fedavg-H50"]),
        ("Streaming DiLoCo (H = 48) against DiLoCo", ["diloco-H48", "streaming"]),
        ("async / eager (H = 50; own y scale)", ["diloco-H50", "eager", "async"]),
        ("decentralized (no global collective)",
         ["diloco-H50", "noloco-H50", "gossip-indep", "gossip-indep-merge",
          "gossip-vc-indep", "gossip-vc-indep-merge"]),
    ],
    "-warm": [
        ("headline rows", ["diloco-H50", "streaming", "noloco-H25-nest-a0.8-b1.0-g0.5"]),
        ("DiLoCo: sync interval H",
         ["diloco-H10", "diloco-H25", "diloco-H48", "diloco-H50", "diloco-H200"]),
        ("DiLoCo H = 50: outer lr and momentum",
         ["diloco-H50", "diloco-H50-lr1.0-m0.8", "diloco-H50-lr0.7-m0.9",
          "diloco-H50-lr0.7-m0.8", "diloco-H50-lr0.5-m0.9", "fedavg-H50"]),
        ("Streaming DiLoCo (H = 48) against DiLoCo",
         ["diloco-H48", "streaming", "streaming-alpha0.5", "streaming-alpha0.5-fp32",
          "streaming-alpha0.5-lr0.7"]),
        ("async / eager (H = 50; own y scale)", ["diloco-H50", "eager", "async"]),
        ("decentralized (no global collective)",
         ["diloco-H25", "noloco-H25-nest-a0.8-b1.0-g0.5",
          "noloco-H25-nest-a0.8-b1.0-g0.5-merge", "noloco-H50-nest-a0.8-b1.0-g0.5",
          "noloco-H25", "noloco-H50"]),
    ],
}
# Docs show these PNGs at most ~900 px wide: figures are 11 in at 100 dpi
# (1100 px) with 10-11 pt text, so text stays >= 10 px when scaled down.
WIDTH, DPI = 11.0, 100


def base(name: str) -> str:
    return name.removesuffix("-warm")


def colour(name: str) -> str:
    return COLOURS.get(base(name).removesuffix("-merge"), "0.6")


def is_merge(name: str) -> bool:
    return base(name).endswith("-merge")


def label(name: str, width: int = 24) -> str:
    """The config's name without "-warm", broken at a hyphen to fit a legend."""
    out, line = [], ""
    for part in base(name).split("-"):
        if line and len(line) + 1 + len(part) > width:
            out.append(line + "-")
            line = part
        else:
            line = f"{line}-{part}" if line else part
    return "\n".join([*out, line])


def final(rows: list[dict]) -> tuple[float, float, float]:
    """Mean and sd over seeds of the final validation loss, mean MB sent per peer."""
    losses = [val_loss(r) for r in rows]
    mb = statistics.mean(max(b or 0 for b in r["bytes_sent_per_peer"]) for r in rows) / 1e6
    return (statistics.mean(losses), statistics.stdev(losses) if len(losses) > 1 else 0.0, mb)


def panels(suffix: str, by: dict[str, list[dict]]) -> list[tuple[str, list[str]]]:
    out = []
    for title, rows in PANELS[suffix]:
        names = [n + suffix for n in rows if n + suffix in by]
        if names:
            out.append((title, names))
    return out


def panel_grid(n: int, title: str):
    import matplotlib.pyplot as plt

    rows = (n + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(WIDTH, 0.6 + 3.15 * rows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=13)
    return fig, list(axes.flat[:n])


def ref_legend(fig, handles: list) -> None:
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=10.5,
               frameon=False, columnspacing=1.5)


def decentral_report(steps: int, by: dict[str, list[dict]]) -> None:
    """Bars of the final validation loss (mean ± sd over seeds, the seed count
    and MB sent per peer written on each) for the DECENTRAL rows."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(WIDTH, 8.6), layout="constrained",
                             height_ratios=[len(v) for v in DECENTRAL.values()])
    for ax, names, title in zip(axes, DECENTRAL.values(),
                                ("from scratch", "from the warm start")):
        names = [n for n in names if n in by]
        stats = [final(by[n]) for n in names]
        means = [m for m, _, _ in stats]
        sds = [sd for _, sd, _ in stats]
        ax.barh(range(len(names)), means, xerr=[sd or float("nan") for sd in sds],
                color=[colour(n) for n in names], alpha=0.8,
                hatch=["//" if is_merge(n) else "" for n in names], edgecolor="white",
                error_kw={"ecolor": "black", "lw": 1.2, "capsize": 3})
        for i, n in enumerate(names):
            mean, sd, mb = stats[i]
            ax.text(mean + sd, i, f"  {mean:.3f} ({len(by[n])} seed{'s' * (len(by[n]) > 1)}, "
                    f"{mb:.0f} MB)", va="center", fontsize=10)
        ax.set_yticks(range(len(names)), [base(n) for n in names], fontsize=10.5)
        ax.invert_yaxis()
        if means:
            ax.set_xlim(min(means) * 0.95, max(means) * 1.12)
        ax.set_xlabel("final validation loss (nats/byte)", fontsize=10.5)
        ax.set_title(f"{title}, 4 peers x {steps} steps", fontsize=12)
        ax.tick_params(axis="x", labelsize=10)
        ax.grid(alpha=0.3, axis="x")
    fig.savefig(OUT / f"decentral-{steps}.png", dpi=DPI)
    plt.close(fig)


def regime_report(steps: int, suffix: str, names: list[str], by: dict[str, list[dict]]) -> None:
    ref = by.get("ddp" + suffix)
    ref_loss = statistics.mean(val_loss(r) for r in ref) if ref else None
    lines = ["| config | seeds | val loss (mean ± sd) | vs DDP | MB sent / peer | "
             "peak MB / sync | wall s | compute util. | parity |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        rs = by[name]
        losses = [val_loss(r) for r in rs]
        sd = statistics.stdev(losses) if len(losses) > 1 else 0.0
        sent = statistics.mean(max(b or 0 for b in r["bytes_sent_per_peer"]) for r in rs) / 1e6
        syncs = statistics.mean(max(a.get("outer_steps", a.get("ddp_steps", 0)) or 1
                                    for a in r["algorithm"]) for r in rs)
        util = statistics.mean(statistics.mean(u for u in r["compute_utilisation_per_peer"]
                                               if u is not None) for r in rs)
        wall = statistics.mean(r["wall_s"] for r in rs)
        rel = f"{(statistics.mean(losses) / ref_loss - 1) * 100:+.1f} %" if ref_loss else "-"
        parity = "ok" if all(r["hash_mismatches"] == 0 for r in rs) else "MISMATCH"
        lines.append(f"| {name} | {len(rs)} | {statistics.mean(losses):.4f} ± {sd:.4f} | {rel} | "
                     f"{sent:.1f} | {sent / syncs if sent else 0:.2f} | {wall:.0f} | "
                     f"{util:.2f} | {parity} |")
    table = "\n".join(lines)
    (OUT / f"table-{steps}{suffix}.md").write_text(table + "\n")
    print(table)

    curves_plot(steps, suffix, by)
    bytes_plot(steps, suffix, by)


def curves_plot(steps: int, suffix: str, by: dict[str, list[dict]]) -> None:
    """Training loss of peer 0, seed 0: one panel per family, DDP and one peer
    in every panel."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    def curve(name: str) -> tuple[list[int], list[float]] | None:
        rs = [r for r in by.get(name, []) if r["seed"] == 0 and r["curve"]]
        return tuple(map(list, zip(*rs[0]["curve"]))) if rs else None

    groups = [(t, [n for n in names if not is_merge(n)]) for t, names in panels(suffix, by)]
    refs = [n + suffix for n in REFERENCES if curve(n + suffix)]
    # One y range for every panel (the first 50 steps' descent and the async
    # rows' spikes are cut off), so panels compare; async/eager get their own.
    late = [v for n in {*refs, *(n for _, ns in groups for n in ns)} - {
        f"async{suffix}", f"eager{suffix}"} if curve(n) for x, v in zip(*curve(n)) if x >= 50]
    lo, hi = min(late), max(late)
    pad = (hi - lo) * 0.05
    regime = "from scratch" if not suffix else "from the warm start"
    fig, axes = panel_grid(len(groups), f"Training loss, {regime} (4 peers x {steps} steps, "
                                        f"peer 0, seed 0)")
    for ax, (title, names) in zip(axes, groups):
        for ref, style in zip(REFERENCES, ("-", "--")):
            if curve(ref + suffix):
                ax.plot(*curve(ref + suffix), color=colour(ref), ls=style, lw=1.3, alpha=0.85)
        for n in names:
            if curve(n):
                ax.plot(*curve(n), color=colour(n), lw=1.8, label=label(n))
        bottom, top = lo - pad, hi + pad
        if {f"async{suffix}", f"eager{suffix}"} & set(names):
            top = max(v for n in names if curve(n) for x, v in zip(*curve(n)) if x >= 50)
            bottom, top = lo - (top - lo) * 0.04, top + (top - lo) * 0.04
        ax.set_ylim(bottom, top)
        ax.set_xlim(0, steps)
        ax.set_title(title, fontsize=11.5)
        ax.tick_params(labelsize=10)
        ax.grid(alpha=0.3)
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=10, frameon=False,
                  handlelength=1.5)
    for ax in axes[-2:]:
        ax.set_xlabel("inner step (equal tokens per peer)", fontsize=10.5)
    for ax in axes[::2]:
        ax.set_ylabel("loss (nats/byte)", fontsize=10.5)
    ref_legend(fig, [Line2D([], [], color=colour("ddp"), lw=1.3, label="ddp"),
                     Line2D([], [], color=colour("single"), lw=1.3, ls="--",
                            label="single (one peer)"),
                     Line2D([], [], lw=0, label="in every panel; 10-step means")])
    fig.savefig(OUT / f"curves-{steps}{suffix}.png", dpi=DPI)
    plt.close(fig)


def bytes_plot(steps: int, suffix: str, by: dict[str, list[dict]]) -> None:
    """Final validation loss (mean ± sd over seeds) against MB sent per peer:
    one panel per family, every other row a grey dot, DDP in every panel and
    one peer as a dashed line."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    groups = panels(suffix, by)
    ddp, single = "ddp" + suffix, "single" + suffix
    stats = {n: final(rs) for n, rs in by.items() if n.endswith("-warm") == bool(suffix)}
    others = [n for n in stats if n != single]
    xs = [stats[n][2] for n in others]
    # One y range (async/eager, far above, get their own panel's range).
    shown = {ddp, single, *(n for _, ns in groups for n in ns)} - {
        f"async{suffix}", f"eager{suffix}"}
    ys = [stats[n][0] + s * stats[n][1] for n in shown if n in stats for s in (-1, 1)]
    lo, hi = min(ys), max(ys)
    pad = (hi - lo) * 0.08
    regime = "from scratch" if not suffix else "from the warm start"
    fig, axes = panel_grid(len(groups), f"Final validation loss against bytes, {regime} "
                                        f"(4 peers x {steps} steps, mean ± sd over seeds)")
    for ax, (title, names) in zip(axes, groups):
        ax.scatter(xs, [stats[n][0] for n in others], s=14, color="0.8", zorder=1)
        if single in stats:
            ax.axhline(stats[single][0], color=colour("single"), ls="--", lw=1.2)
        members = ([ddp] if ddp in stats else []) + names
        for n in members:
            mean, sd, mb = stats[n]
            c = colour(n)
            # Rows sending the same bytes (the H = 50 outer-optimizer grid)
            # side by side rather than on top of each other.
            same = [m for m in members if abs(stats[m][2] / mb - 1) < 0.05]
            mb *= 1.15 ** (same.index(n) - (len(same) - 1) / 2)
            ax.errorbar(mb, mean, yerr=sd or None, fmt="o", ms=7, color=c, capsize=3, zorder=3,
                        mfc="white" if is_merge(n) else c, mew=1.8,
                        label=None if n == ddp else label(n) + f" ({len(by[n])})")
        bottom, top = lo - pad, hi + pad
        if {f"async{suffix}", f"eager{suffix}"} & set(names):
            top = max(stats[n][0] for n in names)
            bottom, top = lo - (top - lo) * 0.06, top + (top - lo) * 0.06
        ax.set_ylim(bottom, top)
        ax.set_xscale("log")
        ax.set_xlim(min(xs) / 1.6, max(xs) * 1.6)
        ax.set_title(title, fontsize=11.5)
        ax.tick_params(labelsize=10)
        ax.grid(alpha=0.3)
        ax.grid(alpha=0.12, which="minor")
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=10, frameon=False,
                  handletextpad=0.3)
    for ax in axes[-2:]:
        ax.set_xlabel("MB sent per peer (on the wire)", fontsize=10.5)
    for ax in axes[::2]:
        ax.set_ylabel("val loss (nats/byte)", fontsize=10.5)
    ref_legend(fig, [Line2D([], [], color=colour("ddp"), marker="o", lw=0, label="ddp"),
                     Line2D([], [], color=colour("single"), ls="--", label="single (one peer)"),
                     Line2D([], [], color="0.8", marker="o", lw=0, label="other rows"),
                     Line2D([], [], color="0.3", marker="o", lw=0, mfc="white",
                            label="final merge"),
                     Line2D([], [], lw=0, label="(n): seeds; equal bytes spread sideways")])
    fig.savefig(OUT / f"loss-vs-bytes-{steps}{suffix}.png", dpi=DPI)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--steps", type=int, default=400)
    r.add_argument("--seeds", default="0,1,2")
    r.add_argument("--only", default="", help="comma-separated config names")
    r.set_defaults(func=run)
    t = sub.add_parser("report")
    t.add_argument("--steps", type=int, default=400)
    t.set_defaults(func=report)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
