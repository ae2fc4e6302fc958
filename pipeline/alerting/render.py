"""Turn an event's peak frame into a mask, regions and a heat-overlay thumbnail. Pure functions."""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np

from pipeline import imaging
from pipeline.alerting.debounce import EventState
from schemas.events import DefectEvent, Region

# When nothing reaches the threshold (the image score can pass while no single pixel does), the mask
# falls back to the hottest 1% of the map, so an event always points somewhere.
FALLBACK_QUANTILE = 0.99


def mask_from_map(map_float: np.ndarray, threshold: float, width: int, height: int) -> np.ndarray:
    """Anomaly map (h, w) float -> mask (height, width) uint8 in {0, 255}; never all zero.

    The map is the score message's (model resolution, quantised to ``scoring.map_size``): it is
    resized bilinearly to the frame size here, once per event, so the mask and the boxes derived
    from it are at frame resolution and in frame coordinates (tiled cameras included).
    """
    if map_float.ndim != 2 or map_float.size == 0:
        raise ValueError(f"expected a non-empty 2-D map, got shape {map_float.shape}")
    m = map_float.astype(np.float32)
    if m.shape != (height, width):
        m = cv2.resize(m, (width, height), interpolation=cv2.INTER_LINEAR)
    hot = m >= threshold
    if not hot.any():
        hot = m >= np.quantile(m, FALLBACK_QUANTILE)  # the max always passes: never empty
    return hot.astype(np.uint8) * 255


def regions_from_mask(mask: np.ndarray, min_area: int) -> list[Region]:
    """8-connected components of a (H, W) mask with at least ``min_area`` pixels.

    Ordered by area (largest first), then top-to-bottom, left-to-right, so output is deterministic.
    """
    n, _, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8), connectivity=8)
    regions = [
        Region(
            x=int(stats[i, cv2.CC_STAT_LEFT]), y=int(stats[i, cv2.CC_STAT_TOP]),
            width=int(stats[i, cv2.CC_STAT_WIDTH]), height=int(stats[i, cv2.CC_STAT_HEIGHT]),
            area=int(stats[i, cv2.CC_STAT_AREA]),
        )
        for i in range(1, n)  # label 0 is the background
        if int(stats[i, cv2.CC_STAT_AREA]) >= min_area
    ]
    return sorted(regions, key=lambda r: (-r.area, r.y, r.x))


def thumbnail_with_overlay(thumb_jpeg: bytes, map_float: np.ndarray, vmin: float, vmax: float) -> bytes:
    """Thumbnail JPEG + anomaly map (h, w) -> JPEG of the thumbnail with a JET heat overlay."""
    image = imaging.decode_image(thumb_jpeg)
    return imaging.encode_jpeg(imaging.heat_overlay(image, map_float, vmin=vmin, vmax=vmax), quality=85)


def build_event(ev: EventState, status: Literal["open", "closed"], min_region_area: int) -> DefectEvent:
    """Render a DefectEvent message from an event state; mask and thumbnail come from its peak frame."""
    peak = ev.peak
    map_float = imaging.dequantize_map(peak.map_png, peak.map_min, peak.map_max)
    mask = mask_from_map(map_float, peak.threshold, peak.width, peak.height)
    return DefectEvent(
        event_id=ev.event_id,
        status=status,
        camera_id=ev.camera_id,
        line_id=ev.line_id,
        product_class=ev.product_class,
        first_seq=ev.first_seq,
        last_seq=ev.last_seq,
        first_ts=ev.first_ts,
        last_ts=ev.last_ts,
        peak_seq=peak.seq,
        peak_score=peak.score,
        threshold=peak.threshold,
        n_frames=ev.n_frames,
        width=peak.width,
        height=peak.height,
        regions=regions_from_mask(mask, min_region_area),
        mask_png=imaging.encode_png(mask),
        thumbnail_jpeg=thumbnail_with_overlay(peak.thumbnail_jpeg, map_float, peak.map_min, peak.map_max),
        replay_session=ev.replay_session,
    )


def event_overlay(frame_rgb: np.ndarray, event: DefectEvent) -> np.ndarray:
    """The frame with the event's mask tinted red, its outline and region boxes drawn.

    The mask is at frame resolution; a smaller frame (e.g. the thumbnail) gets the mask resized.
    """
    h, w = frame_rgb.shape[:2]
    mask = imaging.decode_png(event.mask_png)
    if mask.shape[:2] != (h, w):
        mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
    hot = mask > 0
    out = frame_rgb.copy()
    red = np.array([255, 0, 0], np.float32)
    out[hot] = (0.55 * out[hot] + 0.45 * red).astype(np.uint8)
    contours, _ = cv2.findContours(hot.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, (255, 0, 0), max(1, round(min(h, w) / 300)))
    sx, sy = w / event.width, h / event.height
    for r in event.regions:
        cv2.rectangle(out, (int(r.x * sx), int(r.y * sy)), (int((r.x + r.width) * sx), int((r.y + r.height) * sy)),
                      (255, 255, 0), 1)
    return out
