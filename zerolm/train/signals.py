"""Ctrl-C and SIGTERM during training: finish the step, save a checkpoint, stop; a second
signal aborts."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

log = logging.getLogger(__name__)


class Abort(KeyboardInterrupt):
    """A second interrupt before the checkpoint save began: stop at once, saving nothing."""


class Signals:
    """SIGINT and SIGTERM alike: the first finishes the step, saves a checkpoint and stops. A second
    one before the save aborts at once, saving nothing (resume takes the previous checkpoint, so it
    stays exact); during a save every signal waits until the checkpoint is written."""

    def __init__(self) -> None:
        self.requested: str = ""
        self.saving = False
        self._old: dict = {}

    def _handler(self, signum, frame):
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if self.saving:
            self.requested = self.requested or name
            log.warning("%s: a checkpoint is being saved; stopping once it is written", name)
            return
        if self.requested:
            raise Abort
        self.requested = name
        log.warning(
            "%s: finishing this step and saving a checkpoint (press again to abort at once)", name
        )

    @contextlib.contextmanager
    def hold(self):
        self.saving = True
        try:
            yield
        finally:
            self.saving = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {
                sig: signal.signal(sig, self._handler) for sig in (signal.SIGINT, signal.SIGTERM)
            }
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
