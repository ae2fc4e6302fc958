"""Bounded state in Redis (issue 9, item 6): per-camera and per-session keys expire, the API's camera
set is capped, shared prompt-cache entries expire. Real Redis (see conftest.py)."""

from __future__ import annotations

import time

import numpy as np
import redis

from pipeline import imaging
from pipeline.alerting.stage import AlertStage
from pipeline.alerting.state_store import DEFAULT_TTL_S, CameraStateStore
from pipeline.api.store import CameraStore
from pipeline.config import AlertSettings, ApiSettings, RedisSettings
from pipeline.redis_store import PROMPT_TTL_S, RedisPromptCache, ThresholdStore
from schemas import FrameRef, ScoreMessage

T0 = 1_767_225_600.0
THUMB = imaging.encode_jpeg(np.full((24, 32, 3), 90, np.uint8))


def score(camera: str, seq: int, value: float = 0.1, session: str | None = None) -> ScoreMessage:
    png, lo, hi = imaging.quantize_map(np.full((8, 8), value, np.float32), 8)
    return ScoreMessage(frame=FrameRef(camera_id=camera, line_id="line-1", product_class="screw", seq=seq,
                                       capture_ts=T0 + seq * 0.1, width=64, height=64, replay_session=session),
                        image_score=value, anomaly_map_png=png, map_min=lo, map_max=hi, thumbnail_jpeg=THUMB,
                        model_fingerprint="t", method="winclip", latency_ms=1.0, scored_ts=T0 + seq * 0.1)


def test_alert_camera_states_expire_live_and_replay_alike(redis_settings: RedisSettings,
                                                          redis_client: redis.Redis) -> None:
    prefix = redis_settings.key_prefix
    stage = AlertStage(AlertSettings(), ThresholdStore(redis_client, prefix), CameraStateStore(redis_client, prefix))
    stage.process([score("cam-1", 0), score("cam-1", 0, session="replay-1")], now=T0)
    assert stage.persist() == 2
    keys = list(redis_client.scan_iter(f"{prefix}:alert:state:*"))
    assert len(keys) == 2
    for key in keys:
        assert 0 < redis_client.pttl(key) <= DEFAULT_TTL_S * 1000
    # A configured TTL is used as given, and every save renews it.
    short = CameraStateStore(redis_client, f"{prefix}:short", ttl_s=0.3)
    stage = AlertStage(AlertSettings(), ThresholdStore(redis_client, prefix), short)
    stage.process([score("cam-2", 0)], now=T0)
    stage.persist()
    assert short.load(("cam-2", None)) is not None
    time.sleep(0.6)
    assert short.load(("cam-2", None)) is None


def test_api_cameras_are_capped_and_silent_ones_pruned(redis_settings: RedisSettings,
                                                       redis_client: redis.Redis) -> None:
    prefix = redis_settings.key_prefix
    store = CameraStore(redis_client, prefix, ttl_s=3600.0, max_cameras=3, prune_every_s=0.0)
    for i in range(6):
        store.put(score(f"cam-{i}", 0), THUMB)
        time.sleep(0.01)  # distinct update times: the longest-silent go first
    assert [c["camera_id"] for c in store.all()] == ["cam-3", "cam-4", "cam-5"]
    assert store.jpeg("cam-0") is None and store.get("cam-0") is None and store.jpeg("cam-5") == THUMB
    assert redis_client.hlen(f"{prefix}:api:cameras") == 3
    assert 0 < redis_client.pttl(f"{prefix}:api:camera:cam-5:jpeg") <= 3600 * 1000

    silent = CameraStore(redis_client, f"{prefix}:s", ttl_s=0.3, max_cameras=100, prune_every_s=0.0)
    silent.put(score("old", 0), THUMB)
    time.sleep(0.5)
    assert silent.all() == []  # hidden at once, before any prune
    silent.put(score("new", 0), THUMB)
    assert [c["camera_id"] for c in silent.all()] == ["new"]
    assert redis_client.hkeys(f"{prefix}:s:api:cameras") == [b"new"]
    assert CameraStore.bounded(redis_client, prefix, ApiSettings(max_cameras=7)).max_cameras == 7


def test_shared_prompt_cache_entries_expire(redis_settings: RedisSettings, redis_client: redis.Redis) -> None:
    cache = RedisPromptCache.from_settings(redis_settings)
    cache.get_or_compute("prompts:x", lambda: {"a": np.zeros(3, np.float32)})
    ttl = redis_client.pttl(f"{redis_settings.key_prefix}:prompts:x")
    assert 0 < ttl <= PROMPT_TTL_S * 1000
