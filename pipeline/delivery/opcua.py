"""OPC UA channel: per event transition, write the camera's nodes on a server (a PLC, a SCADA gateway).

For the camera (or, when the camera has no mapping, its line) the subscription names up to four
nodes, written in one Write request:

- ``reject`` (Boolean): true when an event opens; ``latch`` keeps it true until the event closes,
  ``pulse`` sets it false again after ``pulse_ms``;
- ``event_id`` (String), ``peak_score`` (Float/Double, updated again at close) and ``count``
  (an integer: events opened so far, incremented once per event: a retry that finds its own event
  id already written does not count it again).

Values are written with the node's own data type (read once per node). A transition older than the
newest one known for the camera (a redriven dead letter) only counts, never flips the reject signal.
The client runs on its own event loop thread and keeps its session; any failure drops the session,
and the next attempt connects afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from asyncua import Client, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

from pipeline.delivery.channels import DeliveryError
from pipeline.delivery.store import CameraStates, CameraTransition
from pipeline.logging import get_logger
from schemas.subscriptions import Notification, OpcUaChannel, OpcUaNodes

log = get_logger(__name__)

_MODES = {"Basic256Sha256_Sign": ua.MessageSecurityMode.Sign,
          "Basic256Sha256_SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt}
_INTEGER_TYPES = {ua.VariantType.SByte, ua.VariantType.Byte, ua.VariantType.Int16, ua.VariantType.UInt16,
                  ua.VariantType.Int32, ua.VariantType.UInt32, ua.VariantType.Int64, ua.VariantType.UInt64}


class OpcUaSender:
    def __init__(self, channel: OpcUaChannel, sub_id: str, states: CameraStates | None = None) -> None:
        self.channel = channel
        self.sub_id = sub_id
        self._states = states
        self._client: Client | None = None
        self._types: dict[str, ua.VariantType] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"opcua-{sub_id}", daemon=True)
        self._thread.start()

    # -- plumbing ----------------------------------------------------------------------------------
    def _run(self, coro: Any, timeout: float) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()
            self._drop()
            raise DeliveryError(f"OPC UA server {self.channel.endpoint}: no answer within {timeout} s") from None

    async def _connect(self) -> Client:
        if self._client is not None:
            return self._client
        ch = self.channel
        client = Client(ch.endpoint, timeout=ch.timeout_s)
        if ch.username:
            client.set_user(ch.username)
        if ch.password:
            client.set_password(ch.password)
        if ch.security != "None":
            await client.set_security(SecurityPolicyBasic256Sha256, ch.certificate or "", ch.private_key or "",
                                      server_certificate=ch.server_certificate, mode=_MODES[ch.security])
        await client.connect()
        self._client = client
        log.info("opcua_connected", subscription=self.sub_id, endpoint=ch.endpoint, security=ch.security)
        return client

    async def _disconnect(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):  # the session is being dropped anyway
                await client.disconnect()

    def _drop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._disconnect(), self._loop)

    async def _typed(self, client: Client, node_id: str, value: Any) -> tuple[Any, ua.DataValue]:
        node = client.get_node(node_id)
        vtype = self._types.get(node_id)
        if vtype is None:
            vtype = self._types[node_id] = await node.read_data_type_as_variant_type()
        if vtype in _INTEGER_TYPES:
            value = int(value)
        elif vtype in (ua.VariantType.Float, ua.VariantType.Double):
            value = float(value)
        elif vtype == ua.VariantType.Boolean:
            value = bool(value)
        elif vtype == ua.VariantType.String:
            value = str(value)
        # No timestamps: many PLC servers refuse writes that carry them.
        return node, ua.DataValue(ua.Variant(value, vtype))

    async def _write(self, client: Client, values: dict[str, Any]) -> None:
        if not values:
            return
        pairs = [await self._typed(client, node_id, value) for node_id, value in values.items()]
        await client.write_values([n for n, _ in pairs], [v for _, v in pairs])

    # -- one transition ----------------------------------------------------------------------------
    async def _apply(self, nodes: OpcUaNodes, notification: Notification, current: bool) -> None:
        client = await self._connect()
        event = notification.event
        event_id = str(event.get("event_id", ""))
        values: dict[str, Any] = {}
        if notification.status == "open":
            already = False
            if nodes.event_id:
                already = await client.get_node(nodes.event_id).read_value() == event_id
            if nodes.count and not already:
                values[nodes.count] = int(await client.get_node(nodes.count).read_value() or 0) + 1
            if current:
                if nodes.event_id:
                    values[nodes.event_id] = event_id
                if nodes.peak_score:
                    values[nodes.peak_score] = float(event.get("peak_score", 0.0))
                if nodes.reject:
                    values[nodes.reject] = True
            await self._write(client, values)
            if current and nodes.reject and self.channel.reject_mode == "pulse":
                await asyncio.sleep(self.channel.pulse_ms / 1000)
                await self._write(client, {nodes.reject: False})
            return
        if not current:
            return
        if nodes.peak_score:
            values[nodes.peak_score] = float(event.get("peak_score", 0.0))
        if nodes.reject and self.channel.reject_mode == "latch":
            values[nodes.reject] = False
        await self._write(client, values)

    async def _apply_or_drop(self, nodes: OpcUaNodes, notification: Notification, current: bool) -> None:
        try:
            await self._apply(nodes, notification, current)
        except Exception:
            await self._disconnect()
            raise

    def send(self, notification: Notification) -> None:
        event = notification.event
        camera, line = str(event.get("camera_id", "")), str(event.get("line_id", ""))
        nodes = self.channel.nodes_for(camera, line)
        if nodes is None:
            log.info("opcua_no_nodes_for_camera", subscription=self.sub_id, camera=camera, line=line)
            return
        current = True
        if self._states is not None and not notification.test:
            at = float(event["first_ts"] if notification.status == "open" else event["last_ts"])
            _, current = self._states.advance(self.sub_id, camera, CameraTransition(
                at, notification.status, str(event.get("event_id", ""))))
        timeout = self.channel.timeout_s + (self.channel.pulse_ms / 1000 if self.channel.reject_mode == "pulse" else 0)
        try:
            self._run(self._apply_or_drop(nodes, notification, current), timeout)
        except DeliveryError:
            raise
        except (ua.UaStatusCodeError, ua.UaError) as exc:
            raise DeliveryError(f"OPC UA server {self.channel.endpoint}: {type(exc).__name__}: {exc}") from exc
        except (TimeoutError, OSError, ConnectionError) as exc:
            raise DeliveryError(f"OPC UA server {self.channel.endpoint} unreachable: "
                                f"{type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            raise DeliveryError(f"OPC UA server {self.channel.endpoint}: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._disconnect(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
