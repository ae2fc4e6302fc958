"""Latency from a score crossing into an open event to the PLC-side signal, on loopback.

    python bench/plc_latency.py [--events 200] [--redis-url redis://127.0.0.1:6379/0] [--mqtt 127.0.0.1:1883]

Per event: t0 just before the alert stage's pure step (``debounce.step`` + ``build_event``) is fed
the score that opens the event; the event then goes through the deliver dispatcher (per-subscription
lanes, Redis ledger) to two subscriptions at once:

- MQTT (paho, QoS 1) to the Mosquitto at ``--mqtt``: t1 when a paho subscriber receives the message;
- OPC UA (asyncua, security None, latched reject) to an asyncua server started here: t1 when the
  server applies the write of the reject node (its PostWrite callback).

Then the event is closed (reject back to false) before the next one. Not included: the Kafka hop
between the alert and deliver workers (defects topic), which a deployment adds (see
bench/pipeline.py for broker latencies).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np

sys.path[0] = str(Path(__file__).resolve().parents[1])

from pipeline import imaging
from pipeline.alerting.debounce import CameraState, step
from pipeline.alerting.render import build_event
from pipeline.config import AlertSettings, DeliverSettings, RedisSettings, Settings
from pipeline.delivery.channels import SenderFactory
from pipeline.delivery.dispatch import Dispatcher
from pipeline.delivery.store import DeliveryLedger, ReplayAlerts
from pipeline.redis_store import connect
from schemas.frames import FrameRef
from schemas.scores import ScoreMessage
from schemas.subscriptions import Subscription
from tests.mqtt_peers import MqttCollector
from tests.opcua_peer import OpcUaServer, nodes

ALERT = AlertSettings(k=1, n=1, quiet_s=1.0, min_region_area=4)


def crossing_score(seq: int, ts: float) -> ScoreMessage:
    heat = np.zeros((48, 64), np.float32)
    heat[10:20, 10:30] = 0.9
    png, lo, hi = imaging.quantize_map(heat, 16)
    return ScoreMessage(
        frame=FrameRef(camera_id="press-1", line_id="line-3", product_class="bolt", seq=seq, capture_ts=ts,
                       width=64, height=48),
        image_score=0.9, anomaly_map_png=png, map_min=lo, map_max=hi,
        thumbnail_jpeg=imaging.encode_jpeg(np.full((24, 32, 3), 100, np.uint8)),
        model_fingerprint="bench", method="winclip", latency_ms=1.0, scored_ts=ts)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(name: str, ms: list[float]) -> str:
    return (f"| {name} | {len(ms)} | {statistics.median(ms):.1f} | {pct(ms, 0.95):.1f} | {pct(ms, 0.99):.1f} | "
            f"{max(ms):.1f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=200)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--mqtt", default="127.0.0.1:1883", help="host:port of a Mosquitto")
    args = ap.parse_args()
    mqtt_host, mqtt_port = args.mqtt.rsplit(":", 1)
    run = uuid.uuid4().hex[:8]
    redis_settings = RedisSettings(url=args.redis_url, key_prefix=f"bench-plc-{run}")
    settings = Settings(redis=redis_settings, deliver=DeliverSettings())
    client = connect(redis_settings)
    topic = f"bench-{run}"
    stop = threading.Event()
    with OpcUaServer(prefixes=("Press1",)) as plc, \
            MqttCollector(mqtt_host, int(mqtt_port), f"{topic}/+/open") as rx:
        d = Dispatcher(settings.deliver, DeliveryLedger(client, redis_settings.key_prefix),
                       ReplayAlerts(client, redis_settings.key_prefix), SenderFactory(settings, client), stop)
        d.set_subscriptions({
            "mqtt": Subscription.model_validate({"id": "mqtt", "channel": {
                "type": "mqtt", "url": f"mqtt://{args.mqtt}/{topic}/{{camera}}/{{status}}", "retain_state": False}}),
            "opcua": Subscription.model_validate({"id": "opcua", "channel": {
                "type": "opcua", "endpoint": plc.endpoint, "cameras": {"press-1": nodes("Press1")}}}),
        })
        mqtt_ms: list[float] = []
        opcua_ms: list[float] = []
        offset = 0
        ts = 1_000_000.0
        warmup = 3
        for i in range(args.events + warmup):
            state = CameraState("press-1")
            seq = i * 10
            score = crossing_score(seq, ts)
            t0 = time.perf_counter()
            (opened,) = step(state, score, 0.5, ALERT, received_at=ts)
            event = build_event(opened.event, "open", ALERT.min_region_area)
            d.submit(("defects", 0), offset, event)
            rx.wait_for(lambda msgs, eid=event.event_id: any(m.payload["delivery_id"] == eid for m in msgs))
            t_mqtt = next(m.received for m in rx.messages if m.payload["delivery_id"] == event.event_id)
            t_opc = plc.wait_write("Press1.EventId", event.event_id)
            if i >= warmup:
                mqtt_ms.append((t_mqtt - t0) * 1000)
                opcua_ms.append((t_opc - t0) * 1000)
            closed = build_event(opened.event, "closed", ALERT.min_region_area)
            d.submit(("defects", 0), offset + 1, closed)
            offset += 2
            ts += 10.0
            deadline = time.monotonic() + 30
            while d.tracker.committable().get(("defects", 0)) != offset:
                if time.monotonic() > deadline:
                    raise SystemExit("waiting for the closing deliveries timed out")
                time.sleep(0.002)
        stop.set()
        d.close()
    for key in client.scan_iter(f"{redis_settings.key_prefix}:*"):
        client.delete(key)
    client.close()
    print(f"machine: {platform.machine()}, {platform.processor() or '?'}, python {platform.python_version()}; "
          f"{args.events} events after {warmup} warm-up")
    print("| path | n | p50 ms | p95 ms | p99 ms | max ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(summary("score -> MQTT message received", mqtt_ms))
    print(summary("score -> OPC UA reject node written", opcua_ms))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
