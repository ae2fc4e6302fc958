"""A circuit breaker per subscription: a subscriber that keeps failing stops costing retries.

Closed: attempts go out. After ``failures`` consecutive failed attempts it opens: deliveries are
dead-lettered at once (reason ``circuit_open``) so the lane, and with it the partitions' commits,
move on. Every ``probe_s`` one attempt is let through (half-open); an answer closes it, a failure
opens it for another ``probe_s``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

CIRCUIT_OPEN = "circuit_open"


class CircuitBreaker:
    def __init__(self, failures: int = 5, probe_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.failures = failures
        self.probe_s = probe_s
        self._clock = clock
        self._lock = threading.Lock()
        self._consecutive = 0
        self._opened_at: float | None = None

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self._opened_at is not None

    def allow(self) -> bool:
        """May an attempt go out now? While open, one probe per ``probe_s``."""
        with self._lock:
            if self._opened_at is None:
                return True
            if self._clock() - self._opened_at >= self.probe_s:
                self._opened_at = self._clock()  # the probe; the next one waits another interval
                return True
            return False

    def probe_due(self) -> bool:
        with self._lock:
            return self._opened_at is not None and self._clock() - self._opened_at >= self.probe_s

    def success(self) -> bool:
        """Record an answer; True when this closed an open circuit."""
        with self._lock:
            was_open = self._opened_at is not None
            self._consecutive = 0
            self._opened_at = None
            return was_open

    def failure(self) -> bool:
        """Record a failed attempt; True when this opened the circuit."""
        with self._lock:
            self._consecutive += 1
            if self._opened_at is not None:
                self._opened_at = self._clock()
                return False
            if self._consecutive >= self.failures:
                self._opened_at = self._clock()
                return True
            return False
