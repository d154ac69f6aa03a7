"""`peerlearn bench wanround`'s analysis: the hosts' event files (written by
wanround_host.py) read into rounds, each round split into stages, and the
windows of rounds and the bare ring's runs summarised.

The round splits into stages, each ending when the last peer finished it,
so the stages add up to the end-to-end time exactly:

    contributions        first to last hand-over
    submit_to_ready      the daemon re-hashes the state and sends Ready
    ready_to_coordinator the last Ready reaches the coordinator      (1/2 RTT)
    propose              the coordinator decides
    propose_ack          Propose out, every Ack back                  (1 RTT)
    commit               the last participant receives the Commit   (1/2 RTT)
    collective           the ring (link checks, 2(N-1) steps, the hash)
    done_to_coordinator  the last Done reaches the coordinator      (1/2 RTT)
    apply_out            the last participant receives the Apply    (1/2 RTT)
    apply_local          the apply and the new state's hash
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

STAGES = ("contributions", "submit_to_ready", "ready_to_coordinator", "propose", "propose_ack",
          "commit", "collective", "done_to_coordinator", "apply_out", "apply_local")
CONTROL_STAGES = STAGES[:6]
DECISION_STAGES = STAGES[7:]


def read_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # a line still being written
    return out


def complete_rounds(events: list[list[dict]], peers: int) -> list[int]:
    """Round ids every peer took part in (n = peers) and applied, in order."""
    applied: dict[int, set[int]] = {}
    full: set[int] = set()
    for i, evs in enumerate(events):
        for e in evs:
            if e["k"] == "applied":
                applied.setdefault(e["rid"], set()).add(i)
            elif e["k"] == "coll_start" and e["n"] == peers:
                full.add(e["rid"])
    return sorted(r for r, who in applied.items() if r in full and len(who) == peers)


def _first(evs, k: str, **match):
    """The time of the first event of kind k whose fields equal match, or None."""
    return next((e["t"] for e in evs if e["k"] == k and
                 all(e.get(f) == v for f, v in match.items())), None)


def _first_after(evs, t: float, k: str, **match):
    return _first([e for e in evs if e["t"] >= t], k, **match)


def round_stages(events: list[list[dict]], short: dict[str, int], rid: int) -> dict | None:
    """One round's timestamps, stages and collective steps (None if the round
    cannot be placed). The coordinator is the peer that sent its Commit (or
    Propose, or Apply); a message the protocol no longer sends makes its
    stage 0 s and is listed under `absent`, so the stages still add up.
    (Participants also send a Commit back to the coordinator while a round
    runs, rounds.RoundCore.tick: the earliest sender of each kind is taken.)"""
    n = len(events)
    coord = None
    for kind in ("Propose", "Apply", "Commit"):
        sent = [(e["t"], i) for i, evs in enumerate(events) for e in evs
                if e["k"] == "send" and e["m"] == kind and e["rid"] == rid]
        if sent:
            coord = min(sent)[1]
            break
    starts = [e for evs in events for e in evs if e["k"] == "coll_start" and e["rid"] == rid]
    if coord is None or not starts:
        return None
    C, ids = events[coord], {v: k for k, v in short.items()}
    step, first_start = starts[0]["step"], min(e["t"] for e in starts)
    t_prop = _first(C, "send", m="Propose", rid=rid)
    cut = t_prop if t_prop is not None else first_start

    def last_before(evs, kind, t):
        ts = [e["t"] for e in evs if e["k"] == kind and e.get("step") == step and e["t"] <= t]
        return ts[-1] if ts else None

    contrib = [last_before(events[p], "contrib", cut) for p in range(n)]
    ready = [last_before(events[p], "ready", cut) for p in range(n)]
    if None in contrib:
        return None
    t_commit = _first(C, "send", m="Commit", rid=rid)
    t_apply = _first(C, "send", m="Apply", rid=rid)
    per: dict[str, list] = {k: [] for k in (
        "ready_at_c", "ack_at_c", "commit_recv", "coll_start", "ring_start", "ring_end",
        "coll_end", "done", "done_at_c", "apply_recv", "applied")}
    links, tcp, tcp_after, steps, algos = [], [], [], [], set()
    for p, evs in enumerate(events):
        sid, mine = ids[p], [e for e in evs if e.get("rid") == rid]
        local = p == coord
        per["ready_at_c"].append(ready[p] if local or ready[p] is None else
                                 _first_after(C, ready[p], "recv", m="Ready", frm=sid, step=step))
        per["ack_at_c"].append(t_prop if local else _first(C, "recv", m="Ack", frm=sid, rid=rid))
        per["commit_recv"].append(t_commit if local else _first(mine, "recv", m="Commit"))
        per["apply_recv"].append(t_apply if local else _first(mine, "recv", m="Apply"))
        for k in ("coll_start", "ring_start", "ring_end", "coll_end", "done", "applied"):
            per[k].append(_first(mine, k))
        per["done_at_c"].append(per["done"][-1] if local else
                                _first(C, "recv", m="Done", frm=sid, rid=rid))
        cs, rs = per["coll_start"][-1], per["ring_start"][-1]
        if cs is not None and rs is not None:
            links += [e for e in evs if e["k"] in ("link_out", "link_in") and cs <= e["t"] <= rs]
        tcp += [c for e in mine if e["k"] == "tcp" for c in e["conns"]]
        tcp_after += [c for e in mine if e["k"] == "tcp_after" for c in e["conns"]]
        algos |= {e.get("algo", "ring") for e in mine if e["k"] == "ring_start"}
        arr: dict[int, float] = {}
        for e in mine:
            if e["k"] == "srecv":
                arr[e["step"]] = max(arr.get(e["step"], 0.0), e["t"])
        steps.append(arr)
    for k in ("coll_start", "ring_start", "ring_end", "coll_end", "applied"):
        if None in per[k]:
            return None  # a participant missing: not a round of every peer

    def latest(key):
        vs = per[key]
        return None if None in vs else max(vs)

    t0 = min(contrib)
    raw = [max(contrib), None if None in ready else max(ready), latest("ready_at_c"), t_prop,
           latest("ack_at_c") if t_prop is not None else None, latest("commit_recv"),
           max(per["coll_end"]), latest("done_at_c"), latest("apply_recv"), max(per["applied"])]
    marks, absent = [t0], []
    for name, v in zip(STAGES, raw):
        if v is None:
            absent.append(name)
        marks.append(max(marks[-1], v if v is not None else marks[-1]))
    stages = {name: marks[i + 1] - marks[i] for i, name in enumerate(STAGES)}
    n_steps = max((len(a) for a in steps), default=0)
    if not n_steps:
        return None
    keys = sorted({g for a in steps for g in a})
    arrive = [max(a.get(g, 0.0) for a in steps) for g in keys]
    ring = {"algo": sorted(algos),
            "start": max(r - c for r, c in zip(per["ring_start"], per["coll_start"])),
            "steps": [arrive[0] - max(per["ring_start"])] +
                     [arrive[g] - arrive[g - 1] for g in range(1, len(arrive))],
            "finish": max(per["coll_end"]) - arrive[-1],
            "per_peer_ring_s": [e - s for s, e in zip(per["ring_start"], per["ring_end"])],
            "link_setup_max_s": max((e["dt"] for e in links), default=0.0),
            "new_links": sum(bool(e["new"]) for e in links)}
    msgs: dict[str, int] = {}
    for evs in events:
        for e in evs:
            if e["k"] == "send" and t0 <= e["t"] <= marks[-1] and \
                    (e["rid"] == rid or (e["m"] == "Ready" and e["step"] == step)):
                msgs[e["m"]] = msgs.get(e["m"], 0) + 1
    return {"rid": rid, "step": step, "coordinator": coord, "t0": t0,
            "end_to_end_s": marks[-1] - t0, "stages": stages, "absent": absent, "ring": ring,
            "tcp": tcp, "tcp_after": tcp_after, "messages_sent": msgs}


def _stats(xs: list[float]) -> dict:
    xs = sorted(xs)
    if not xs:
        return {}
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1]}


def summarise(rounds: list[dict], rtt_s: float, baseline: dict, events, peers: int,
               window: list[int]) -> dict:
    if not rounds:
        return {"rounds": 0}
    med = lambda xs: statistics.median(xs)  # noqa: E731
    e2e = [r["end_to_end_s"] for r in rounds]
    stages = {s: med([r["stages"][s] for r in rounds]) for s in STAGES}
    n_steps = min(len(r["ring"]["steps"]) for r in rounds)
    steps = [med([r["ring"]["steps"][g] for r in rounds]) for g in range(n_steps)]
    ring = {"algo": sorted({a for r in rounds for a in r["ring"]["algo"]}),
            "start_s": med([r["ring"]["start"] for r in rounds]), "steps_s": steps,
            "finish_s": med([r["ring"]["finish"] for r in rounds]),
            "per_peer_ring_s": med([max(r["ring"]["per_peer_ring_s"]) for r in rounds]),
            "link_setup_max_s": max(r["ring"]["link_setup_max_s"] for r in rounds),
            "new_links_in_window": sum(r["ring"]["new_links"] for r in rounds)}
    tcp = [c for r in rounds for c in r["tcp"]]
    # The daemon's own duration of the collective (PeerStats: the all_reduce
    # histogram), over the window, per peer: its delta sum over delta count.
    own = []
    lo, hi = window[0], window[-1]
    for evs in events:
        ap = [e for e in evs if e["k"] == "applied" and lo <= e["rid"] <= hi]
        before = [e for e in evs if e["k"] == "applied" and e["rid"] < lo]
        if ap and before and ap[-1]["ar_n"] > before[-1]["ar_n"]:
            own.append((ap[-1]["ar_sum"] - before[-1]["ar_sum"]) /
                       (ap[-1]["ar_n"] - before[-1]["ar_n"]))
    m = med(e2e)
    out = {
        "rounds": len(rounds), "round_ids": [rounds[0]["rid"], rounds[-1]["rid"]],
        "rounds_not_complete_in_window": (hi - lo + 1) - len(rounds),
        "coordinators": sorted({r["coordinator"] for r in rounds}),
        "stages_absent": sorted({s for r in rounds for s in r["absent"]}),
        "end_to_end_s": _stats(e2e), "end_to_end_rtts": m / rtt_s,
        "all_end_to_end_s": [round(x, 4) for x in e2e],
        "stages_median_s": stages,
        "stages_median_rtts": {s: v / rtt_s for s, v in stages.items()},
        "phases_median_rtts": {
            "control_before_ring": sum(stages[s] for s in CONTROL_STAGES) / rtt_s,
            "collective": stages["collective"] / rtt_s,
            "decision_after_ring": sum(stages[s] for s in DECISION_STAGES) / rtt_s},
        "ring": ring, "ring_steps_rtts": [s / rtt_s for s in steps],
        "collective_s_daemon_metric": own and statistics.mean(own),
        "messages_sent_per_round": {k: med([r["messages_sent"].get(k, 0) for r in rounds])
                                    for k in sorted({k for r in rounds
                                                     for k in r["messages_sent"]})},
    }
    if tcp:
        out["tcp_at_first_send"] = {
            "connections_sampled": len(tcp), "cc": sorted({c["cc"] for c in tcp}),
            "mss": _stats([c["mss"] for c in tcp]),
            "cwnd_segments": _stats([c["cwnd"] for c in tcp]),
            "cwnd_bytes": _stats([c["cwnd"] * c["mss"] for c in tcp]),
            "idle_ms": _stats([c["idle_ms"] for c in tcp]),
            "rto_ms": _stats([c["rto_us"] / 1e3 for c in tcp]),
            "srtt_ms": _stats([c["rtt_us"] / 1e3 for c in tcp]),
            "peer_rwnd_bytes": _stats([c["snd_wnd"] for c in tcp]),
            "retrans_total": max(c["retrans"] for c in tcp)}
        after = [c for r in rounds for c in r.get("tcp_after", [])]
        if after:  # once step 0's bytes were handed to TCP (a restart after idle shows here)
            out["tcp_at_first_send"]["cwnd_segments_after_step0_send"] = \
                _stats([c["cwnd"] for c in after])
    for name, b in baseline.items():
        if b.get("median_s"):
            out[f"end_to_end_over_ring_{name}"] = m / b["median_s"]
    return out


def ring_runs(events: list[list[dict]], res: list[dict], repeat: int, rtt_s: float) -> dict:
    """The bare ring's runs per mode, from its peers' events and what each printed."""
    out: dict = {"conns": res[0]["conns"], "lanes": res[0]["lanes"]}
    for mode in [m for m in res[0] if m.startswith(("warm", "after_idle"))]:
        # A run: from the last peer's start (barrier exit, or the slot
        # boundary) to the last peer's end; each ring step: when its last
        # lane's transfer arrived at the last peer.
        rids = [e["rid"] for e in events[0] if e["k"] == "run" and e["mode"] == mode]
        runs, per_step, tcp, tcp_after = [], [], [], []
        for rid in rids:
            first = max((e["t0"] for evs in events for e in evs
                         if e["k"] == "run" and e["rid"] == rid), default=None)
            last = max((e["t"] for evs in events for e in evs
                        if e["k"] == "run_end" and e["rid"] == rid), default=None)
            arr: dict[int, float] = {}
            for evs in events:
                for e in evs:
                    if e["k"] == "srecv" and e["rid"] == rid:
                        arr[e["step"]] = max(arr.get(e["step"], 0.0), e["t"])
                    elif e["k"] == "tcp" and e["rid"] == rid:
                        tcp += e["conns"]
                    elif e["k"] == "tcp_after" and e["rid"] == rid:
                        tcp_after += e["conns"]
            if first is None or last is None:
                continue
            runs.append(last - first)
            seq = [arr[g] for g in sorted(arr)]
            if seq:
                per_step.append([seq[0] - first] + [b - a for a, b in zip(seq, seq[1:])])
        k = min((len(s) for s in per_step), default=0)
        steps = [statistics.median(s[g] for s in per_step) for g in range(k)]
        own = [max(r[mode][i] for r in res) for i in range(repeat)]
        out[mode] = {"median_s": statistics.median(runs), "min_s": min(runs),
                     "all_runs_s": [round(x, 4) for x in runs],
                     "slowest_peer_own_clock_median_s": statistics.median(own),
                     "rtts": statistics.median(runs) / rtt_s, "steps_s": steps,
                     "steps_rtts": [s / rtt_s for s in steps]}
        if tcp:
            out[mode]["tcp_at_first_send"] = {
                "cwnd_segments": _stats([c["cwnd"] for c in tcp]),
                "cwnd_bytes": _stats([c["cwnd"] * c["mss"] for c in tcp]),
                "idle_ms": _stats([c["idle_ms"] for c in tcp]),
                "cc": sorted({c["cc"] for c in tcp}),
                "cwnd_segments_after_step0_send": _stats([c["cwnd"] for c in tcp_after])}
    return out
