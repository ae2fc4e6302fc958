"""Workarounds for kafka-python bugs that stop a consumer for good or swell its memory, each guarded by
a test against the real broker. ``apply`` runs once, when ``pipeline.bus`` is imported; ``unpark_paused`` before each of
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

**Every short poll leaves the poller's frames to the cyclic garbage collector** (kafka-python
3.0.12). A ``poll`` that returns before its fetch is answered ends with an internal "Timed out after
0 ms" that the fetcher raises and catches. That exception is also kept by the future it timed out
(``wait_for``'s wrapper), which a callback of the fetcher's wake-up future holds, which the fetcher's
frame holds, which the exception's traceback holds: a cycle, and with it the frames of everything up
the caller's stack, with their locals: the stream runtime's batch of 1080p frames. Only a full
collection frees them, rarely in a process of half a million objects: a scorer under a 1080p
backlog grew 300-450 MB in two minutes (bench/README.md, scenario 8). ``NetworkSelector.run`` now
raises a copy of the exception, which nothing else holds, and drops the original's traceback.
Test: ``tests/test_kafka_compat.py``.

**A resumed partition's records never come back** (kafka-python 3.0.12). Pausing a partition parks
its parsed records; resuming puts them back in line only while nothing is in line, and a drained
partition's records stay in line as an empty (falsy) object, so the parked partition would be neither
returned nor fetched again. The stream runtime pauses partitions to draw fair batches; an empty
in-line slot is treated as none. Test: ``tests/test_runtime_fairness.py``.

**The group member's id and a rejoin on demand** have no public API: ``member_id`` and
``request_rejoin`` read and set the coordinator's, for the runtime's fast failover
(``pipeline.runtime.failover``). Test: ``tests/test_failover.py``.
"""

from __future__ import annotations

import copy
from typing import Any

from kafka import KafkaConsumer
from kafka.coordinator.consumer import ConsumerCoordinator
from kafka.net.selector import NetworkSelector

__all__ = ["apply", "member_id", "request_rejoin", "unpark_paused"]

_MARK = "_linewatch_patched"


def apply() -> None:
    """Patch kafka-python (idempotent)."""
    _latch_rejoin()
    _uncycle_run()


def _uncycle_run() -> None:
    original = NetworkSelector.run
    if getattr(original, _MARK, False):
        return

    def run(self: Any, coro: Any, *args: Any) -> Any:
        try:
            return original(self, coro, *args)
        except Exception as exc:
            # No local may hold the copy: this frame will be in its traceback.
            raise _detached(exc) from exc.__cause__

    setattr(run, _MARK, True)
    run.__doc__ = original.__doc__
    NetworkSelector.run = run  # type: ignore[method-assign]


def _detached(exc: Exception) -> Exception:
    """A copy of ``exc`` that nothing else refers to; the original loses its traceback."""
    exc.__traceback__ = None
    try:
        return copy.copy(exc)
    except Exception:  # an exception class that cannot be copied: at least no traceback
        return exc


def _latch_rejoin() -> None:
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


def member_id(consumer: KafkaConsumer) -> str | None:
    """The member id the group coordinator gave this consumer ('' or None before the first join)."""
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is None:
        return None
    return str(coordinator.group_metadata().member_id or "") or None


def request_rejoin(consumer: KafkaConsumer) -> None:
    """Rejoin the group on the next poll (a peer was removed: the assignment changes)."""
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is not None:
        coordinator.request_rejoin()
