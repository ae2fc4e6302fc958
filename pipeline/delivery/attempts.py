"""Delivering one notification with retries, exponential backoff and jitter."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass

from pipeline.delivery.breaker import CIRCUIT_OPEN, CircuitBreaker
from pipeline.delivery.channels import DeliveryError, Sender
from pipeline.logging import get_logger
from pipeline.metrics import DELIVERIES
from schemas.subscriptions import Notification, RetriedChannel, Subscription

log = get_logger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    initial_s: float = 0.5
    max_s: float = 10.0

    @classmethod
    def for_subscription(cls, sub: Subscription) -> RetryPolicy:
        ch = sub.channel
        if isinstance(ch, RetriedChannel):
            return cls(ch.max_attempts, ch.backoff_initial_s, ch.backoff_max_s)
        return cls()

    def delay(self, failed_attempts: int, retry_after_s: float | None = None,
              rng: random.Random | None = None) -> float:
        """Wait before the next attempt: doubling per failure, capped, half of it jittered.

        Jitter spreads the retries of many workers hit by the same outage; a server's Retry-After
        is honoured up to the cap.
        """
        base = min(self.max_s, self.initial_s * 2 ** max(0, failed_attempts - 1))
        wait = base / 2 + (rng or random).uniform(0, base / 2)
        if retry_after_s is not None:
            wait = max(wait, min(retry_after_s, self.max_s))
        return wait


@dataclass(frozen=True)
class Outcome:
    delivered: bool
    attempts: int
    error: str | None = None
    # Stopped while waiting to retry: nothing is settled and the delivery must happen again later.
    interrupted: bool = False
    # Given up because the subscription's circuit is open (dead-lettered with reason circuit_open).
    circuit_open: bool = False


def deliver(sender: Sender, notification: Notification, policy: RetryPolicy, channel_kind: str,
            stop: threading.Event | None = None, breaker: CircuitBreaker | None = None) -> Outcome:
    """Attempt until delivered, a permanent error, the last attempt, an open circuit, or ``stop``."""
    dlog = log.bind(subscription=notification.subscription_id, delivery=notification.delivery_id)
    attempt = 0
    last_error = ""
    while True:
        if breaker is not None and not breaker.allow():
            DELIVERIES.labels(channel=channel_kind, outcome="circuit_open").inc()
            error = f"{CIRCUIT_OPEN}: {breaker.failures}+ consecutive failures" + (
                f"; last: {last_error}" if last_error else "")
            return Outcome(False, attempt, error, circuit_open=True)
        attempt += 1
        started = time.monotonic()
        try:
            sender.send(notification)
        except DeliveryError as exc:
            last_error = str(exc)
            if breaker is not None and not exc.permanent and breaker.failure():
                dlog.error("circuit_opened", failures=breaker.failures, probe_s=breaker.probe_s, error=str(exc))
            last = exc.permanent or attempt >= policy.max_attempts
            dlog.warning("delivery_attempt_failed", attempt=attempt, error=str(exc), permanent=exc.permanent,
                         final=last)
            if last:
                DELIVERIES.labels(channel=channel_kind, outcome="failed").inc()
                return Outcome(False, attempt, str(exc))
            if breaker is not None and breaker.is_open:
                continue  # no waiting to retry: the check above dead-letters it as circuit_open
            DELIVERIES.labels(channel=channel_kind, outcome="retry").inc()
            wait = policy.delay(attempt, exc.retry_after_s)
            if stop is not None and stop.wait(wait):
                return Outcome(False, attempt, str(exc), interrupted=True)
            if stop is None:
                time.sleep(wait)
            continue
        if breaker is not None and breaker.success():
            dlog.warning("circuit_closed", attempt=attempt)
        DELIVERIES.labels(channel=channel_kind, outcome="delivered").inc()
        dlog.info("delivered", attempt=attempt, ms=round((time.monotonic() - started) * 1000, 1))
        return Outcome(True, attempt)
