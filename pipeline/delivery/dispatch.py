"""Fan defect events out to subscriptions, one lane (thread and queue) per subscription.

A lane delivers its events in order with retries; a slow or failing subscriber only ever
holds up its own lane. Every lane settles each event in the OffsetTracker, and the worker
commits what the tracker says is settled everywhere.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from pipeline.config import DeliverSettings
from pipeline.delivery.attempts import RetryPolicy, deliver
from pipeline.delivery.channels import Sender
from pipeline.delivery.filters import delivery_id, matches, message_time
from pipeline.delivery.offsets import OffsetTracker
from pipeline.delivery.payload import build_notification
from pipeline.delivery.store import DeliveryLedger, ReplayAlerts
from pipeline.logging import get_logger
from pipeline.metrics import DELIVERIES
from schemas.events import DefectEvent
from schemas.subscriptions import DeadDelivery, Subscription

log = get_logger(__name__)

SenderFactory = Callable[[Subscription], Sender]


@dataclass(frozen=True)
class _Item:
    partition: Hashable
    offset: int
    event: DefectEvent


class Lane:
    """One subscription's ordered queue and the thread that works through it."""

    def __init__(self, dispatcher: Dispatcher, sub: Subscription) -> None:
        self.sub = sub
        self._dispatcher = dispatcher
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._sender: Sender | None = None
        self._thread = threading.Thread(target=self._run, name=f"deliver-{sub.id}", daemon=True)
        self._thread.start()

    def put(self, item: _Item) -> None:
        self._queue.put(item)

    def close(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                break
            if self._handle_until_done(item):
                self._dispatcher.tracker.settle(item.partition, item.offset)
        if self._sender is not None:
            self._sender.close()

    def _handle_until_done(self, item: _Item) -> bool:
        """Handle the item, retrying after unexpected errors (e.g. Redis down) until stopped.

        Skipping it instead would deliver later events first or, unsettled, stall the commits.
        """
        delay = 0.5
        while True:
            try:
                return self._handle(item)
            except Exception:
                log.exception("delivery_crashed", subscription=self.sub.id, event=item.event.event_id,
                              retry_in_s=delay)
            if self._dispatcher.stop.wait(delay):
                return False  # unsettled: redelivered after a restart
            delay = min(delay * 2, 30.0)

    def _handle(self, item: _Item) -> bool:
        d = self._dispatcher
        sub = d.subscription(self.sub.id)
        if sub is None:
            return True  # removed meanwhile: nothing to deliver
        if sub != self.sub and self._sender is not None:
            # Edited (new URL, secret or channel): later events go out through a fresh sender.
            self._sender.close()
            self._sender = None
        self.sub = sub
        event = item.event
        did = delivery_id(event)
        kind = sub.channel.type
        if d.ledger.outcome(sub.id, did) is not None:
            DELIVERIES.labels(channel=kind, outcome="duplicate").inc()
            return True
        at = message_time(event)
        coalesced = 0
        if sub.rate_limit_s is not None:
            rate = d.ledger.rate(sub.id, event.camera_id)
            if rate.last is not None and at - rate.last < sub.rate_limit_s:
                d.ledger.record_coalesced(sub.id, event.camera_id, did, rate)
                DELIVERIES.labels(channel=kind, outcome="coalesced").inc()
                return True
            coalesced = rate.coalesced
        notification = build_notification(sub.id, event, sub.channel.media, d.settings.public_base_url,
                                          coalesced=coalesced)
        if self._sender is None:
            self._sender = d.make_sender(sub)
        outcome = deliver(self._sender, notification, RetryPolicy.for_subscription(sub), kind, d.stop)
        if outcome.interrupted:
            return False
        dead = None
        if not outcome.delivered:
            dead = DeadDelivery(subscription_id=sub.id, delivery_id=did, attempts=outcome.attempts,
                                error=outcome.error or "", failed_at=notification.sent_at,
                                event=event.model_dump(mode="json"), coalesced=coalesced)
            log.error("delivery_dead_lettered", subscription=sub.id, delivery=did, attempts=outcome.attempts,
                      error=outcome.error)
        d.ledger.record_sent(sub.id, event.camera_id, did, at if sub.rate_limit_s is not None else None, dead)
        return True


class Dispatcher:
    def __init__(self, settings: DeliverSettings, ledger: DeliveryLedger, replay_alerts: ReplayAlerts,
                 make_sender: SenderFactory, stop: threading.Event) -> None:
        self.settings = settings
        self.ledger = ledger
        self.replay_alerts = replay_alerts
        self.make_sender = make_sender
        self.stop = stop
        self.tracker = OffsetTracker()
        self._subs: dict[str, Subscription] = {}
        self._lanes: dict[str, Lane] = {}
        self._lock = threading.Lock()

    def subscription(self, sub_id: str) -> Subscription | None:
        with self._lock:
            return self._subs.get(sub_id)

    def set_subscriptions(self, subs: dict[str, Subscription]) -> None:
        """Apply the stored set: removed subscriptions' lanes drain what they hold as no-ops; edited
        ones pick up the change at their next event."""
        with self._lock:
            added = subs.keys() - self._subs.keys()
            removed = self._subs.keys() - subs.keys()
            changed = {k for k in subs.keys() & self._subs.keys() if subs[k] != self._subs[k]}
            self._subs = dict(subs)
            gone = [self._lanes.pop(k) for k in removed if k in self._lanes]
        for lane in gone:
            threading.Thread(target=lane.close, args=(60.0,), daemon=True).start()
        if added or removed or changed:
            log.info("subscriptions_loaded", count=len(subs), added=sorted(added), removed=sorted(removed),
                     changed=sorted(changed))

    def wanted(self, event: DefectEvent) -> list[Subscription]:
        if event.replay_session is not None and not self.replay_alerts.enabled(event.replay_session):
            return []
        with self._lock:
            return [s for s in self._subs.values() if matches(s.filters, event)]

    def submit(self, partition: Hashable, offset: int, event: DefectEvent | None) -> int:
        """Queue the event on each matching lane; returns how many. None settles the offset at once."""
        targets = self.wanted(event) if event is not None else []
        self.tracker.add(partition, offset, len(targets))
        for sub in targets:
            lane = self._lanes.get(sub.id)
            if lane is None:
                lane = self._lanes[sub.id] = Lane(self, sub)
            assert event is not None
            lane.put(_Item(partition, offset, event))
        return len(targets)

    def close(self, timeout: float = 10.0) -> None:
        lanes = list(self._lanes.values())
        self._lanes.clear()
        for lane in lanes:
            lane.close(timeout)
