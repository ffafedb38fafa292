"""Ctrl-C and SIGTERM while training: the first asks the run to stop after the step in
flight, or after the setup or held-out evaluation in flight (the trainer then saves last.pt
and exits 130 / 143, so running the same command resumes); a second one stops at once.
Asked for from the start of a run's setup, not only in the loop: a KeyboardInterrupt raised
inside a library callback (numba compiling FFCV's pipeline, say) can be swallowed there,
the request cannot."""

from __future__ import annotations

import signal
from types import FrameType, TracebackType

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Stopped(Exception):
    """Raised by the loop once the state is saved after a stop request."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopRequests:
    """Installs the handlers for its `with` block (the previous ones come back after);
    `signum` is the first signal received, or None."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def start(self) -> StopRequests:
        """Ctrl-C and SIGTERM become requests from now on."""
        self._previous = {sig: signal.signal(sig, self._request) for sig in EXIT_CODES}
        return self

    def end(self) -> None:
        """The previous handlers back (a second call restores nothing twice)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> StopRequests:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.end()

    def _request(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum
