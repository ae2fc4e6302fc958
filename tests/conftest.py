"""Shared fixtures: one real tansu broker and one real Redis per session, isolated per test by prefix."""

from __future__ import annotations

import os
import re
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import structlog

from pipeline.config import KafkaSettings, RedisSettings
from pipeline.embedded import EmbeddedBroker, EmbeddedRedis
from pipeline.redis_store import connect

REPO_ROOT = Path(__file__).resolve().parents[1]


def _unique(request: pytest.FixtureRequest) -> str:
    # Readable in broker/Redis listings, unique across tests and reruns.
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name)[:40].strip("-")
    return f"t-{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(autouse=True)
def _restore_signal_handlers() -> Iterator[None]:
    """CLI commands install SIGINT/SIGTERM handlers; later tests (and Ctrl-C) need the defaults back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture(autouse=True)
def _restore_log_config() -> Iterator[None]:
    """A CLI command run in-process configures logging (``--log-level warning``): a later test's
    ``capture_logs`` must still see info events."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture
def start_background() -> Iterator[Callable[..., Any]]:
    """Start worker functions in threads (``tests.streaming_helpers.Background``); any still running
    are stopped after the test, so no worker polls into the next one."""
    from tests.streaming_helpers import Background

    started: list[Background] = []

    def start(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Background:
        worker = Background(fn, *args, **kwargs).start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop.set()
    for worker in started:
        worker.thread.join(30)


@pytest.fixture(scope="session")
def broker() -> Iterator[str]:
    with EmbeddedBroker() as embedded:
        yield embedded.bootstrap_servers


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    with EmbeddedRedis() as embedded:
        yield embedded.url


@pytest.fixture
def kafka_settings(broker: str, request: pytest.FixtureRequest) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=broker,
        topic_prefix=_unique(request),
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        partitions=2,
        request_timeout_ms=10_000,
    )


@pytest.fixture
def redis_settings(redis_server: str, request: pytest.FixtureRequest) -> RedisSettings:
    return RedisSettings(
        url=redis_server, key_prefix=_unique(request), socket_timeout_s=2.0, lock_timeout_s=10.0
    )


@pytest.fixture
def redis_client(redis_settings: RedisSettings) -> Iterator[redis.Redis]:
    client = connect(redis_settings)
    yield client
    client.close()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The ball-screw images shared between checkouts; absent data is a failure, not a skip."""
    override = os.environ.get("LINEWATCH_SHARED_DATA")
    path = Path(override) if override else REPO_ROOT.parent / "shared" / "data" / "ball_screw"
    if not path.is_dir():
        pytest.fail(
            f"shared data set not found at {path} (set LINEWATCH_SHARED_DATA to its location)", pytrace=False
        )
    return path
