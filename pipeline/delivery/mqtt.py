"""MQTT channel: one message per event transition, and a retained state per camera for PLC gateways.

Event messages go to the subscription's topic template (``{line}``, ``{camera}``,
``{product_class}``, ``{status}``) at its QoS (1 by default), not retained. After each one the
camera's present state is published retained on the state topic::

    {"state": "defect", "event_id": "...", "camera_id": "...", "line_id": "...", "at": 1700000000.0, ...}
    {"state": "ok", "event_id": null, "last_event_id": "...", ...}

so a gateway that (re)connects reads the present at once. The state is the newest transition
known for the camera (``CameraStates``): a late or redriven old transition never overwrites it.

One paho client per subscription keeps the connection; its network thread reconnects with
backoff (``reconnect_delay_set``). A send waits for the connection and for the broker's
acknowledgement (PUBACK for QoS 1) within ``timeout_s``, or fails and is retried by the lane.
Delivery is at least once: a message whose acknowledgement was lost may arrive twice, with the
same ``delivery_id``.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from pipeline.delivery.channels import DeliveryError
from pipeline.delivery.store import CameraStates, CameraTransition
from pipeline.logging import get_logger
from schemas.subscriptions import MqttChannel, Notification

log = get_logger(__name__)

RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 30


def _level(value: object) -> str:
    """A topic level from message content: no separators or wildcards can leak into the topic."""
    text = str(value) if value not in (None, "") else "_"
    return text.replace("/", "_").replace("+", "_").replace("#", "_")


def render_topic(template: str, event: dict[str, Any], status: str) -> str:
    return template.format(line=_level(event.get("line_id")), camera=_level(event.get("camera_id")),
                           product_class=_level(event.get("product_class")), status=_level(status))


def state_payload(newest: CameraTransition, event: dict[str, Any]) -> bytes:
    defect = newest.status == "open"
    return json.dumps({
        "state": "defect" if defect else "ok",
        "event_id": newest.event_id if defect else None,
        "last_event_id": newest.event_id,
        "camera_id": event.get("camera_id"),
        "line_id": event.get("line_id"),
        "at": newest.at,
        "updated_at": time.time(),
    }).encode()


class MqttSender:
    def __init__(self, channel: MqttChannel, sub_id: str, states: CameraStates | None = None) -> None:
        self.channel = channel
        self.sub_id = sub_id
        self._states = states
        self._where = f"{channel.host}:{channel.port}"
        self._connected = threading.Event()
        client_id = channel.client_id or f"linewatch-{sub_id}-{secrets.token_hex(4)}"
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                                   clean_session=True)
        if channel.username:
            self._client.username_pw_set(channel.username, channel.password)
        if channel.tls:
            self._client.tls_set(ca_certs=channel.ca_file, certfile=channel.cert_file, keyfile=channel.key_file)
            if channel.tls_insecure:
                self._client.tls_insecure_set(True)
        self._client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.connect_async(channel.host, channel.port, channel.keepalive_s)
        self._client.loop_start()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            # Bad credentials and the like: said once per try, never with the password.
            log.warning("mqtt_connect_refused", subscription=self.sub_id, broker=self._where, reason=str(reason))
            return
        log.info("mqtt_connected", subscription=self.sub_id, broker=self._where)
        self._connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if self._connected.is_set():
            log.warning("mqtt_disconnected", subscription=self.sub_id, broker=self._where, reason=str(reason))
        self._connected.clear()

    def _publish(self, topic: str, payload: bytes, retain: bool, deadline: float) -> None:
        if not self._connected.is_set():
            raise DeliveryError(f"not connected to MQTT broker {self._where}")
        info = self._client.publish(topic, payload, qos=self.channel.qos, retain=retain)
        try:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
        except (ValueError, RuntimeError) as exc:
            raise DeliveryError(f"MQTT publish to {topic!r} on {self._where} failed: {exc}") from exc
        if not info.is_published():
            raise DeliveryError(f"no acknowledgement from MQTT broker {self._where} for {topic!r} "
                                f"within {self.channel.timeout_s} s")

    def send(self, notification: Notification) -> None:
        deadline = time.monotonic() + self.channel.timeout_s
        if not self._connected.wait(self.channel.timeout_s):
            raise DeliveryError(f"not connected to MQTT broker {self._where} within {self.channel.timeout_s} s")
        event = notification.event
        self._publish(render_topic(self.channel.topic, event, notification.status),
                      notification.model_dump_json().encode(), False, deadline)
        if not self.channel.retain_state or notification.test:
            return
        camera = str(event.get("camera_id", ""))
        mine = CameraTransition(_message_time(notification), notification.status, str(event.get("event_id", "")))
        newest = mine if self._states is None else self._states.advance(self.sub_id, camera, mine)[0]
        self._publish(render_topic(self.channel.state_template, event, notification.status),
                      state_payload(newest, event), True, deadline)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def _message_time(notification: Notification) -> float:
    event = notification.event
    return float(event["first_ts"] if notification.status == "open" else event["last_ts"])

