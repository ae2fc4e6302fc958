"""What the deliver worker did with a replay's events, read back from the delivery ledger.

Every open and close message of the session that a subscription wants has, once the deliver worker
has settled it, an outcome in the ledger (delivered, dead-lettered, coalesced by the rate limit);
the replay waits a bounded time for them and summarises them as `linewatch run` does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from pipeline.config import Settings
from pipeline.delivery.filters import delivery_id, matches
from pipeline.delivery.store import DeliveryLedger, SubscriptionStore
from pipeline.logging import get_logger
from pipeline.redis_store import connect
from schemas.events import DefectEvent

log = get_logger(__name__)

# Ledger outcome -> summary name.
_OUTCOMES = {"delivered": "delivered", "dead": "dead_lettered", "coalesced": "coalesced"}


@dataclass
class DeliveryCounts:
    delivered: int = 0
    dead_lettered: int = 0
    coalesced: int = 0
    pending: int = 0  # wanted by a subscription, no outcome yet
    dead_subscriptions: list[str] = field(default_factory=list)  # where the dead letters are

    def as_dict(self) -> dict[str, int]:
        return {"delivered": self.delivered, "dead_lettered": self.dead_lettered, "coalesced": self.coalesced,
                "pending": self.pending}


def count_deliveries(subs: SubscriptionStore, ledger: DeliveryLedger,
                     transitions: Sequence[DefectEvent]) -> DeliveryCounts:
    """Outcome of each (subscription, message) pair the subscriptions' filters want."""
    counts = DeliveryCounts()
    messages = {delivery_id(ev): ev for ev in transitions}  # a redelivered message counts once
    dead: set[str] = set()
    for sub in subs.all().values():
        for did, ev in messages.items():
            if not matches(sub.filters, ev):
                continue
            outcome = ledger.outcome(sub.id, did)
            if outcome is None:
                counts.pending += 1
                continue
            name = _OUTCOMES.get(outcome, "delivered")
            setattr(counts, name, getattr(counts, name) + 1)
            if outcome == "dead":
                dead.add(sub.id)
    counts.dead_subscriptions = sorted(dead)
    return counts


def await_deliveries(settings: Settings, transitions: Sequence[DefectEvent], stop: threading.Event,
                     wait_s: float) -> DeliveryCounts:
    """Count the session's deliveries, waiting up to ``wait_s`` for those still pending."""
    client = connect(settings.redis)
    try:
        subs = SubscriptionStore(client, settings.redis.key_prefix)
        ledger = DeliveryLedger(client, settings.redis.key_prefix)
        deadline = time.monotonic() + wait_s
        counts = count_deliveries(subs, ledger, transitions)
        if counts.pending:
            log.info("replay_waiting_for_deliveries", pending=counts.pending, wait_s=wait_s)
        while counts.pending and time.monotonic() < deadline and not stop.wait(0.5):
            counts = count_deliveries(subs, ledger, transitions)
        return counts
    finally:
        client.close()
