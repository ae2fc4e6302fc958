"""Security checks of issue 15 not covered elsewhere. Covered already: the API refuses every route
without a valid token (test_api.py), signatures verify and tampering is refused (test_deliver.py),
the SSRF guard against every non-global address and DNS rebinding (test_delivery_hardening.py,
test_deliver.py), frame limits before decoding (test_frame_checks.py, test_hostile_frames_worker.py).
Here: the 5-minute signature window, no unsafe deserialisation, connection settings reaching every
client, and no secret in any worker log line or on the console of a full `linewatch run`."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis

from pipeline.bus import make_consumer, make_producer
from pipeline.config import ConfigError, KafkaSettings, RedisSettings, load_settings
from pipeline.delivery.signing import SignatureError, sign, verify
from pipeline.delivery.store import SubscriptionStore
from pipeline.embedded import EmbeddedRedis, free_port
from pipeline.imaging import encode_jpeg
from pipeline.redis_store import connect
from schemas.frames import FRAME_HEADER_KEY, FrameHeader
from tests.conftest import REPO_ROOT
from tests.test_deliver import webhook
from tests.webhook_receiver import WebhookReceiver

CODE_DIRS = ("pipeline", "schemas", "workers")


def _sources() -> list[tuple[Path, ast.AST]]:
    out = []
    for d in CODE_DIRS:
        for path in sorted((REPO_ROOT / d).rglob("*.py")):
            out.append((path, ast.parse(path.read_text(), str(path))))
    return out


def _call_name(node: ast.Call) -> str:
    f = node.func
    parts = []
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    if isinstance(f, ast.Name):
        parts.append(f.id)
    return ".".join(reversed(parts))


# -- webhook signatures ------------------------------------------------------------------------------
def test_a_signature_older_than_five_minutes_is_refused() -> None:
    secret, body = "a-webhook-secret-0123", b'{"event": 1}'
    now = int(time.time())
    assert verify(secret, sign(secret, body, timestamp=now - 280), body) > 0
    with pytest.raises(SignatureError, match="tolerance"):
        verify(secret, sign(secret, body, timestamp=now - 310), body)
    with pytest.raises(SignatureError, match="tolerance"):  # nor from the future
        verify(secret, sign(secret, body, timestamp=now + 310), body)


# -- no unsafe deserialisation -------------------------------------------------------------------------
def test_no_pickle_eval_or_unsafe_yaml_in_the_code() -> None:
    banned = {"pickle.loads", "pickle.load", "marshal.loads", "eval", "exec", "yaml.load", "yaml.unsafe_load",
              "yaml.full_load", "dill.loads", "torch.load", "numpy.load", "np.load"}
    found = []
    for path, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _call_name(node) in banned:
                # torch/np.load are allowed only with their safe switches (weights_only / allow_pickle off).
                kws = {k.arg: k.value for k in node.keywords}
                if _call_name(node) == "torch.load" and isinstance(kws.get("weights_only"), ast.Constant) \
                        and kws["weights_only"].value is True:
                    continue
                if _call_name(node) in ("np.load", "numpy.load") and not (
                        isinstance(kws.get("allow_pickle"), ast.Constant) and kws["allow_pickle"].value):
                    continue
                found.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {_call_name(node)}")
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n in ("pickle", "marshal", "shelve", "dill", "cPickle") for n in names):
                    found.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} imports {names}")
    assert not found, found


def test_a_yaml_config_with_python_tags_is_refused_without_running_them(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    cfg = tmp_path / "site.yaml"
    cfg.write_text(f"kafka: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(cfg)
    assert not marker.exists()


def test_a_pickled_frame_header_is_refused_as_data() -> None:
    import pickle

    payload = pickle.dumps({"camera_id": "cam-1"})
    with pytest.raises(ValueError):
        FrameHeader.from_headers([(FRAME_HEADER_KEY, payload)])


# -- connection settings reach every client ------------------------------------------------------------
def test_kafka_sasl_and_tls_settings_reach_producer_and_consumer(tmp_path: Path) -> None:
    kafka = KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}", security_protocol="SASL_PLAINTEXT",
                          sasl_mechanism="PLAIN", sasl_username="lw", sasl_password="kafka-pw-0123",
                          ssl_cafile=str(tmp_path / "ca.pem"))
    # A fixed api_version: the clients do not probe the (absent) broker on construction.
    producer = make_producer(kafka, api_version=(2, 5))
    consumer = make_consumer(kafka, None, [], api_version=(2, 5))
    try:
        for config in (producer.config, consumer.config):
            assert config["security_protocol"] == "SASL_PLAINTEXT"
            assert config["sasl_mechanism"] == "PLAIN"
            assert config["sasl_plain_username"] == "lw" and config["sasl_plain_password"] == "kafka-pw-0123"
            assert config["ssl_cafile"] == str(tmp_path / "ca.pem")
    finally:
        producer.close(timeout=1)
        consumer.close()


def test_every_kafka_and_redis_client_is_built_from_the_settings() -> None:
    """Clients built anywhere else would miss SASL/TLS/auth: each construction passes the settings'
    client options (Kafka) or goes through `redis_store.connect` (Redis, TLS and auth in the URL)."""
    bad = []
    for path, tree in _sources():
        rel = str(path.relative_to(REPO_ROOT))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = _call_name(node).rsplit(".", 1)[-1]
            if rel == "pipeline/embedded.py":
                continue  # the embedded servers' own readiness probes, plaintext on loopback by design
            if name in ("KafkaProducer", "KafkaConsumer", "KafkaAdminClient"):
                splat = [k.value for k in node.keywords if k.arg is None]
                text = " ".join(ast.unparse(s) for s in splat)
                if "client_kwargs()" not in text and rel != "pipeline/bus.py":
                    bad.append(f"{rel}:{node.lineno} {name}")
            if _call_name(node) in ("redis.Redis", "redis.Redis.from_url", "Redis.from_url", "redis.from_url",
                                    "redis.StrictRedis") and rel != "pipeline/redis_store.py":
                bad.append(f"{rel}:{node.lineno} {_call_name(node)}")
    assert not bad, bad
    # bus.py builds its clients from client_kwargs() too.
    bus = (REPO_ROOT / "pipeline" / "bus.py").read_text()
    assert bus.count("client_kwargs()") >= 3


def test_redis_auth_in_the_url_reaches_the_client() -> None:
    with EmbeddedRedis() as server:
        admin = redis.Redis(host="127.0.0.1", port=server.port)
        admin.config_set("requirepass", "redis-pw-0123")
        admin.close()
        client = connect(RedisSettings(url=f"redis://:redis-pw-0123@127.0.0.1:{server.port}/0"))
        assert client.ping()
        client.close()
        anon = connect(RedisSettings(url=server.url))
        with pytest.raises(redis.AuthenticationError):
            anon.ping()
        anon.close()


# -- no secret in a log line or an error message ---------------------------------------------------------
def test_configured_secrets_and_url_credentials_never_reach_a_log_line() -> None:
    """In a fresh process (the scrubbing is process-wide): settings' secrets, wherever a log event
    carries them (message, nested value, exception text), and any URL's credentials come out as ***."""
    code = (
        "from pipeline.config import load_settings\n"
        "from pipeline.logging import configure_logging, get_logger\n"
        "configure_logging('info', json=True)\n"
        "s = load_settings()\n"
        "log = get_logger('t')\n"
        "log.info('connect', options={'sasl_plain_password': s.kafka.sasl_password}, token=[s.api.token])\n"
        "log.info('peer', url='https://bob:hunter2-url@example.com/x', hook='https://tok3n-only@example.com/')\n"
        "try:\n"
        "    raise ConnectionError(f'cannot reach {s.redis.url}')\n"
        "except ConnectionError:\n"
        "    log.exception('redis_down')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINEWATCH_")}
    env.update(LINEWATCH_KAFKA__SASL_PASSWORD="kafka-pw-SECRET-1", LINEWATCH_API__TOKEN="api-token-SECRET-2",
               LINEWATCH_REDIS__URL="redis://lw:redis-pw-SECRET-3@127.0.0.1:1/0")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env,
                          cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 3 and "redis_down" in lines[2] and "ConnectionError" in lines[2], proc.stderr
    for secret in ("kafka-pw-SECRET-1", "api-token-SECRET-2", "redis-pw-SECRET-3", "hunter2-url", "tok3n-only"):
        assert secret not in proc.stderr, proc.stderr
    # What is left still says what happened: who, where.
    assert "redis://lw:***@127.0.0.1:1/0" in lines[2] and "https://bob:***@example.com/x" in lines[1]
    assert '"token": ["***"]' in lines[0], lines[0]


def test_a_cli_error_quoting_the_redis_url_hides_its_password() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINEWATCH_")}
    env["LINEWATCH_REDIS__URL"] = f"redis://:redis-pw-SECRET-4@127.0.0.1:{free_port()}/0"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "events", "list"], capture_output=True,
                          text=True, timeout=60, env=env, cwd=REPO_ROOT)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "cannot reach Redis at redis://:***@127.0.0.1:" in proc.stderr, proc.stderr
    assert "redis-pw-SECRET-4" not in proc.stdout + proc.stderr


# -- no secret in the logs or on the console of a full run -----------------------------------------
def test_no_secret_appears_in_any_worker_log_or_on_the_console_of_a_full_run(tmp_path: Path) -> None:
    api_token = "api-token-SECRET-" + uuid.uuid4().hex
    webhook_secret = "webhook-SECRET-" + uuid.uuid4().hex
    redis_pw = "redis-pw-SECRET-" + uuid.uuid4().hex[:12]
    kafka_pw = "kafka-pw-SECRET-" + uuid.uuid4().hex[:12]
    stream = tmp_path / "stream"
    stream.mkdir()
    rng = np.random.default_rng(5)
    for i in range(4):
        (stream / f"f{i}.jpg").write_bytes(encode_jpeg(rng.integers(0, 256, (72, 96, 3), dtype=np.uint8)))
    prefix = f"sec-{uuid.uuid4().hex[:8]}"
    with EmbeddedRedis() as server, WebhookReceiver(webhook_secret) as rx:
        admin = redis.Redis(host="127.0.0.1", port=server.port)
        admin.config_set("requirepass", redis_pw)
        admin.close()
        redis_url = f"redis://:{redis_pw}@127.0.0.1:{server.port}/0"
        client = connect(RedisSettings(url=redis_url))
        SubscriptionStore(client, prefix).add(webhook("qa", rx.url, channel={"secret": webhook_secret}))
        client.close()
        cfg = tmp_path / "site.yaml"
        cfg.write_text(
            "engine: {backbone: ViT-S-32, pretrained: random, precision: fp32}\n"
            # The SASL password is configured (PLAINTEXT broker: the clients carry it unused).
            f"kafka: {{sasl_password: '{kafka_pw}'}}\n"
            f"redis: {{url: '{redis_url}', key_prefix: {prefix}}}\n"
            f"api: {{token: '{api_token}', port: {free_port()}}}\n"
            "deliver: {allow_private_networks: true}\n"
            # Live, not --replay: replay events reach subscriptions only when a session opts in.
            "scoring: {staleness_s: null}\n"
            "alert: {quiet_s: 0.5, silence_s: 0.5, k: 1, n: 1, default_threshold: -1.0}\n"
            f"cameras:\n  - {{id: cam-1, product_class: ball_screw, source: '{stream}'}}\n"
        )
        run_dir = tmp_path / "run"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LINEWATCH_")}
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "--config", str(cfg), "run",
                               "--exit-when-done", "--run-dir", str(run_dir), "--data-dir", str(tmp_path / "data")],
                              capture_output=True, text=True, timeout=300, env=env, cwd=REPO_ROOT)
        logs = {p.name: p.read_text(errors="replace") for p in run_dir.glob("*.log")}
        shown = "".join(f"\n--- {n}\n{t[-1500:]}" for n, t in logs.items())
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + shown
        assert {"capture.log", "score.log", "alert.log", "deliver.log", "api.log"} <= set(logs), sorted(logs)
        # The secrets were in use: the event reached the subscriber, signed with its secret.
        assert rx.accepted_keys, proc.stdout[-2000:] + shown
    for name, text in logs.items():
        for secret in (api_token, webhook_secret, redis_pw, kafka_pw):
            assert secret not in text, f"{secret[:12]}... appears in {name}"
    # The console (often a log file or journald: here a pipe) shows the join hint and the dashboard link
    # without credentials; the join file, readable by its owner only, holds them.
    console = proc.stdout + proc.stderr
    assert "export LINEWATCH_REDIS__URL=" in console and "dashboard: " in console, console[-2000:]
    for secret in (api_token, webhook_secret, redis_pw, kafka_pw):
        assert secret not in console, f"{secret[:12]}... appears on the console"
    site_env = tmp_path / "data" / "site.env"
    assert site_env.stat().st_mode & 0o777 == 0o600
    assert redis_url in site_env.read_text() and api_token in site_env.read_text()
