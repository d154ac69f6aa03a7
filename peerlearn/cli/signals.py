"""SIGINT and SIGTERM turned into a stop event, without a lock in the handler.

Python runs a signal handler on the main thread between two bytecodes, which
may be inside `threading.Event.wait()` re-acquiring that event's lock. A
handler that then called `Event.set()` on the same event waited for a lock its
own thread held: the peer never exited after SIGTERM (1 run in about 30 of
`peerlearn run`, whose main thread waits on its stop event). So the handler
here only records the signal and writes a byte to a pipe; a relay thread reads
it and does what takes locks (setting the event, interrupting the peer).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable


class StopOnSignal:
    """Installs handlers for SIGINT and SIGTERM that set `stop` and call each
    of `then` (from the relay thread, never from the handler). `signals`
    lists the signals received, in order. close() (or leaving the `with`
    block) joins the relay thread; the handlers stay installed and go on
    recording, so a late signal is not the default's KeyboardInterrupt."""

    def __init__(self, stop: threading.Event, then: tuple[Callable[[], None], ...] = ()):
        self.stop, self._then = stop, then
        self.signals: list[int] = []
        self._read, self._write = os.pipe()
        self._closed = False
        self._relay = threading.Thread(target=self._run, name="signal-relay")
        self._relay.start()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, _frame) -> None:
        self.signals.append(signum)  # a list append and a pipe write take no Python lock
        if not self._closed:
            os.write(self._write, b"s")

    def _run(self) -> None:
        while os.read(self._read, 1) == b"s":
            self.stop.set()
            for f in self._then:
                f()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        os.write(self._write, b"q")
        self._relay.join()
        os.close(self._read)
        os.close(self._write)

    def __enter__(self) -> StopOnSignal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
