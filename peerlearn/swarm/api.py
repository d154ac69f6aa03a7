"""The Python API: a peer the caller drives.

    with Peer(PeerConfig(data_dir, secret, join="host:port"), initial_state=make) as peer:
        peer.sync_state()                       # a joiner fetches the swarm's state
        while training:
            delta = compute_pseudo_gradient(peer.state)
            mean = peer.all_reduce(delta, apply=outer_step)   # one agreed round
            pending = peer.all_reduce_async(fragment)         # computes on meanwhile
            ...
            avg = peer.gossip(params, round_=k, seed=run_seed)  # no barrier

The peer daemon (membership, rounds, parity, checkpoints) runs on an event
loop in a background thread; every method here is a thread-safe call into it
and every failure is a peerlearn.swarm.errors exception.

Ownership: tensors passed in are only read, and only until the call returns.
`apply` callbacks run on the daemon's state thread (swarm/keeper.py, the one
thread that reads and writes the shared state's bytes), between rounds, with
the shared state that the daemon owns: they may mutate it (that is their job) but must be
deterministic, since every peer runs them on identical inputs and the swarm
then compares hashes. `Peer.state` is the live object: read it only between
your own calls, never concurrently with one.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import torch

from peerlearn.state.shared import SharedState
from peerlearn.swarm import gossip as g
from peerlearn.swarm.errors import (
    CollectiveTimeout,
    GossipFailed,
    PeerClosed,
    PeerError,
    PeerStartError,
    StateReplaced,
)
from peerlearn.swarm.config import PeerConfig, Submission
from peerlearn.swarm.peer import PeerDaemon

Tensors = torch.Tensor | Mapping[str, torch.Tensor]


def flatten(tensors: Tensors, donate: bool = False
            ) -> tuple[torch.Tensor, Callable[[torch.Tensor], Tensors]]:
    """One flat fp32 copy of tensors, and how to cut a flat result back into
    the same names, shapes and dtypes.

    donate: the caller gives the tensors up (never reads or writes them
    again: a round may write its result there). Then
    fp32 CPU tensors that already lie back to back in one buffer, in sorted
    name order, are taken as that buffer, without a copy (at GB sizes the
    copy is one state's worth of memory per round).
    """
    single = isinstance(tensors, torch.Tensor)
    items = [("", tensors)] if single else sorted(tensors.items())
    flat = _tiled(items) if donate else None
    if flat is None:
        flat = torch.cat([t.detach().reshape(-1).to("cpu", torch.float32)
                          for _, t in items]) if items else torch.empty(0)

    # Only the layout is kept: a closure over the tensors themselves kept the
    # caller's originals alive until the contribution settled (a second copy
    # of it, for a caller of all_reduce_async that let its own go).
    layout = [(name, t.shape, t.dtype, t.numel()) for name, t in items]

    def unflatten(res: torch.Tensor) -> Tensors:
        out, at = {}, 0
        for name, shape, dtype, numel in layout:
            out[name] = res[at:at + numel].view(shape).to(dtype)
            at += numel
        return out[""] if single else out

    return flat.contiguous(), unflatten


def _tiled(items: list[tuple[str, torch.Tensor]]) -> torch.Tensor | None:
    """The one flat fp32 CPU buffer items' tensors tile in order, or None."""
    if not items:
        return None
    first = items[0][1]
    at = first.data_ptr()
    for _, t in items:
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() or \
                t.data_ptr() != at or \
                t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
            return None
        at += t.numel() * 4
    total = (at - first.data_ptr()) // 4
    return first.detach().as_strided((total,), (1,), first.storage_offset())


class Peer:
    def __init__(self, config: PeerConfig,
                 initial_state: SharedState | Callable[[], SharedState] | None = None):
        """initial_state: what a founder starts from when it has no checkpoint
        (a joiner's state always comes from the swarm)."""
        self.cfg = config
        self._initial = initial_state if callable(initial_state) or initial_state is None \
            else (lambda: initial_state)
        self.daemon: PeerDaemon | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._interrupted = threading.Event()
        self.failure: BaseException | None = None  # what ended the daemon, if not close()
        self._gossip_lock = threading.Lock()
        # Partners' headers read ahead of our round (gossip.exchange's
        # `heard`); only touched under _gossip_lock.
        self._gossip_heard: dict = {}

    # ------------------------------------------------------------ lifecycle

    def start(self, timeout: float | None = None,
              cancel: threading.Event | None = None) -> Peer:
        """Starts the daemon; founds a swarm, or joins config.join. Raises
        PeerStartError (JoinTimeout when no member answered within
        config.join_timeout, or within timeout if given); PeerClosed if
        `cancel` is set meanwhile (a signal handler's stop event)."""
        started = threading.Event()
        failure: list[BaseException] = []

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                self.daemon = PeerDaemon(self.cfg, self._initial)
            except Exception as e:  # noqa: BLE001 - reported to the caller of start()
                failure.append(e)
                return
            finally:
                started.set()
            try:
                await self.daemon.run(self._stop)
            except Exception as e:  # noqa: BLE001 - kept for the caller: one exception tree
                self.failure = e  # start() raises it; a running caller reads it

        def run() -> None:
            try:
                import uvloop

                uvloop.run(main())
            except ImportError:
                asyncio.run(main())

        self._thread = threading.Thread(target=run, name="peerlearn-peer", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            self._closed = True
            raise PeerStartError(f"peer failed to start: {failure[0]}") from failure[0]
        try:
            self._wait(lambda: bool(self.daemon.core.members) or
                       (cancel is not None and cancel.is_set()), timeout, "joining the swarm")
        except (CollectiveTimeout, PeerClosed) as e:
            self.close()
            if isinstance(self.failure, PeerStartError):
                raise self.failure from None
            raise PeerStartError(str(e)) from e
        if not self.daemon.core.members:  # cancelled
            self.close()
            raise PeerClosed("start was cancelled")
        return self

    def close(self) -> None:
        """Leaves the swarm (peers see it at once), writes a final checkpoint, stops.
        A pending all_reduce raises PeerClosed."""
        if self._closed:
            return
        self._closed = True
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:
                pass  # the loop already ended
        if self._thread is not None:
            self._thread.join(60)

    def __enter__(self) -> Peer:
        return self if self.daemon is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ queries

    @property
    def id(self) -> str:
        return self._daemon().id

    @property
    def control_address(self) -> str:
        return self._daemon().info.control

    @property
    def state(self) -> SharedState | None:
        return self._daemon().state

    @property
    def step(self) -> int:
        st = self._daemon().state
        return st.step if st is not None else -1

    def state_fingerprint(self) -> tuple[int, str] | None:
        """(step, state hash in hex) of the shared state this peer holds, read
        on the loop so the two belong together; None before it holds one.
        Peers at the same step must show the same hash (bit parity)."""
        def read():
            core = self.daemon.core
            return (core.step, core.state_hash.hex()) if core.synced else None
        return self._on_loop(read)

    def loop_lag_max(self) -> float:
        """The longest the daemon's event loop was held up since start, in
        seconds (how late its 50 ms tick woke; heartbeats wait as long)."""
        return self._on_loop(lambda: self.daemon.stats.loop_lag_max)

    def members(self) -> list[str]:
        """Ids of the last applied view (who took part in the last round)."""
        return self._on_loop(lambda: sorted(self.daemon.core.members))

    def live_members(self) -> list[str]:
        """Members of the view this peer believes alive, itself included."""
        def live():
            now = time.monotonic()
            return sorted(p for p in self.daemon.core.members if self.daemon.core.alive(p, now))
        return self._on_loop(live)

    def joiners_waiting(self) -> bool:
        """Whether someone waits to enter the view: this peer itself (it
        joined, holds the state, and no round has taken it in yet), or a live
        peer that holds the state and heartbeats from outside the view. The
        view changes only at rounds; gossip runs, which hold none of their
        own, hold one when this is true (`GossipLoop.admit`)."""
        def read() -> bool:
            core = self.daemon.core
            if not core.synced:
                return False
            if core.me.id not in core.members:
                return True
            now = time.monotonic()
            return any(p not in core.members and b.synced and core.alive(p, now)
                       for p, b in core.beats.items())
        return self._on_loop(read)

    def wait_for_peers(self, n: int, timeout: float | None = None) -> None:
        """Blocks until a round of at least n peers (this one included) has
        applied: a run that should start together (a demo, an experiment)
        starts from one agreed state with n members in the view.

        A barrier made of rounds (each contributes an empty tensor) rather than
        of heartbeats: a joiner hears only the view's members, never the other
        joiners, so it could not count them. Every participant of the round
        that reaches n sees the same view and leaves together; the shared step
        advances by the rounds it took. Raises CollectiveTimeout, PeerClosed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise CollectiveTimeout(f"no round of {n} peers within {timeout} s")
            try:
                self.all_reduce({"barrier": torch.zeros(1)}, timeout=left)
            except StateReplaced:
                continue
            if len(self.members()) >= n:
                return
            # A founder alone would otherwise apply rounds back to back, each
            # moving the step a joiner is fetching.
            time.sleep(2 * self.daemon.cfg.timeouts.heartbeat_every)

    # ------------------------------------------------------------ operations

    def sync_state(self, timeout: float | None = None) -> int:
        """Blocks until this peer holds the swarm's shared state (a joiner fetches
        it; a peer whose hash differs from the majority's is repaired); returns
        its step. Raises CollectiveTimeout or PeerClosed."""
        d = self._daemon()
        self._wait(lambda: d.state is not None and d.core.synced and not d.syncing
                   and d.core.sync_requested is None, timeout, "the swarm's state")
        return d.state.step

    def all_reduce(self, tensors: Tensors, *,
                   apply: Callable[[SharedState, Tensors], None] | None = None,
                   timeout: float | None = None, donate: bool = False) -> Tensors:
        """The mean of tensors over the peers of one agreed round.

        Every participant gets byte-identical results. apply(state, mean), if
        given, runs on every participant as the round applies, before the
        shared step advances; this call returns after that. Aborted rounds
        (a peer died) are retried with the same contribution, except one of
        64 MiB or more whose ring had begun (it is reduced in place: see
        collective.IN_PLACE_MIN_BYTES): that one raises ContributionLost, a
        CollectiveTimeout. Raises StateReplaced if the swarm replaced our
        state meanwhile (recompute), CollectiveTimeout (the contribution is
        withdrawn), PeerClosed.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        self.sync_state(timeout)
        pending = self.all_reduce_async(tensors, apply=apply, donate=donate)
        # This frame ends up in a failure's traceback, which the failed
        # future keeps: holding the caller's tensors here kept them (2 GB
        # each at a large state) until the cycle collector ran.
        del tensors
        try:
            return pending.result(None if deadline is None
                                  else max(0.0, deadline - time.monotonic()))
        except CollectiveTimeout:
            pending.withdraw()
            raise
        finally:
            del pending

    def all_reduce_async(self, tensors: Tensors, *,
                         apply: Callable[[SharedState, Tensors], None] | None = None,
                         donate: bool = False) -> PendingAllReduce:
        """Submits tensors for an all_reduce and returns at once.

        Several can be pending: each goes into its own round (its own op tag),
        in submission order, while the caller computes (Streaming DiLoCo
        overlaps a fragment's reduction with the next inner steps this way).
        The tensors are copied before this returns, unless `donate` (the
        caller never reads or writes them again) and they tile one fp32
        buffer (see `flatten`): then the rounds use them in place, and a
        large one's round writes its mean there. Call sync_state first: a
        contribution made against a state the swarm then replaces fails with
        StateReplaced, and so does every one queued behind it.
        """
        flat, unflatten = flatten(tensors, donate)
        wrapped = None if apply is None else (lambda st, res: apply(st, unflatten(res)))
        sub = Submission(flat, wrapped, Future())
        self._on_loop(self._daemon().submit, sub)
        return PendingAllReduce(self, sub, unflatten)

    def gossip(self, tensors: Tensors, *, round_: int, seed: int = 0, group_size: int = 2,
               codec: int | None = None, block_size: int = 64,
               timeout: float = 30.0, grouping: str = "random") -> Tensors:
        """The mean of tensors within this peer's gossip group for round_.

        Groups are a pure function of (live members, round_, seed, group_size,
        grouping: gossip.groups_for; "grid" is Moshpit's, exact in
        ceil(log_group_size N) rounds on a full grid):
        peers that agree on the view meet without any message. No round, no
        barrier; runs alongside all_reduce (separate links). Raises
        GossipFailed; one with `ahead` set asks for a call at
        gossip.next_round(round_, e.rounds.values()) now, where the partners
        wait (see gossip.exchange).
        """
        flat, unflatten = flatten(tensors)
        me = self.id
        members = self.live_members()
        group = g.group_of(me, g.groups_for(grouping, members, round_, seed, group_size))
        addresses = self._on_loop(lambda: {p: self.daemon.core.known[p].data for p in group
                                           if p in self.daemon.core.known})
        if not self._gossip_lock.acquire(blocking=False):
            raise PeerError("one gossip at a time per peer")
        started = time.monotonic()
        try:
            out, refused = g.exchange(self.daemon.links, me, group, addresses, flat, round_,
                                      codec=codec, block_size=block_size, timeout=timeout,
                                      rule=self.daemon.cfg.aggregate,
                                      heard=self._gossip_heard)
        except GossipFailed as e:
            if not e.ahead:  # (a call to catch up with: no failure yet)
                # Counted on the loop, which owns the daemon's counters.
                self._on_loop(self.daemon.stats.gossip_done, False,
                              time.monotonic() - started, e.poisoned_by is not None)
            raise
        finally:
            self._gossip_lock.release()
        self._on_loop(self.daemon.stats.gossip_done, True, time.monotonic() - started,
                      bool(refused))
        return unflatten(out)

    # ------------------------------------------------------------ plumbing

    def _daemon(self) -> PeerDaemon:
        if self.daemon is None:
            raise PeerClosed("the peer is not started")
        return self.daemon

    def _on_loop(self, fn, *args):
        """Runs fn(*args) on the daemon's loop and returns its result."""
        if self._closed or self._loop is None or self._loop.is_closed():
            raise PeerClosed("the peer is closed")
        fut: Future = Future()

        def run() -> None:
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to the calling thread
                fut.set_exception(e)

        try:
            self._loop.call_soon_threadsafe(run)
        except RuntimeError:
            raise PeerClosed("the peer is closed") from None
        return self._result(fut, 30.0)

    def interrupt(self) -> None:
        """Ends every wait for a round or for the swarm's state, now and later,
        with CollectiveTimeout (an algorithm skips that outer step), so a run
        told to stop (SIGTERM) stops within a poll interval rather than after
        the outer timeout. The peer keeps running; safe from a signal handler."""
        self._interrupted.set()

    def _result(self, fut: Future, timeout: float | None, interruptible: bool = False):
        """fut's result, polling so that a peer closing meanwhile ends the wait."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if interruptible and self._interrupted.is_set() and not fut.done():
                raise CollectiveTimeout("interrupted: the run is stopping")
            left = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
            try:
                return fut.result(max(left, 0.0))
            except FutureTimeout:
                # FutureTimeout is the builtin TimeoutError, and so is the
                # CollectiveTimeout (ContributionLost) a future may settle with.
                if fut.done():
                    raise
            if self._thread is not None and not self._thread.is_alive():
                raise PeerClosed("the peer stopped")
            if deadline is not None and time.monotonic() >= deadline:
                raise CollectiveTimeout(f"nothing within {timeout} s")

    def _wait(self, cond, timeout: float | None, what: str) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not cond():
            if self._interrupted.is_set():
                raise CollectiveTimeout(f"interrupted while waiting for {what}")
            if self._closed or (self._thread is not None and not self._thread.is_alive()):
                raise PeerClosed("the peer is closed")
            if deadline is not None and time.monotonic() >= deadline:
                raise CollectiveTimeout(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.02)


class PendingAllReduce:
    """An all_reduce_async in progress: its rounds run while the caller goes on."""

    def __init__(self, peer: Peer, sub: Submission, unflatten: Callable[[torch.Tensor], Tensors]):
        self._peer, self._sub, self._unflatten = peer, sub, unflatten

    def done(self) -> bool:
        return self._sub.future.done()

    def result(self, timeout: float | None = None) -> Tensors:
        """The mean, once its round applied (and its apply ran). Raises
        CollectiveTimeout if not within timeout (it stays pending: wait again
        or withdraw), StateReplaced, PeerClosed."""
        return self._unflatten(self._peer._result(self._sub.future, timeout, True))

    def withdraw(self) -> None:
        """Gives up: a contribution no round has taken fails with Withdrawn; one
        whose round is already running still completes for everyone's sake
        (and then applies, and result() returns its mean)."""
        try:
            self._peer._on_loop(self._peer._daemon().withdraw, self._sub)
        except PeerClosed:
            pass  # closing fails every pending contribution with PeerClosed


__all__ = ["Peer", "PeerConfig", "PeerError", "PendingAllReduce", "flatten"]
