"""The scoring stage on envelopes, without a broker: decode verdicts, one output per frame, rejects."""

from __future__ import annotations

import time

import numpy as np
import pytest

from pipeline.config import ScoringSettings
from pipeline.imaging import encode_jpeg
from pipeline.runtime.envelope import Envelope, Record, Reject, Skip
from pipeline.scoring.stage import Frame, ScoringStage
from schemas import FrameHeader, ScoreMessage
from tests.streaming_helpers import small_engine

TOPIC = "lw.frames"


@pytest.fixture(scope="module")
def stage() -> ScoringStage:
    return ScoringStage(small_engine(), ScoringSettings(staleness_s=60.0, max_frame_bytes=200_000))


def image(seed: int, h: int = 48, w: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def envelope(offset: int, value: bytes, headers: list[tuple[str, bytes]], camera: str = "cam-1") -> Envelope:
    return Envelope(TOPIC, 0, offset, value, key=camera.encode(), headers=tuple(headers),
                    timestamp_ms=int(time.time() * 1000))


def frame_env(offset: int, img: np.ndarray, **kw: object) -> Envelope:
    fields: dict[str, object] = {"camera_id": "cam-1", "line_id": "line-1", "product_class": "screw",
                                 "seq": offset, "capture_ts": time.time(), "width": img.shape[1],
                                 "height": img.shape[0], **kw}
    return envelope(offset, encode_jpeg(img), FrameHeader(**fields).to_header())  # type: ignore[arg-type]


def test_decode_gives_a_frame_a_reject_with_its_reason_or_a_skip(stage: ScoringStage) -> None:
    img = image(0)
    good = stage.decode(frame_env(0, img))
    assert isinstance(good, Frame) and good.image.shape == (48, 64, 3) and good.source.offset == 0
    verdicts = {
        "unknown_format": stage.decode(envelope(1, b"\xff\xd8 not a jpeg", frame_env(1, img).headers)),  # type: ignore[arg-type]
        "bad_header": stage.decode(envelope(2, encode_jpeg(img), [("linewatch-frame", b"{nope")])),
        "empty": stage.decode(envelope(3, b"", list(frame_env(3, img).headers))),
        "oversized": stage.decode(envelope(4, b"\xff" * 300_000, list(frame_env(4, img).headers))),
        "dimension_mismatch": stage.decode(frame_env(5, img, width=65)),
    }
    for code, verdict in verdicts.items():
        assert isinstance(verdict, Reject) and verdict.reason.startswith(f"{code}:"), (code, verdict)
    stale = stage.decode(frame_env(6, img, capture_ts=time.time() - 3600))
    assert isinstance(stale, Skip) and stale.reason == "stale"


def test_handle_gives_one_score_output_per_frame_with_its_source(stage: ScoringStage) -> None:
    envs = [frame_env(i, image(i)) for i in range(3)]
    frames = [stage.decode(e) for e in envs]
    result = stage.handle([Record(e, f) for e, f in zip(envs, frames, strict=True)])
    assert result.rejects == []
    assert [o.source for o in result.outputs] == envs
    assert all(o.topic == "scores" and o.key == b"cam-1" for o in result.outputs)
    msgs = [ScoreMessage.model_validate_json(o.value) for o in result.outputs]
    assert [m.frame.seq for m in msgs] == [0, 1, 2]
    assert all(0.0 <= m.image_score <= 1.0 and m.thumbnail_jpeg for m in msgs)


def test_a_replayed_frame_measures_latency_from_the_broker_timestamp(stage: ScoringStage) -> None:
    env = frame_env(0, image(1), capture_ts=time.time() - 86400, replay_session="r-1")
    frame = stage.decode(env)
    assert isinstance(frame, Frame)
    (out,) = stage.handle([Record(env, frame)]).outputs
    assert ScoreMessage.model_validate_json(out.value).latency_ms < 600_000  # not a day
