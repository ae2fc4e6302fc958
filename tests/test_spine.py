"""The scoring spine at camera resolution: scaled decoding, maps at model resolution, tiling.

Real engines on small random backbones; no stubs. A defect pasted into one tile of a frame is
found at its place in the frame, through the stage and the event renderer.
"""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
import torch

from pipeline.alerting.render import mask_from_map, regions_from_mask
from pipeline.config import CameraConfig, EngineSettings, ScoringSettings
from pipeline.engine.engine import ALFA_SIGMA_PX, AnomalyEngine
from pipeline.engine.scoring import gaussian_blur, upsample_maps, upsample_smooth
from pipeline.engine.tiling import TileGrid, plan_tiles, smoothing_sigma, stitch
from pipeline.imaging import (
    FrameDecodeError,
    decode_image_scaled,
    decode_scale,
    dequantize_map,
    encode_jpeg,
    encode_png,
)
from pipeline.scoring.stage import THUMBNAIL_BOX, Frame, Rejected, ScoringStage, tiles_by_camera
from schemas import FrameHeader
from tests.engine_helpers import SMALL, backbone

CLASS = "ball_screw"


def make_engine(method: str) -> AnomalyEngine:
    bb, fp = backbone(SMALL)
    settings = EngineSettings(method=method, backbone=SMALL, pretrained="random", precision="fp32")
    return AnomalyEngine(settings, backbone=bb, fingerprint=fp)


def texture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth, non-repeating RGB texture (JPEG keeps it well)."""
    rng = np.random.default_rng(seed)
    noise = rng.random((height // 16 + 2, width // 16 + 2, 3)).astype(np.float32)
    return (cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC).clip(0, 1) * 200 + 20).astype(np.uint8)


def header(camera: str, image: np.ndarray, seq: int = 0) -> FrameHeader:
    h, w = image.shape[:2]
    return FrameHeader(camera_id=camera, line_id="line-1", product_class=CLASS, seq=seq, capture_ts=time.time(),
                       width=w, height=h)


# -- decoding -------------------------------------------------------------------------------------
def test_scaled_decode_picks_the_smallest_dct_scale_that_still_feeds_the_model() -> None:
    assert decode_scale(1920, 1080, 256, 224) == 4  # 480x270
    assert decode_scale(2448, 2048, 256, 224) == 8  # 306x256
    assert decode_scale(640, 480, 256, 240) == 2  # 320x240
    assert decode_scale(300, 200, 256, 224) == 1  # too small already: full size
    image = texture(1080, 1920)
    data = encode_jpeg(image, quality=95)
    small = decode_image_scaled(data, 4)
    assert small.shape == (270, 480, 3)
    # What the DCT-domain reduction gives is the frame reduced by area (JPEG noise aside).
    area = cv2.resize(image, (480, 270), interpolation=cv2.INTER_AREA)
    assert np.abs(small.astype(int) - area.astype(int)).mean() < 3.0
    # Other formats are decoded whole and reduced by area (size rounded down).
    assert decode_image_scaled(encode_png(image[:1081 - 1, :1921 - 1]), 8).shape == (135, 240, 3)
    with pytest.raises(FrameDecodeError):
        decode_image_scaled(b"\xff\xd8not a jpeg", 2)
    with pytest.raises(ValueError, match="scale"):
        decode_image_scaled(data, 3)


def test_stage_decodes_at_the_scale_the_tiles_need_and_thumbnails_from_that_decode() -> None:
    engine = make_engine("winclip")
    cams = [CameraConfig(id="wide", product_class=CLASS, source="x", tiles=(2, 2), tile_overlap=0.25),
            CameraConfig(id="plain", product_class=CLASS, source="x")]
    stage = ScoringStage(engine, ScoringSettings(staleness_s=None), tiles=tiles_by_camera(cams))
    assert stage.tiles == {"wide": TileGrid(2, 2, 0.25)}
    image = texture(2048, 2448)
    data = encode_jpeg(image)
    for camera, scale in (("plain", 8), ("wide", 4)):
        accepted = stage.accept(data, header(camera, image).to_header(), None)
        assert isinstance(accepted, Frame) and accepted.image is None  # accept does not decode
        decoded = stage.decode_frame(accepted)
        assert isinstance(decoded, Frame) and decoded.scale == scale
        assert decoded.image is not None and decoded.image.shape == (2048 // scale, 2448 // scale, 3)
        (_, msg), = stage.score([decoded])[0]
        thumb = cv2.imdecode(np.frombuffer(msg.thumbnail_jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert thumb.shape[1] == THUMBNAIL_BOX
        assert (msg.frame.width, msg.frame.height) == (2448, 2048)  # the frame's own size travels on
    # A header that lies about the size is caught before decoding (the encoded header is read).
    lying = header("plain", image).model_copy(update={"width": 2000})
    verdict = stage.accept(data, lying.to_header(), None)  # type: ignore[arg-type]
    assert isinstance(verdict, Rejected) and verdict.reason.startswith("dimension_mismatch")
    # A JPEG whose header reads well but whose data is cut off is caught by the (scaled) decode.
    cut = stage.accept(data[: len(data) // 3], header("plain", image).to_header(), "rec")
    assert isinstance(cut, Frame)
    done, failed = stage.score([cut])
    assert done == [] and [r.reason.split(":")[0] for r in failed] == ["undecodable"]


# -- maps at model resolution -----------------------------------------------------------------------
@pytest.mark.parametrize("method", ["alfa", "winclip"])
def test_model_resolution_maps_match_the_old_full_resolution_maps_on_the_same_grid(method: str) -> None:
    """Tolerance: 2e-3 of the map's range on the model grid, 3e-3 on the 64x64 message grid.

    The old path upsampled the patch grid to the frame's size and blurred there (ALFA: sigma
    4 * max(H/h, W/w) px); the new one does the same blur, per axis, on the model-size canvas.
    """
    engine = make_engine(method)
    frames = [texture(540, 960, 1), texture(480, 640, 2)]
    new = engine.score(frames, CLASS)
    scores, grid = engine._forward(engine._prepare(frames), CLASS)
    in_h, in_w = engine.input_size
    for i, frame in enumerate(frames):
        h, w = frame.shape[:2]
        old = upsample_maps(grid[i : i + 1], (h, w))
        if method == "alfa":
            old = gaussian_blur(old, ALFA_SIGMA_PX * max(h / in_h, w / in_w))
        old_map = old[0].numpy()
        spread = float(old_map.max() - old_map.min())
        assert spread > 0
        assert new[i].image_score == pytest.approx(float(scores[i]), abs=1e-6)
        on_grid = cv2.resize(old_map, (in_w, in_h), interpolation=cv2.INTER_AREA)
        assert np.abs(new[i].anomaly_map - on_grid).max() < 2e-3 * spread
        small = [cv2.resize(m, (64, 64), interpolation=cv2.INTER_AREA) for m in (old_map, new[i].anomaly_map)]
        assert np.abs(small[0] - small[1]).max() < 3e-3 * spread


def test_anisotropic_blur_is_the_frame_blur_on_the_canvas() -> None:
    sy, sx = smoothing_sigma((1080, 1920), (240, 240), 4.0)
    assert sx == pytest.approx(4.0) and sy == pytest.approx(4.0 * 1920 / 1080)
    point = torch.zeros(1, 61, 61)
    point[0, 30, 30] = 1.0
    blurred = gaussian_blur(point, (3.0, 1.0))[0]
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert blurred[30, 33] < blurred[33, 30]  # wider along y


# -- tiling -----------------------------------------------------------------------------------------
def test_tile_plan_covers_the_frame_and_tiles_sit_on_the_canvas() -> None:
    plan = plan_tiles((2048, 2448), (224, 224), TileGrid(2, 3, 0.25))
    assert plan.canvas_size == (224 + 168, 224 + 2 * 168)
    assert len(plan.crops) == 6 and plan.origins[4] == (168, 168)
    assert plan.crops[0][0] == 0 and plan.crops[0][2] == 0
    assert plan.crops[-1][1] == 2048 and plan.crops[-1][3] == 2448  # the last tile ends at the edge
    ys = sorted({(y0, y1) for y0, y1, _, _ in plan.crops})
    assert ys[0][1] > ys[1][0]  # rows overlap
    untiled = plan_tiles((480, 640), (224, 224))
    assert untiled.canvas_size == (224, 224) and untiled.crops == [(0, 480, 0, 640)]
    with pytest.raises(ValueError):
        TileGrid(0, 2)
    with pytest.raises(ValueError):
        TileGrid(2, 2, 1.0)


def test_stitch_takes_the_max_or_the_mean_where_tiles_overlap() -> None:
    plan = plan_tiles((100, 200), (4, 4), TileGrid(1, 2, 0.5))
    assert plan.canvas_size == (4, 6) and plan.origins == [(0, 0), (0, 2)]
    maps = torch.stack([torch.full((4, 4), 1.0), torch.full((4, 4), 3.0)])
    maps[0, 1, 3] = 5.0  # a hot spot of the left tile inside the overlap
    out = stitch(maps, plan, "max")
    assert out[0].tolist() == [1, 1, 3, 3, 3, 3]
    assert out[1, 3] == 5.0
    mean = stitch(maps, plan, "mean")
    assert mean[0].tolist() == [1, 1, 2, 2, 3, 3] and mean[1, 3] == 4.0
    with pytest.raises(ValueError, match="do not fit"):
        stitch(maps[:1], plan)


def test_a_defect_in_one_tile_is_found_at_its_place_in_the_frame() -> None:
    """WinCLIP+ with the normal frame's tiles as its few-shot memory; one patch pasted in the
    bottom-left tile of a 2x2 tiled 448x896 frame. Stage -> score message -> event mask and boxes."""
    engine = make_engine("winclip")
    grid = TileGrid(2, 2, 0.25)
    normal = decode_image_scaled(encode_jpeg(texture(448, 896, 5), quality=95), 1)
    plan = plan_tiles(normal.shape[:2], engine.input_size, grid)
    engine.set_references(CLASS, [normal[y0:y1, x0:x1] for y0, y1, x0, x1 in plan.crops])
    defect = normal.copy()
    y, x, size = 330, 150, 48  # inside the bottom-left tile only
    defect[y : y + size, x : x + size] = (255, 0, 255)

    # The engine alone: the stitched map's peak is on the defect; the frame's score is its hottest tile's.
    result = engine.score([defect], CLASS, tiles=grid)[0]
    assert result.anomaly_map.shape == plan.canvas_size
    full = result.frame_map()
    py, px = np.unravel_index(int(np.argmax(full)), full.shape)
    assert y - 32 <= py <= y + size + 32 and x - 32 <= px <= x + size + 32, (py, px)
    clean = engine.score([normal], CLASS, tiles=grid)[0]
    assert result.image_score > clean.image_score

    # The whole path: stage with the camera's tiles, the score message, the event's mask and boxes.
    stage = ScoringStage(engine, ScoringSettings(staleness_s=None), tiles={"cam": grid})
    accepted = stage.accept(encode_jpeg(defect, quality=95), header("cam", defect).to_header(), None)
    (_, msg), = stage.score([accepted])[0]  # type: ignore[list-item]
    small = dequantize_map(bytes(msg.anomaly_map_png), msg.map_min, msg.map_max)
    threshold = msg.map_min + 0.6 * (msg.map_max - msg.map_min)
    mask = mask_from_map(small, threshold, msg.frame.width, msg.frame.height)
    assert mask.shape == (448, 896)
    regions = regions_from_mask(mask, min_area=16)
    assert regions, "no region"
    r = regions[0]
    cy, cx = r.y + r.height / 2, r.x + r.width / 2
    assert y - 40 <= cy <= y + size + 40 and x - 40 <= cx <= x + size + 40, r


# -- threads ----------------------------------------------------------------------------------------
def test_per_frame_host_ops_run_on_one_thread_with_the_same_results(monkeypatch: pytest.MonkeyPatch) -> None:
    """Preprocessing and post-processing run on one intra-op thread (pipeline.engine.threads), the
    forward keeps the configured count, and the numbers are bitwise those of the full team."""
    import threading

    import pipeline.engine.engine as engine_module
    from pipeline.engine.preprocess import preprocess
    from pipeline.engine.threads import one_intra_op_thread, pin_intra_op_threads

    torch.set_num_threads(2)
    engine = make_engine("alfa")
    frames = [texture(270, 480, 3), texture(240, 320, 4)]
    seen: dict[str, list[int]] = {"preprocess": [], "upsample_smooth": [], "forward": []}

    def counting(name: str, fn):  # type: ignore[no-untyped-def]
        def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
            seen[name].append(torch.get_num_threads())
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(engine_module, "preprocess", counting("preprocess", preprocess))
    monkeypatch.setattr(engine_module, "upsample_smooth", counting("upsample_smooth", upsample_smooth))
    forward = engine._forward
    monkeypatch.setattr(engine, "_forward", counting("forward", forward))
    engine.score(frames, CLASS)
    # Two frame sizes: two blurs, one batch each.
    assert seen == {"preprocess": [1], "upsample_smooth": [1, 1], "forward": [2]}
    assert torch.get_num_threads() == 2

    bb = engine.backbone
    full = preprocess(frames, bb.image_size, bb.mean, bb.std)  # with the team
    assert torch.equal(engine._prepare(frames), full)
    scores, grid = forward(full, CLASS)
    plans = [plan_tiles(f.shape[:2], engine.input_size) for f in frames]
    maps, _ = engine._postprocess(grid, scores, plans)
    for i, plan in enumerate(plans):
        sigma = smoothing_sigma(plan.frame_size, plan.canvas_size, ALFA_SIGMA_PX)
        assert np.array_equal(maps[i], upsample_smooth(grid[i : i + 1], engine.input_size, sigma)[0].numpy())

    # A thread whose first torch op comes while another thread is inside the scope starts from its
    # count (why the stage's class-prepare thread pins its own); the scope ends restored.
    counts: dict[str, int] = {}

    def plain() -> None:
        counts["plain"] = torch.get_num_threads()

    def pinned() -> None:
        pin_intra_op_threads(2)
        counts["pinned"] = torch.get_num_threads()

    with one_intra_op_thread():
        assert torch.get_num_threads() == 1
        for target in (plain, pinned):
            t = threading.Thread(target=target)
            t.start()
            t.join()
    assert counts == {"plain": 1, "pinned": 2} and torch.get_num_threads() == 2
    with pytest.raises(RuntimeError), one_intra_op_thread():
        raise RuntimeError("restored anyway")
    assert torch.get_num_threads() == 2
