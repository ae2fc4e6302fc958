"""Inputs checked before work (issue 9, items 4-6): every hostile record is refused with its reason
before anything is decoded, allocated, written or remembered for it. Pure unit tests: no broker."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from pipeline.alerting.debounce import CameraState, is_redelivery, step
from pipeline.config import AlertSettings, EngineSettings, ScoringSettings
from pipeline.engine.alfa_prompts import prompt_cache_file
from pipeline.engine.engine import AnomalyEngine
from pipeline.engine.prompt_cache import ArrayBundle
from pipeline.imaging import (
    ImageHeaderError,
    decode_image,
    encode_jpeg,
    encode_png,
    fit_within,
    read_image_info,
    sniff_encoding,
)
from pipeline.metrics import OTHER_LABEL, LabelValues
from pipeline.paths import PathEscapeError, contained
from pipeline.scoring.checks import REASON_CODES, reason_code
from pipeline.scoring.stage import Frame, Rejected, ScoringStage, Skipped
from schemas import FrameHeader, FrameRef, ScoreMessage
from tests.engine_helpers import SMALL, backbone
from tests.hostile_frames import jpeg_bomb, raw_header, small_image, tall_png

REPO = Path(__file__).resolve().parents[1]
IMAGE = small_image()
JPEG = encode_jpeg(IMAGE)
PNG = encode_png(IMAGE)


def make_engine(cache: Any = None) -> AnomalyEngine:
    bb, fp = backbone(SMALL)
    settings = EngineSettings(backbone=SMALL, pretrained="random", precision="fp32", method="winclip")
    return AnomalyEngine(settings, backbone=bb, fingerprint=fp, cache=cache)


@pytest.fixture(scope="module")
def engine() -> AnomalyEngine:
    return make_engine()


def stage_for(engine: AnomalyEngine, **scoring: Any) -> ScoringStage:
    return ScoringStage(engine, ScoringSettings(**{"staleness_s": None, **scoring}))


def verdict_code(verdict: Frame | Rejected | Skipped) -> str:
    assert isinstance(verdict, Rejected), verdict
    return reason_code(verdict.reason)


# -- header fields --------------------------------------------------------------------------------
@pytest.mark.parametrize(("fields", "field"), [
    ({"camera": "."}, "camera_id"),
    ({"camera": ".."}, "camera_id"),
    ({"camera": "..."}, "camera_id"),
    ({"camera": ".hidden"}, "camera_id"),
    ({"camera": "a/b"}, "camera_id"),
    ({"camera": "c" * 129}, "camera_id"),
    ({"seq": 10**30}, "seq"),
    ({"seq": -1}, "seq"),
    ({"capture_ts": math.nan}, "capture_ts"),
    ({"capture_ts": math.inf}, "capture_ts"),
    ({"capture_ts": 1e300}, "capture_ts"),
    ({"capture_ts": -5.0}, "capture_ts"),
    ({"replay_session": "r" * 65}, "replay_session"),
    ({"replay_session": "../x"}, "replay_session"),
    ({"product_class": "../../etc/passwd"}, "product_class"),
    ({"product_class": ".."}, "product_class"),
    ({"product_class": "a/b"}, "product_class"),
    ({"product_class": "x" * 65}, "product_class"),
    ({"line_id": "line\n1"}, "line_id"),
    ({"width": 100_000}, "width"),
])
def test_hostile_header_fields_are_bad_headers_naming_the_field(
        engine: AnomalyEngine, fields: dict[str, Any], field: str) -> None:
    verdict = stage_for(engine).accept(JPEG, raw_header(**fields), source="rec")
    assert verdict_code(verdict) == "bad_header"
    assert isinstance(verdict, Rejected) and f"bad_header: {field}:" in verdict.reason


def test_a_valid_frame_is_accepted(engine: AnomalyEngine) -> None:
    stage = stage_for(engine)
    verdict = stage.accept(JPEG, raw_header(), source="rec")
    assert isinstance(verdict, Frame) and verdict.image is None  # checked, decoded later (decode pool)
    decoded = stage.decode_frame(verdict)
    assert isinstance(decoded, Frame) and decoded.image is not None and decoded.image.shape == (48, 64, 3)
    png = stage_for(engine).accept(PNG, raw_header(encoding="png"), source="rec")
    assert isinstance(png, Frame)


def test_live_frames_from_the_future_are_refused_replays_may_run_ahead(engine: AnomalyEngine) -> None:
    ahead = time.time() + 3600
    live = stage_for(engine).accept(JPEG, raw_header(capture_ts=ahead), source="rec")
    assert verdict_code(live) == "future_capture_ts"
    replay = stage_for(engine).accept(JPEG, raw_header(capture_ts=ahead, replay_session="replay-1"), source="r")
    assert isinstance(replay, Frame)


def test_a_seq_above_64_bits_never_reaches_alerting() -> None:
    with pytest.raises(ValidationError, match="seq"):
        FrameRef(camera_id="cam", line_id="l", product_class="p", seq=10**30, capture_ts=time.time(),
                 width=1, height=1)


# -- image bytes ----------------------------------------------------------------------------------
def test_png_declared_as_jpeg_and_the_reverse_are_encoding_mismatches(engine: AnomalyEngine) -> None:
    stage = stage_for(engine)
    png_as_jpeg = stage.accept(PNG, raw_header(encoding="jpeg"), source="rec")
    assert isinstance(png_as_jpeg, Rejected)
    assert png_as_jpeg.reason == "encoding_mismatch: declared jpeg, bytes are png"
    assert verdict_code(stage.accept(JPEG, raw_header(encoding="png"), source="rec")) == "encoding_mismatch"


@pytest.mark.parametrize("data", [b"GIF89a" + bytes(100), b"BM" + bytes(100), b"RIFF\x00\x00\x00\x00WEBP",
                                  b"\xff\xd8not a jpeg"])
def test_other_formats_are_refused_by_their_magic_bytes(engine: AnomalyEngine, data: bytes) -> None:
    assert verdict_code(stage_for(engine).accept(data, raw_header(), source="rec")) == "unknown_format"


def test_truncated_or_contradictory_image_headers_are_refused(engine: AnomalyEngine) -> None:
    stage = stage_for(engine)
    assert verdict_code(stage.accept(PNG[:20], raw_header(encoding="png"), source="r")) == "bad_image_header"
    no_sof = JPEG[:2] + b"\xff\xda\x00\x02"  # a scan before any frame header
    assert verdict_code(stage.accept(no_sof, raw_header(), source="r")) == "bad_image_header"
    sof = JPEG.index(b"\xff\xc0")
    seg = JPEG[sof:sof + 2 + int.from_bytes(JPEG[sof + 2:sof + 4], "big")]
    second = bytearray(seg)
    second[5:9] = (16000).to_bytes(2, "big") * 2
    two_sizes = JPEG[:sof] + bytes(second) + JPEG[sof:]
    with pytest.raises(ImageHeaderError, match="two frame headers"):
        read_image_info(two_sizes)
    assert verdict_code(stage.accept(two_sizes, raw_header(), source="r")) == "bad_image_header"


def test_image_info_reads_sizes_without_decoding() -> None:
    assert sniff_encoding(JPEG) == "jpeg" and sniff_encoding(PNG) == "png" and sniff_encoding(b"xx") is None
    for data, encoding in ((JPEG, "jpeg"), (PNG, "png")):
        info = read_image_info(data)
        assert (info.encoding, info.width, info.height) == (encoding, 64, 48)
    progressive = encode_jpeg(small_image(33, 17))
    assert read_image_info(progressive).pixels == 33 * 17


def test_decompression_bomb_is_refused_from_its_encoded_header(engine: AnomalyEngine) -> None:
    bomb = jpeg_bomb(16000, 16000)
    assert 900_000 < len(bomb) < 1_100_000
    # The record's header says 64x48: the JPEG's own frame header says otherwise.
    verdict = stage_for(engine).accept(bomb, raw_header(), source="rec")
    assert isinstance(verdict, Rejected)
    assert verdict.reason == "oversized: encoded 16000x16000 pixels > 40000000"
    # Within the pixel limit, the lie itself is what refuses it.
    assert verdict_code(stage_for(engine).accept(jpeg_bomb(4000, 3000), raw_header(), source="r")) == \
        "dimension_mismatch"
    # A header that admits to being huge is refused on the header alone.
    honest = stage_for(engine).accept(bomb, raw_header(width=16000, height=16000), source="rec")
    assert isinstance(honest, Rejected) and honest.reason == "oversized: 16000x16000 pixels > 40000000"


PEAK_SCRIPT = textwrap.dedent("""
    import sys
    from pipeline.config import ScoringSettings
    from pipeline.imaging import decode_image
    from pipeline.scoring.stage import ScoringStage
    from tests.hostile_frames import jpeg_bomb, raw_header

    def kib(field):
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))

    side = int(sys.argv[2])
    bomb = jpeg_bomb(side, side)
    stage = ScoringStage(None, ScoringSettings(staleness_s=None))  # accept() never touches the engine
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak (VmHWM) to the current resident size: imports do not count
    before = kib("VmRSS")
    if sys.argv[1] == "accept":
        print(stage.accept(bomb, raw_header(), source="rec").reason, file=sys.stderr)
    else:
        decode_image(bomb)
    print((kib("VmHWM") - before) // 1024)  # MiB of peak resident memory added
""")


def peak_growth_mib(mode: str, side: int) -> int:
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, mode, str(side)], cwd=REPO, capture_output=True,
                         text=True, timeout=300, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def test_decompression_bomb_memory_stays_bounded_in_a_fresh_process() -> None:
    # Refusing the 16000x16000 bomb adds almost nothing to the peak (decoding it would add 1.5 GB).
    assert peak_growth_mib("accept", 16000) < 32
    # The measure can fail: decoding a 6000x6000 bomb does raise the peak by its two 103 MiB buffers.
    assert peak_growth_mib("decode", 6000) > 150


# -- thumbnails -----------------------------------------------------------------------------------
def test_a_256x65000_frame_makes_a_small_thumbnail_inside_the_box(engine: AnomalyEngine) -> None:
    data = tall_png()
    frame = stage_for(engine).accept(data, raw_header(width=256, height=65_000, encoding="png"), source="rec")
    assert isinstance(frame, Frame)
    done, failed = stage_for(engine).score([frame])
    assert failed == []
    (_, message), = done
    thumb = decode_image(message.thumbnail_jpeg)
    assert max(thumb.shape[:2]) <= 256 and thumb.shape[0] == 256
    assert len(message.thumbnail_jpeg) < 20_000
    assert len(message.model_dump_json()) < 100_000  # the score message stays far below the producer limit


@pytest.mark.parametrize(("size", "box", "expected"), [
    ((64, 48), 256, (64, 48)), ((512, 256), 256, (256, 128)), ((256, 65_000), 256, (1, 256)),
    ((100_000, 3), 256, (256, 1)), ((300, 300), 256, (256, 256)),
])
def test_fit_within_keeps_both_sides_in_the_box(size: tuple[int, int], box: int, expected: tuple[int, int]) -> None:
    assert fit_within(*size, box) == expected


# -- product classes ------------------------------------------------------------------------------
def test_with_an_allowlist_unknown_classes_are_refused(engine: AnomalyEngine) -> None:
    stage = stage_for(engine, classes=["ball_screw"])
    assert isinstance(stage.accept(JPEG, raw_header(), source="r"), Frame)
    verdict = stage.accept(JPEG, raw_header(product_class="walnut"), source="r")
    assert isinstance(verdict, Rejected)
    assert verdict.reason == "unknown_class: 'walnut' is not in scoring.classes"
    with pytest.raises(ValidationError, match=r"scoring\.classes"):
        ScoringSettings(classes=["../x"])


def test_configured_classes_are_prepared_at_start(engine: AnomalyEngine) -> None:
    stage = stage_for(engine, classes=["ball_screw", "metal_nut"])
    assert not stage.ready("metal_nut")
    assert stage.prepare_classes() == []
    assert stage.ready("ball_screw") and stage.ready("metal_nut")


class GatedCache:
    """A prompt cache whose computations wait for a gate, so a class stays 'being prepared'."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def get_or_compute(self, key: str, compute: Callable[[], ArrayBundle]) -> ArrayBundle:
        if "ball_screw" not in key:  # the class prepared up front is not held back
            assert self.gate.wait(120), "gate never opened"
        return compute()


def frames_of(stage: ScoringStage, product_class: str, offsets: range, partition: int = 0) -> list[Frame]:
    from kafka.consumer.fetcher import ConsumerRecord

    out = []
    for offset in offsets:
        headers = raw_header(camera=f"cam-{product_class}", seq=offset, product_class=product_class)
        rec = ConsumerRecord(topic="frames", partition=partition, leader_epoch=-1, offset=offset,
                             timestamp=int(time.time() * 1000), timestamp_type=0, key=None, value=JPEG,
                             headers=headers, checksum=None, serialized_key_size=-1,
                             serialized_value_size=len(JPEG), serialized_header_size=-1)
        verdict = stage.accept(rec.value, rec.headers, rec)
        assert isinstance(verdict, Frame)
        out.append(verdict)
    return out


def test_a_new_class_is_prepared_in_the_background_while_other_classes_are_scored() -> None:
    from kafka import TopicPartition

    cache = GatedCache()
    stage = ScoringStage(make_engine(cache), ScoringSettings(staleness_s=None, classes=None),
                         defer_new_classes=True)
    stage.prepare_classes(["ball_screw"])
    known = frames_of(stage, "ball_screw", range(0, 3), partition=0)
    new = frames_of(stage, "metal_nut", range(0, 3), partition=1)
    done, failed = stage.score(known + new)
    # The known class is scored now; the new class's frames are held, not lost, not rejected.
    assert failed == [] and sorted(f.header.seq for f, _ in done) == [0, 1, 2]
    assert {f.header.product_class for f, _ in done} == {"ball_screw"} and stage.held == 3
    tp0, tp1 = TopicPartition("frames", 0), TopicPartition("frames", 1)
    # Offsets of the held frames' partition do not move past them; the other partition commits.
    assert stage.commit_floor({tp0: 3, tp1: 3}) == {tp0: 3, tp1: 0}
    more = frames_of(stage, "ball_screw", range(3, 5))
    done, failed = stage.score(more)  # the next batch is not held up either
    assert [f.header.seq for f, _ in done] == [3, 4] and stage.held == 3
    cache.gate.set()
    deadline = time.monotonic() + 120
    scored: list[int] = []
    while stage.held and time.monotonic() < deadline:
        time.sleep(0.05)
        later, failed = stage.score([])
        assert failed == []
        scored += [f.header.seq for f, _ in later if f.header.product_class == "metal_nut"]
    assert sorted(scored) == [0, 1, 2] and stage.held == 0
    # Now everything processed may be committed.
    assert stage.commit_floor({}) == {tp1: 3}
    stage.close()


def test_prepared_classes_are_bounded(engine: AnomalyEngine) -> None:
    stage = stage_for(engine, max_classes=2)
    for name in ("c1", "c2", "c3"):
        stage.prepare_classes([name])
    assert not stage.ready("c1") and stage.ready("c2") and stage.ready("c3")
    assert "c1" not in engine._text  # the engine forgot its embeddings too


# -- paths ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("part", ["..", ".", "", "../x", "a/../../x", "/etc", "x/../.."])
def test_paths_from_message_content_stay_inside_their_root(tmp_path: Path, part: str) -> None:
    with pytest.raises(PathEscapeError):
        contained(tmp_path / "root", part)


def test_contained_follows_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)
    assert contained(root, "cam-1") == (root / "cam-1").resolve()
    with pytest.raises(PathEscapeError):
        contained(root, "link", "secret")


def test_reference_folders_and_prompt_cache_files_stay_in_their_roots(tmp_path: Path, engine: AnomalyEngine) -> None:
    refs = tmp_path / "refs"
    refs.mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "a.jpg").write_bytes(JPEG)
    with pytest.raises(PathEscapeError):
        engine.load_references("../outside", refs)
    for name in ("../../etc/passwd", "a/b", "ball screw", "x" * 300):
        path = prompt_cache_file(tmp_path, "org/model", name)
        assert path.parent == tmp_path.resolve() and path.name.startswith("alfa-") and len(path.name) < 50


def test_recorder_refuses_to_write_outside_its_root(tmp_path: Path) -> None:
    from pipeline.recording import Recorder

    bad = FrameRef.model_construct(camera_id="..", line_id="l", product_class="p", seq=0,
                                   capture_ts=time.time(), width=64, height=48, replay_session=None)
    with Recorder(tmp_path / "rec") as recorder, pytest.raises(PathEscapeError):
        recorder.write(JPEG, bad)
    assert [p.name for p in tmp_path.iterdir()] == ["rec"]


def test_index_entries_leaving_their_folder_are_skipped(tmp_path: Path) -> None:
    from pipeline.recording import iter_recording

    seg = tmp_path / "cam-1" / "20260101T000000Z"
    seg.mkdir(parents=True)
    (tmp_path / "secret.jpg").write_bytes(JPEG)
    (seg / "0.jpg").write_bytes(JPEG)
    base = {"seq": 0, "capture_ts": 1_767_225_600.0, "width": 64, "height": 48, "camera_id": "cam-1",
            "line_id": "l", "product_class": "p"}
    lines = [base | {"file": "0.jpg"}, base | {"seq": 1, "file": "../../secret.jpg"}]
    (seg / "index.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert [f.seq for f in iter_recording(tmp_path)] == [0]


# -- sequence numbers -----------------------------------------------------------------------------
def score_at(seq: int, ts: float, value: float = 0.9) -> ScoreMessage:
    from pipeline import imaging

    png, lo, hi = imaging.quantize_map(np.full((8, 8), value, np.float32), 8)
    return ScoreMessage(frame=FrameRef(camera_id="cam-1", line_id="l", product_class="p", seq=seq, capture_ts=ts,
                                       width=64, height=48),
                        image_score=value, anomaly_map_png=png, map_min=lo, map_max=hi, thumbnail_jpeg=JPEG,
                        model_fingerprint="t", method="winclip", latency_ms=1.0, scored_ts=ts)


def test_a_huge_seq_does_not_mute_the_camera() -> None:
    settings = AlertSettings(k=2, n=3, quiet_s=1.0)
    state = CameraState("cam-1")
    t0 = 1_767_225_600.0
    step(state, score_at(10, t0, 0.1), 0.5, settings)
    step(state, score_at(2**62, t0 + 0.1, 0.1), 0.5, settings)  # a hostile or glitched seq
    # The camera goes on at its own numbering: later frames are processed and can open an event.
    opened = []
    for i in range(11, 14):
        ts = t0 + 0.2 + (i - 11) * 0.1
        assert not is_redelivery(state, score_at(i, ts))
        opened += step(state, score_at(i, ts), 0.5, settings)
    assert [t.kind for t in opened] == ["open"] and state.last_seq == 13
    # A true redelivery (same seq, same capture time) is still ignored.
    again = score_at(12, t0 + 0.3)
    assert is_redelivery(state, again) and step(state, again, 0.5, settings) == []


# -- metric labels --------------------------------------------------------------------------------
def test_metric_label_values_are_bounded() -> None:
    labels = LabelValues(cap=3)
    labels.configure(["configured"])
    assert [labels(f"cam-{i}") for i in range(5)] == ["cam-0", "cam-1", "cam-2", OTHER_LABEL, OTHER_LABEL]
    assert labels("configured") == "configured" and labels("cam-1") == "cam-1"


def test_reason_codes_are_stable_identifiers() -> None:
    assert len(set(REASON_CODES)) == len(REASON_CODES)
    assert all(code.isidentifier() and code.islower() for code in REASON_CODES)


def test_frame_header_roundtrip_keeps_valid_values() -> None:
    h = FrameHeader(camera_id="line3-cam1", line_id="line-3", product_class="ball_screw", seq=2**62,
                    capture_ts=time.time(), width=64, height=48, replay_session="replay-0123456789")
    assert FrameHeader.from_headers(h.to_header()) == h


def test_a_huge_seq_does_not_stop_the_recording(tmp_path: Path) -> None:
    from pipeline.recording import Recorder, iter_recording

    def ref(seq: int, ts: float) -> FrameRef:
        return FrameRef(camera_id="cam-1", line_id="l", product_class="p", seq=seq, capture_ts=ts,
                        width=64, height=48)

    t0 = 1_767_225_600.0
    with Recorder(tmp_path) as recorder:
        assert recorder.write(JPEG, ref(10, t0)) and recorder.write(JPEG, ref(2**62, t0 + 0.1))
        assert recorder.write(JPEG, ref(11, t0 + 0.2)) and recorder.write(JPEG, ref(12, t0 + 0.3))
        assert not recorder.write(JPEG, ref(11, t0 + 0.2))  # a redelivery is still dropped
        assert recorder.write(JPEG, ref(10, t0 + 0.4))  # restarted again, same segment: no file clobbered
    with Recorder(tmp_path) as again:  # a new process reads where the camera stood
        assert not again.write(JPEG, ref(12, t0 + 0.3)) and again.write(JPEG, ref(13, t0 + 0.5))
    frames = list(iter_recording(tmp_path))
    assert [f.seq for f in frames] == [10, 2**62, 11, 12, 10, 13]
    assert len({f.path for f in frames}) == 6
