"""`linewatch subscriptions ...` and the `deliver` worker."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.cli import CommandError
from pipeline.cli.units import parse_duration
from pipeline.config import Settings, load_settings


def _settings(args: argparse.Namespace, kafka: bool = False) -> Settings:
    settings = load_settings(args.config)
    if not settings.redis.url:
        raise CommandError("no Redis configured (LINEWATCH_REDIS__URL): subscriptions are stored there")
    if kafka and not settings.kafka.bootstrap_servers:
        raise CommandError("no Kafka bootstrap servers configured (LINEWATCH_KAFKA__BOOTSTRAP_SERVERS)")
    return settings


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def cmd_deliver(args: argparse.Namespace) -> int:
    from pipeline.cli.stream_cmds import stop_on_signals, worker_health
    from workers.deliver import run_deliver

    settings = _settings(args, kafka=True)
    with worker_health(settings) as health:
        run_deliver(settings, stop_on_signals(), health=health)
    return 0


# -- subscriptions ------------------------------------------------------------------------------
def _subscription_from_args(args: argparse.Namespace) -> tuple[Any, str | None]:
    from pipeline.delivery.manage import with_webhook_secret
    from schemas.subscriptions import Subscription

    generated = None
    if args.from_file:
        path = Path(args.from_file)
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict):
            raise CommandError(f"{path}: expected a mapping with id, filters, channel")
        data.setdefault("id", args.id)
    else:
        channels = [c for c in (args.webhook, args.kafka_topic, args.redis_stream, args.mqtt, args.opcua) if c]
        if len(channels) != 1:
            raise CommandError("give exactly one channel: --webhook URL, --kafka-topic TOPIC, --redis-stream KEY, "
                               "--mqtt URL or --opcua ENDPOINT")
        channel: dict[str, Any]
        if args.webhook:
            channel = {"type": "webhook", "url": args.webhook, "secret": args.secret,
                       "media": args.media or "base64", "timeout_s": args.timeout, "max_attempts": args.attempts}
        elif args.kafka_topic:
            channel = {"type": "kafka", "topic": args.kafka_topic, "media": args.media or "base64"}
        elif args.redis_stream:
            channel = {"type": "redis_stream", "stream": args.redis_stream, "media": args.media or "none"}
        elif args.mqtt:
            channel = {"type": "mqtt", "url": args.mqtt, "media": args.media or "none", "qos": args.qos,
                       "timeout_s": args.timeout, "max_attempts": args.attempts, "client_id": args.client_id,
                       "state_topic": args.state_topic, "ca_file": args.ca_file, **_credentials(args)}
        else:
            channel = {"type": "opcua", "endpoint": args.opcua, "security": args.security,
                       "certificate": args.certificate, "private_key": args.private_key,
                       "server_certificate": args.server_certificate, "timeout_s": args.timeout,
                       "max_attempts": args.attempts, "cameras": _node_map(args.node or [], "--node"),
                       "lines": _node_map(args.line_node or [], "--line-node"), **_credentials(args)}
            if args.pulse_ms:
                channel |= {"reject_mode": "pulse", "pulse_ms": args.pulse_ms}
        channel = {k: v for k, v in channel.items() if v is not None}
        filters: dict[str, Any] = {"lines": args.line or [], "cameras": args.camera or [],
                                   "product_classes": args.product_class or [], "min_peak_score": args.min_score,
                                   "min_area": args.min_area}
        if args.status:
            filters["statuses"] = args.status
        elif args.mqtt or args.opcua:
            filters["statuses"] = ["open", "closed"]  # the PLC must see the defect end, too
        data, generated = with_webhook_secret({"id": args.id, "filters": filters, "channel": channel,
                                               "rate_limit_s": parse_duration(args.rate_limit) if args.rate_limit
                                               else None})
    try:
        return Subscription.model_validate(data), generated
    except ValidationError as exc:
        raise CommandError(f"invalid subscription: {exc}") from None


PASSWORD_ENV = "LINEWATCH_SUBSCRIPTION_PASSWORD"


def _credentials(args: argparse.Namespace) -> dict[str, Any]:
    """Username and password from flags, the password also from $LINEWATCH_SUBSCRIPTION_PASSWORD
    (kept out of the process list); a password in an MQTT URL is moved out of it by the schema."""
    password = args.password or os.environ.get(PASSWORD_ENV) or None
    return {"username": args.username, "password": password}


def _node_map(specs: list[str], flag: str) -> dict[str, dict[str, str]]:
    """``KEY.FIELD=NODEID`` flags (``press-1.reject=ns=2;s=Press1.Reject``) as {key: {field: node id}}."""
    out: dict[str, dict[str, str]] = {}
    for spec in specs:
        target, sep, node_id = spec.partition("=")
        key, dot, field = target.rpartition(".")
        if not (sep and dot and key and node_id) or field not in ("reject", "event_id", "peak_score", "count"):
            raise CommandError(f"{flag} {spec!r}: expected NAME.FIELD=NODEID with FIELD one of reject, event_id, "
                               "peak_score, count")
        out.setdefault(key, {})[field] = node_id
    return out


@contextlib.contextmanager
def _stores(settings: Settings) -> Iterator[tuple[Any, Any, Any]]:
    """(Redis client, subscription store, delivery ledger) for one command; the client closes after."""
    from pipeline.delivery.store import DeliveryLedger, SubscriptionStore
    from pipeline.redis_store import connect

    client = connect(settings.redis)
    prefix = settings.redis.key_prefix
    try:
        ledger = DeliveryLedger(client, prefix, settings.deliver.ledger_ttl_s, settings.deliver.max_dead_letters)
        yield client, SubscriptionStore(client, prefix), ledger
    finally:
        client.close()


def _get(store: Any, sub_id: str) -> Any:
    try:
        return store.get(sub_id)
    except KeyError:
        raise CommandError(f"no subscription {sub_id!r} (see `linewatch subscriptions list`)") from None


def cmd_add(args: argparse.Namespace) -> int:
    from pipeline.delivery.manage import add_subscription

    settings = _settings(args)
    sub, generated = _subscription_from_args(args)
    with _stores(settings) as (_, store, _):
        add_subscription(store, sub, settings)
    _out(f"added subscription {sub.id} ({sub.channel.type})")
    if generated:
        _out(f"signing secret (shown once, keep it with the receiver): {generated}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from pipeline.delivery.manage import subscription_rows

    settings = _settings(args)
    with _stores(settings) as (_, store, ledger):
        rows = subscription_rows(store, ledger)
    if args.json:
        _out(json.dumps(rows, indent=2))
        return 0
    if not rows:
        _out("no subscriptions")
    for row in rows:
        ch = row["channel"]
        target = ch.get("url") or ch.get("topic") or ch.get("stream") or ch.get("endpoint")
        flt = {k: v for k, v in row["filters"].items() if v not in ([], None)}
        rate = f" rate-limit={row['rate_limit_s']}s" if row["rate_limit_s"] else ""
        _out(f"{row['id']}  {ch['type']} {target}  filters={json.dumps(flt)}{rate}  "
             f"dead-letters={row['dead_letters']}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    settings = _settings(args)
    with _stores(settings) as (_, store, ledger):
        if not store.remove(args.id):
            raise CommandError(f"no subscription {args.id!r}")
        ledger.forget(args.id)
    _out(f"removed subscription {args.id}")
    return 0


@contextlib.contextmanager
def _subscription_sender(settings: Settings, sub_id: str) -> Iterator[tuple[Any, Any, Any]]:
    """(subscription, its sender, the ledger) for one command; everything closed afterwards."""
    from pipeline.delivery.channels import SenderFactory

    with _stores(settings) as (client, store, ledger):
        sub = _get(store, sub_id)
        factory = SenderFactory(settings, client)
        try:
            sender = factory(sub)
            try:
                yield sub, sender, ledger
            finally:
                sender.close()
        finally:
            factory.close()


def cmd_test(args: argparse.Namespace) -> int:
    from pipeline.delivery.manage import send_test

    settings = _settings(args)
    with _subscription_sender(settings, args.id) as (sub, sender, _):
        error = send_test(sub, sender, settings)
    if error:
        _out(f"test delivery to {args.id} FAILED: {error}")
        return 1
    _out(f"test delivery to {args.id} accepted")
    return 0


def cmd_dead_letters(args: argparse.Namespace) -> int:
    from pipeline.delivery.manage import dead_letter_rows

    settings = _settings(args)
    with _stores(settings) as (_, store, ledger):
        _get(store, args.id)
        rows = dead_letter_rows(ledger, args.id)
    if args.json:
        _out(json.dumps(rows, indent=2))
        return 0
    if not rows:
        _out(f"no dead letters for {args.id}")
    for row in rows:
        _out(f"{row['delivery_id']}  camera={row['camera_id']}  attempts={row['attempts']}  error={row['error']}")
    return 0


def cmd_redrive(args: argparse.Namespace) -> int:
    from pipeline.delivery.manage import redrive

    settings = _settings(args)
    with _subscription_sender(settings, args.id) as (sub, sender, ledger):
        result = redrive(sub, ledger, sender, settings, args.delivery or None)
    _out(f"redrive {args.id}: {len(result.delivered)} delivered, {len(result.failed)} still failing")
    for did, error in result.failed.items():
        _out(f"  {did}: {error}")
    return 1 if result.failed else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deliver", help="run a delivery worker: defect events -> subscriptions")
    p.set_defaults(func=cmd_deliver)

    p = sub.add_parser("subscriptions", help="manage alert subscriptions (stored in Redis)")
    subs = p.add_subparsers(dest="subscriptions_command", required=True, metavar="ACTION")

    a = subs.add_parser("add", help="add a subscription")
    a.add_argument("id", help="subscription id (letters, digits, _ . -)")
    a.add_argument("--from-file", help="YAML/JSON file with filters, channel and rate_limit_s")
    a.add_argument("--webhook", metavar="URL", help="POST events to this URL")
    a.add_argument("--secret", help="webhook signing secret (default: generated and printed once)")
    a.add_argument("--media", choices=["base64", "url", "none"], help="how mask and thumbnail travel")
    a.add_argument("--timeout", type=float, default=5.0,
                   help="deadline of one webhook/MQTT/OPC UA attempt in seconds (default 5)")
    a.add_argument("--attempts", type=int, default=5,
                   help="webhook/MQTT/OPC UA attempts before dead-lettering (default 5)")
    a.add_argument("--kafka-topic", metavar="TOPIC", help="publish events to this Kafka topic")
    a.add_argument("--redis-stream", metavar="KEY", help="append events to this Redis stream")
    a.add_argument("--mqtt", metavar="URL",
                   help="publish to MQTT: mqtt[s]://[user:pass@]host[:port]/topic/{line}/{camera} "
                        "(templates {line} {camera} {product_class} {status})")
    a.add_argument("--qos", type=int, choices=[0, 1, 2], default=1, help="MQTT QoS (default 1)")
    a.add_argument("--client-id", help="MQTT client id (default: linewatch-<id>-<random>)")
    a.add_argument("--state-topic", help="MQTT retained per-camera state topic (default: <topic>/state)")
    a.add_argument("--ca-file", help="CA bundle for mqtts://")
    a.add_argument("--opcua", metavar="ENDPOINT", help="write OPC UA nodes: opc.tcp://host:4840")
    a.add_argument("--node", action="append", metavar="CAMERA.FIELD=NODEID",
                   help="OPC UA node of a camera, FIELD: reject, event_id, peak_score, count (repeatable)")
    a.add_argument("--line-node", action="append", metavar="LINE.FIELD=NODEID",
                   help="OPC UA node of a line, for its cameras without --node (repeatable)")
    a.add_argument("--security", choices=["None", "Basic256Sha256_Sign", "Basic256Sha256_SignAndEncrypt"],
                   default="None", help="OPC UA security policy and mode (default None)")
    a.add_argument("--certificate", help="OPC UA client certificate (DER/PEM)")
    a.add_argument("--private-key", help="OPC UA client private key (PEM)")
    a.add_argument("--server-certificate", help="OPC UA server certificate to trust")
    a.add_argument("--pulse-ms", type=int, help="OPC UA reject as a pulse of this width (default: latched)")
    a.add_argument("--username", help="MQTT/OPC UA user name")
    a.add_argument("--password", help=f"MQTT/OPC UA password (better: ${PASSWORD_ENV})")
    a.add_argument("--line", action="append", help="only this line (repeatable)")
    a.add_argument("--camera", action="append", help="camera id or glob, e.g. 'press-*' (repeatable)")
    a.add_argument("--class", dest="product_class", action="append", help="product class (repeatable)")
    a.add_argument("--min-score", type=float, help="minimum peak score")
    a.add_argument("--min-area", type=int, help="minimum total defect area in pixels")
    a.add_argument("--status", action="append", choices=["open", "closed"],
                   help="event transitions to send (default: open)")
    a.add_argument("--rate-limit", metavar="DURATION", help="at most one message per camera per interval (60s, 5m)")
    a.set_defaults(func=cmd_add)

    a = subs.add_parser("list", help="list subscriptions")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_list)

    a = subs.add_parser("remove", help="remove a subscription with its dead letters")
    a.add_argument("id")
    a.set_defaults(func=cmd_remove)

    a = subs.add_parser("test", help="send a synthetic test event through the subscription's channel")
    a.add_argument("id")
    a.set_defaults(func=cmd_test)

    a = subs.add_parser("dead-letters", help="deliveries that failed every attempt")
    a.add_argument("id")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_dead_letters)

    a = subs.add_parser("redrive", help="deliver dead letters again")
    a.add_argument("id")
    a.add_argument("--delivery", action="append", help="only this delivery id (repeatable; default: all)")
    a.set_defaults(func=cmd_redrive)
