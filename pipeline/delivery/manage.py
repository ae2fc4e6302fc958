"""Operations on subscriptions shared by the CLI and the API: add, test, redrive."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import imaging
from pipeline.config import Settings
from pipeline.delivery.attempts import RetryPolicy, deliver
from pipeline.delivery.channels import Sender
from pipeline.delivery.payload import build_notification
from pipeline.delivery.proxy import WebhookProxies
from pipeline.delivery.store import DeliveryLedger, SubscriptionStore
from pipeline.delivery.urls import validate_webhook_url
from schemas.events import DefectEvent, Region
from schemas.subscriptions import DeadDelivery, OpcUaChannel, Subscription, WebhookChannel


def check_subscription(sub: Subscription, settings: Settings) -> None:
    """Raise ValueError when the subscription could never be delivered as configured."""
    if isinstance(sub.channel, WebhookChannel):
        deliver = settings.deliver
        # Through a proxy the host need not resolve here (the proxy resolves it): the URL is checked.
        proxied = WebhookProxies(deliver.webhook_proxy, deliver.webhook_no_proxy).for_url(sub.channel.url)
        validate_webhook_url(sub.channel.url, deliver.allow_private_networks, check_dns=proxied is None)
    if isinstance(sub.channel, OpcUaChannel):
        for path in (sub.channel.certificate, sub.channel.private_key, sub.channel.server_certificate):
            if path and not Path(path).is_file():
                raise ValueError(f"OPC UA certificate or key file {path!r} does not exist")
    if sub.channel.media == "url" and not settings.deliver.public_base_url:
        raise ValueError("media 'url' needs deliver.public_base_url (where `linewatch api` is reachable)")


def with_webhook_secret(data: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """A subscription body whose webhook has no secret gets a generated one, returned once for the user."""
    channel = data.get("channel")
    if not isinstance(channel, dict) or channel.get("type", "webhook") != "webhook" or channel.get("secret"):
        return data, None
    generated = secrets.token_urlsafe(32)
    return {**data, "channel": {**channel, "secret": generated}}, generated


def subscription_rows(store: SubscriptionStore, ledger: DeliveryLedger) -> list[dict[str, Any]]:
    """Every subscription as shown to users (secret masked), with its dead letters and held-back count."""
    return [{**s.public(), "dead_letters": ledger.dead_count(s.id), "pending_coalesced": ledger.pending_coalesced(s.id)}
            for s in store.all().values()]


def dead_letter_rows(ledger: DeliveryLedger, sub_id: str) -> list[dict[str, Any]]:
    """A subscription's dead letters without the stored event body, oldest first."""
    return [d.model_dump(mode="json", exclude={"event"}) | {"camera_id": d.event.get("camera_id"),
                                                            "event_id": d.event.get("event_id")}
            for d in ledger.dead(sub_id)]


def add_subscription(store: SubscriptionStore, sub: Subscription, settings: Settings) -> None:
    check_subscription(sub, settings)
    store.add(sub)


def sample_event(camera_id: str = "test-camera") -> DefectEvent:
    """A small, obviously synthetic event for `subscriptions test`."""
    mask = np.zeros((32, 32), np.uint8)
    mask[8:16, 8:16] = 255
    thumb = np.full((32, 32, 3), 128, np.uint8)
    now = time.time()
    return DefectEvent(
        event_id=f"test-{int(now * 1000)}", status="open", camera_id=camera_id, line_id="test-line",
        product_class="test", first_seq=0, last_seq=0, first_ts=now, last_ts=now, peak_seq=0, peak_score=1.0,
        threshold=0.5, n_frames=1, width=32, height=32, regions=[Region(x=8, y=8, width=8, height=8, area=64)],
        mask_png=imaging.encode_png(mask), thumbnail_jpeg=imaging.encode_jpeg(thumb),
    )


def send_test(sub: Subscription, sender: Sender, settings: Settings) -> str | None:
    """One attempt with a synthetic event marked ``test``; returns the error, or None on success."""
    notification = build_notification(sub.id, sample_event(), sub.channel.media, settings.deliver.public_base_url,
                                      test=True)
    outcome = deliver(sender, notification, RetryPolicy(max_attempts=1), sub.channel.type)
    return outcome.error


@dataclass
class RedriveResult:
    delivered: list[str]
    failed: dict[str, str]


def redrive(sub: Subscription, ledger: DeliveryLedger, sender: Sender, settings: Settings,
            delivery_ids: list[str] | None = None) -> RedriveResult:
    """Deliver dead letters again with the subscription's retry policy; successes leave the list.

    Failures stay, with their attempt count and error updated, for a later redrive.
    """
    dead = ledger.dead(sub.id)
    if delivery_ids:
        known = {d.delivery_id for d in dead}
        missing = [i for i in delivery_ids if i not in known]
        if missing:
            raise ValueError(f"no dead letter(s) {missing} for subscription {sub.id!r}")
        dead = [d for d in dead if d.delivery_id in delivery_ids]
    result = RedriveResult([], {})
    for entry in dead:
        notification = build_notification(sub.id, entry.event, sub.channel.media, settings.deliver.public_base_url,
                                          coalesced=entry.coalesced)
        outcome = deliver(sender, notification, RetryPolicy.for_subscription(sub), sub.channel.type)
        if outcome.delivered:
            ledger.redriven(sub.id, entry.delivery_id)
            result.delivered.append(entry.delivery_id)
        else:
            ledger.update_dead(DeadDelivery(**{**entry.model_dump(), "attempts": entry.attempts + outcome.attempts,
                                               "error": outcome.error or "", "failed_at": time.time()}))
            result.failed[entry.delivery_id] = outcome.error or ""
    return result
