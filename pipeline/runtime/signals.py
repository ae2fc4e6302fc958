"""Graceful stop: SIGINT/SIGTERM set an event; the runtime finishes its batch, commits and exits."""

from __future__ import annotations

import signal
import threading

from pipeline.logging import get_logger

log = get_logger(__name__)


def stop_on_signals(stop: threading.Event | None = None) -> threading.Event:
    """An event set by SIGINT/SIGTERM (handlers go in only on the main thread; elsewhere the caller
    owns ``stop``)."""
    stop = stop or threading.Event()
    if threading.current_thread() is not threading.main_thread():
        return stop

    def handler(signum: int, _frame: object) -> None:
        log.info("stopping", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop
