"""Which offsets may be committed while events are still being delivered out of order."""

from __future__ import annotations

import threading
from collections.abc import Hashable


class OffsetTracker:
    """Per partition, the committable offset is the smallest record not yet settled in every lane.

    Lanes finish records in different orders (a slow webhook holds its own lane only), so the
    commit point can trail the fastest lane; records past it are redelivered after a crash and
    dropped by the delivery ledger.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[Hashable, dict[int, int]] = {}
        self._high: dict[Hashable, int] = {}

    def add(self, partition: Hashable, offset: int, lanes: int) -> None:
        with self._lock:
            self._high[partition] = max(self._high.get(partition, 0), offset + 1)
            if lanes > 0:
                self._pending.setdefault(partition, {})[offset] = lanes

    def settle(self, partition: Hashable, offset: int) -> None:
        """One lane is done with the record."""
        with self._lock:
            pending = self._pending.get(partition, {})
            left = pending.get(offset)
            if left is None:
                return
            if left <= 1:
                del pending[offset]
            else:
                pending[offset] = left - 1

    def committable(self) -> dict[Hashable, int]:
        with self._lock:
            out: dict[Hashable, int] = {}
            for partition, high in self._high.items():
                pending = self._pending.get(partition)
                out[partition] = min(pending) if pending else high
            return out

    def in_flight(self) -> int:
        with self._lock:
            return sum(len(p) for p in self._pending.values())

    def forget(self, partitions: set[Hashable]) -> None:
        """Partitions moved to another worker: their records are its business now."""
        with self._lock:
            for partition in partitions:
                self._pending.pop(partition, None)
                self._high.pop(partition, None)
