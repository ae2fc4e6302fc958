"""Fan defect events out to subscriptions, one lane (thread and queue) per subscription.

A lane delivers its events in order with retries; a slow or failing subscriber only ever
holds up its own lane. Every lane settles each event in the OffsetTracker, and the worker
commits what the tracker says is settled everywhere.

Nothing a subscriber does may hold the partitions' commits for long: a lane holds at most
``max_in_flight_per_subscription`` events (more are dead-lettered as ``backlog_full``), and its
circuit breaker dead-letters at once (``circuit_open``) while the subscriber keeps failing. Both
kinds are owed: the lane redrives them by itself once the subscriber answers again.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from pipeline.config import DeliverSettings
from pipeline.delivery.attempts import RetryPolicy, deliver
from pipeline.delivery.breaker import CircuitBreaker
from pipeline.delivery.channels import Sender
from pipeline.delivery.filters import delivery_id, matches, message_time
from pipeline.delivery.offsets import OffsetTracker
from pipeline.delivery.payload import build_notification
from pipeline.delivery.store import DeliveryLedger, ReplayAlerts
from pipeline.logging import get_logger
from pipeline.metrics import DELIVERIES
from schemas.events import DefectEvent
from schemas.subscriptions import STATEFUL_CHANNELS, DeadDelivery, Subscription

log = get_logger(__name__)

SenderFactory = Callable[[Subscription], Sender]


@dataclass(frozen=True)
class _Item:
    partition: Hashable
    offset: int
    event: DefectEvent


class Lane:
    """One subscription's ordered queue, its circuit breaker, and the thread that works through it."""

    def __init__(self, dispatcher: Dispatcher, sub: Subscription) -> None:
        self.sub = sub
        self._dispatcher = dispatcher
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._sender: Sender | None = None
        settings = dispatcher.settings
        self.breaker = CircuitBreaker(settings.circuit_failures, settings.circuit_probe_s)
        # Dead letters this lane owes (circuit_open, backlog_full), redriven when the subscriber answers;
        # starts True so a restarted worker picks up what its predecessor owed.
        self._owed = True
        self._thread = threading.Thread(target=self._run, name=f"deliver-{sub.id}", daemon=True)
        self._thread.start()

    def put(self, item: _Item) -> None:
        self._queue.put(item)

    def pending(self) -> int:
        return self._queue.qsize()

    def owe(self) -> None:
        self._owed = True

    def close(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        tick = self._dispatcher.settings.circuit_probe_s
        while True:
            try:
                item = self._queue.get(timeout=tick)
            except queue.Empty:
                self._idle()
                continue
            if item is None:
                break
            if self._handle_until_done(item):
                self._dispatcher.tracker.settle(item.partition, item.offset)
        if self._sender is not None:
            self._sender.close()

    def _idle(self) -> None:
        """With nothing queued: probe an open circuit, or redrive what is owed once it is closed."""
        if not self._owed or self._dispatcher.stop.is_set():
            return
        if self.breaker.is_open and not self.breaker.probe_due():
            return
        try:
            self._redrive_owed()
        except Exception:
            log.exception("owed_redrive_crashed", subscription=self.sub.id)

    def _redrive_owed(self, batch: int = 20) -> None:
        d = self._dispatcher
        sub = d.subscription(self.sub.id)
        if sub is None:
            return
        entries = d.ledger.owed(sub.id, batch)
        if not entries:
            self._owed = False
            return
        sender = self._sender_for(sub)
        for entry in entries:
            if not self._queue.empty() or d.stop.is_set():
                return  # new events first; the rest at the next idle moment
            notification = build_notification(sub.id, entry.event, sub.channel.media, d.settings.public_base_url,
                                              coalesced=entry.coalesced)
            outcome = deliver(sender, notification, RetryPolicy(max_attempts=1), sub.channel.type, d.stop,
                              self.breaker)
            if not outcome.delivered:
                return  # still failing (or the circuit opened again): try at the next probe
            d.ledger.redriven(sub.id, entry.delivery_id)
            log.info("owed_dead_letter_redriven", subscription=sub.id, delivery=entry.delivery_id)

    def _sender_for(self, sub: Subscription) -> Sender:
        if sub != self.sub and self._sender is not None:
            # Edited (new URL, secret or channel): later events go out through a fresh sender.
            self._sender.close()
            self._sender = None
        self.sub = sub
        if self._sender is None:
            self._sender = self._dispatcher.make_sender(sub)
        return self._sender

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
        event = item.event
        did = delivery_id(event)
        kind = sub.channel.type
        if d.ledger.outcome(sub.id, did) is not None:
            DELIVERIES.labels(channel=kind, outcome="duplicate").inc()
            return True
        at = message_time(event)
        coalesced = 0
        # A PLC channel must always see the end of a defect, or its reject signal stays set.
        limited = sub.rate_limit_s is not None and not (kind in STATEFUL_CHANNELS and event.status == "closed")
        if limited:
            rate = d.ledger.rate(sub.id, event.camera_id)
            if rate.last is not None and at - rate.last < sub.rate_limit_s:
                d.ledger.record_coalesced(sub.id, event.camera_id, did, rate)
                DELIVERIES.labels(channel=kind, outcome="coalesced").inc()
                return True
            coalesced = rate.coalesced
        notification = build_notification(sub.id, event, sub.channel.media, d.settings.public_base_url,
                                          coalesced=coalesced)
        outcome = deliver(self._sender_for(sub), notification, RetryPolicy.for_subscription(sub), kind, d.stop,
                          self.breaker)
        if outcome.interrupted:
            return False
        dead = None
        if not outcome.delivered:
            dead = DeadDelivery(subscription_id=sub.id, delivery_id=did, attempts=outcome.attempts,
                                error=outcome.error or "", failed_at=notification.sent_at,
                                event=event.model_dump(mode="json"), coalesced=coalesced)
            log.error("delivery_dead_lettered", subscription=sub.id, delivery=did, attempts=outcome.attempts,
                      error=outcome.error)
            if outcome.circuit_open:
                self._owed = True
        d.ledger.record_sent(sub.id, event.camera_id, did, at if limited else None, dead, owed=outcome.circuit_open)
        return True


class Dispatcher:
    def __init__(self, settings: DeliverSettings, ledger: DeliveryLedger, replay_alerts: ReplayAlerts,
                 make_sender: SenderFactory, stop: threading.Event) -> None:
        self.settings = settings
        self.ledger = ledger
        self.replay_alerts = replay_alerts
        self.make_sender = make_sender
        self.stop = stop
        # The ledger's dead-letter cap follows the worker's settings.
        ledger.max_dead = settings.max_dead_letters
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
        """Queue the event on each matching lane; returns how many. None settles the offset at once.

        A lane already holding ``max_in_flight_per_subscription`` events gets this one as a dead
        letter (``backlog_full``) instead, which settles it here.
        """
        targets = self.wanted(event) if event is not None else []
        queued: list[Lane] = []
        for sub in targets:
            lane = self._lanes.get(sub.id)
            if lane is None:
                lane = self._lanes[sub.id] = Lane(self, sub)
            assert event is not None
            if lane.pending() >= self.settings.max_in_flight_per_subscription and self._backlog_full(sub, event):
                lane.owe()
                continue
            queued.append(lane)
        self.tracker.add(partition, offset, len(queued))
        for lane in queued:
            assert event is not None
            lane.put(_Item(partition, offset, event))
        return len(targets)

    def _backlog_full(self, sub: Subscription, event: DefectEvent) -> bool:
        """Dead-letter the event for ``sub`` without delivering; False (queue it after all) if Redis fails."""
        did = delivery_id(event)
        try:
            if self.ledger.outcome(sub.id, did) is None:
                dead = DeadDelivery(subscription_id=sub.id, delivery_id=did, attempts=0,
                                    error=f"backlog_full: {self.settings.max_in_flight_per_subscription} deliveries "
                                          "already queued for this subscription", failed_at=time.time(),
                                    event=event.model_dump(mode="json"))
                self.ledger.record_sent(sub.id, event.camera_id, did, None, dead, owed=True)
        except Exception as exc:
            log.warning("backlog_dead_letter_failed", subscription=sub.id, delivery=did, error=repr(exc))
            return False
        DELIVERIES.labels(channel=sub.channel.type, outcome="backlog_full").inc()
        log.error("delivery_dead_lettered", subscription=sub.id, delivery=did, attempts=0, error="backlog_full")
        return True

    def close(self, timeout: float = 10.0) -> None:
        lanes = list(self._lanes.values())
        self._lanes.clear()
        for lane in lanes:
            lane.close(timeout)
