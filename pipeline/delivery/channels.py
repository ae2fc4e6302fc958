"""One delivery attempt per call, per channel kind; retries and backoff belong to the caller.

A sender raises DeliveryError; ``permanent`` errors (a 4xx answer, a refused URL) skip the
remaining attempts because repeating the same request cannot succeed.
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
from typing import Protocol

import redis
from kafka import KafkaProducer

from pipeline.bus import make_producer
from pipeline.config import Settings
from pipeline.delivery import webhook_http
from pipeline.delivery.proxy import ProxyConfigError, WebhookProxies
from pipeline.delivery.signing import SIGNATURE_HEADER, sign
from pipeline.delivery.store import CameraStates
from pipeline.delivery.urls import Resolver, WebhookURLError, proxied_webhook, resolve, resolve_webhook
from schemas.subscriptions import (
    KafkaChannel,
    MqttChannel,
    Notification,
    OpcUaChannel,
    RedisStreamChannel,
    Subscription,
    WebhookChannel,
)

USER_AGENT = "linewatch-deliver/1"
# Worth another attempt: timeouts, throttling, server trouble.
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class DeliveryError(Exception):
    def __init__(self, message: str, permanent: bool = False, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.retry_after_s = retry_after_s


class Sender(Protocol):
    def send(self, notification: Notification) -> None: ...

    def close(self) -> None: ...


def _retry_after(headers: dict[str, str]) -> float | None:
    value = headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


class WebhookSender:
    """HTTP POST of the notification JSON, signed, with the delivery id as Idempotency-Key.

    Each attempt resolves the host once, checks the addresses and connects to the checked one (or,
    when a proxy applies, hands the host to the proxy: `pipeline.delivery.proxy`); ``timeout_s``
    bounds the whole attempt (connect, send, headers, body), and at most ``max_body`` bytes of the
    answer are read. Redirects are not followed: one could lead past the address check. ``tls``
    replaces the system's certificate authorities (tests).
    """

    def __init__(self, channel: WebhookChannel, allow_private: bool, max_body: int = 64 * 1024,
                 resolver: Resolver = resolve, proxies: WebhookProxies | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        self.channel = channel
        self.allow_private = allow_private
        self.max_body = max_body
        self._resolver = resolver
        # None: always direct (the deliver worker passes the settings' and environment's proxies).
        self._proxies = proxies
        self._tls = tls

    def send(self, notification: Notification) -> None:
        try:
            proxy = self._proxies.for_url(self.channel.url) if self._proxies is not None else None
            if proxy is not None:
                target = proxied_webhook(self.channel.url, self.allow_private)
            else:
                target = resolve_webhook(self.channel.url, self.allow_private, self._resolver)
        except (WebhookURLError, ProxyConfigError) as exc:
            raise DeliveryError(str(exc), permanent=True) from exc
        body = notification.model_dump_json().encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            SIGNATURE_HEADER: sign(self.channel.secret, body),
            "Idempotency-Key": notification.delivery_id,
            "X-Linewatch-Subscription": notification.subscription_id,
        }
        via = f" via proxy {proxy}" if proxy is not None else ""
        try:
            response = webhook_http.post(target, body, headers, self.channel.timeout_s, self.max_body, self._tls,
                                         proxy)
        except webhook_http.DeadlineExceededError as exc:
            raise DeliveryError(f"timeout: no complete answer within {self.channel.timeout_s} s{via}") from exc
        except webhook_http.ProxyError as exc:
            # The proxy's own refusal (policy, authentication) repeats; its gateway errors may not.
            permanent = exc.status is not None and exc.status not in RETRYABLE_STATUS
            raise DeliveryError(str(exc), permanent=permanent) from exc
        except TimeoutError as exc:
            raise DeliveryError(f"timeout after {self.channel.timeout_s} s ({type(exc).__name__}){via}") from exc
        except (ConnectionError, OSError) as exc:
            where = f"proxy {proxy}" if proxy is not None else str(target.address)
            raise DeliveryError(f"ConnectError to {where}: {exc}") from exc
        except http.client.HTTPException as exc:
            raise DeliveryError(f"bad HTTP answer{via}: {type(exc).__name__}: {exc}") from exc
        if 200 <= response.status < 300:
            return
        reason = f"HTTP {response.status}{via}: {response.body[:200]!r}"
        if response.status in RETRYABLE_STATUS:
            raise DeliveryError(reason, retry_after_s=_retry_after(response.headers))
        raise DeliveryError(reason, permanent=True)

    def close(self) -> None:
        """Nothing held between attempts: each one connects afresh to the address it checked."""


class KafkaSender:
    """The notification JSON on a topic, keyed by camera, acknowledged before returning."""

    def __init__(self, channel: KafkaChannel, producer: KafkaProducer, ack_timeout_s: float = 30.0) -> None:
        self.channel = channel
        self._producer = producer
        self._ack_timeout_s = ack_timeout_s

    def send(self, notification: Notification) -> None:
        future = self._producer.send(
            self.channel.topic,
            key=str(notification.event.get("camera_id", "")).encode(),
            value=notification.model_dump_json().encode(),
            headers=[("Idempotency-Key", notification.delivery_id.encode())],
        )
        try:
            future.get(timeout=self._ack_timeout_s)
        except Exception as exc:  # every producer failure is worth another attempt
            raise DeliveryError(f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        """The producer is shared and closed by its owner."""


class RedisStreamSender:
    """XADD of the notification to a stream (approximately capped at ``maxlen``)."""

    def __init__(self, channel: RedisStreamChannel, client: redis.Redis) -> None:
        self.channel = channel
        self._client = client

    def send(self, notification: Notification) -> None:
        fields = {
            "delivery_id": notification.delivery_id,
            "event_id": str(notification.event.get("event_id", "")),
            "camera_id": str(notification.event.get("camera_id", "")),
            "status": notification.status,
            "notification": json.dumps(notification.model_dump(mode="json")),
        }
        try:
            self._client.xadd(self.channel.stream, fields, maxlen=self.channel.maxlen,
                              approximate=self.channel.maxlen is not None)
        except redis.RedisError as exc:
            raise DeliveryError(f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        """The client is shared and closed by its owner."""


class SenderFactory:
    """Builds the sender of a subscription's channel; one Kafka producer is shared, made on first need."""

    def __init__(self, settings: Settings, redis_client: redis.Redis) -> None:
        self._settings = settings
        self._redis = redis_client
        self._producer: KafkaProducer | None = None
        self._lock = threading.Lock()
        self._proxies = WebhookProxies(settings.deliver.webhook_proxy, settings.deliver.webhook_no_proxy)

    def __call__(self, sub: Subscription) -> Sender:
        channel = sub.channel
        if isinstance(channel, WebhookChannel):
            return WebhookSender(channel, self._settings.deliver.allow_private_networks,
                                 self._settings.deliver.max_response_bytes, proxies=self._proxies)
        if isinstance(channel, KafkaChannel):
            if not self._settings.kafka.bootstrap_servers:
                raise ValueError(f"subscription {sub.id!r} delivers to Kafka topic {channel.topic!r}, and no Kafka "
                                 "is configured (LINEWATCH_KAFKA__BOOTSTRAP_SERVERS)")
            with self._lock:
                if self._producer is None:
                    self._producer = make_producer(self._settings.kafka)
            return KafkaSender(channel, self._producer)
        if isinstance(channel, MqttChannel):
            from pipeline.delivery.mqtt import MqttSender

            return MqttSender(channel, sub.id, CameraStates(self._redis, self._settings.redis.key_prefix))
        if isinstance(channel, OpcUaChannel):
            from pipeline.delivery.opcua import OpcUaSender

            return OpcUaSender(channel, sub.id, CameraStates(self._redis, self._settings.redis.key_prefix))
        return RedisStreamSender(channel, self._redis)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=5)
