"""Workarounds for kafka-python bugs that stop a consumer for good, each guarded by a test against the
real broker. ``apply`` runs once, when ``pipeline.bus`` is imported; ``unpark_paused`` before each of
the stream runtime's polls.

**A rejoin that outlives its poll leaves the member out of the group** (kafka-python 3.0.12). When a
rejoin is due to a changed subscription or, on the group leader, to changed topic metadata (another
member's topic appears, partitions are added), ``need_rejoin()`` turns false while the JoinGroup is
still on the wire: building the request records the joined subscription, performing the assignment
records the metadata snapshot. A ``poll`` whose timeout ends before the join does leaves the attempt
in flight, and the next ``poll`` no longer looks at it: the member stays "rebalancing" with its
heartbeat off, the broker drops it after the session timeout, and it never gets a partition again.
The fix keeps ``need_rejoin()`` true while a join attempt is in flight or its result unread, so the
next ``poll`` finishes it. (An attempt that completed while nobody polled is not read but sent again
by kafka-python: one more join round, not a member lost.) Test: ``tests/test_kafka_compat.py``.

**A resumed partition's records never come back** (kafka-python 3.0.12). Pausing a partition parks
its parsed records; resuming puts them back in line only while nothing is in line, and a drained
partition's records stay in line as an empty (falsy) object, so the parked partition would be neither
returned nor fetched again. The stream runtime pauses partitions to draw fair batches; an empty
in-line slot is treated as none. Test: ``tests/test_runtime_fairness.py``.
"""

from __future__ import annotations

from typing import Any

from kafka import KafkaConsumer
from kafka.coordinator.consumer import ConsumerCoordinator

__all__ = ["apply", "unpark_paused"]

_MARK = "_linewatch_join_latched"


def apply() -> None:
    """Patch kafka-python's consumer coordinator (idempotent)."""
    original = ConsumerCoordinator.need_rejoin
    if getattr(original, _MARK, False):
        return
    if not hasattr(ConsumerCoordinator, "join_group_async"):  # another kafka-python: nothing to fix
        return

    def need_rejoin(self: Any) -> bool:
        if getattr(self, "_join_task", None) is not None:
            return True
        return bool(original(self))

    setattr(need_rejoin, _MARK, True)
    need_rejoin.__doc__ = original.__doc__
    ConsumerCoordinator.need_rejoin = need_rejoin  # type: ignore[method-assign]


def unpark_paused(consumer: KafkaConsumer) -> None:
    """Let the fetcher put a resumed partition's parked records back in line (see above)."""
    fetcher = getattr(consumer, "_fetcher", None)
    inline = getattr(fetcher, "_next_partition_records", None)
    if inline is not None and not inline and getattr(fetcher, "_paused_partition_records", None):
        fetcher._next_partition_records = None  # type: ignore[union-attr]
