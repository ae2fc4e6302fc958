"""One overlay style for every picture linewatch draws (dashboard, replay reports, `linewatch eval`).

- heat: the JET colour map at ``HEAT_ALPHA`` over the frame, on a stated scale, with a colour
  legend bar (low..high, the scale's numbers) on the right edge;
- mask: the defect mask's outline in ``OUTLINE_RGB`` (no fill, so the defect itself stays visible),
  region boxes in ``BOX_RGB``;
- anything made with random weights carries a ``RANDOM WEIGHTS`` banner: its scores mean nothing.
The dashboard draws its legend with the same colours (``legend_stops``).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from pipeline import imaging
from schemas.events import Region

HEAT_ALPHA = 0.45
OUTLINE_RGB = (255, 40, 40)
BOX_RGB = (255, 220, 0)
RANDOM_BANNER = "RANDOM WEIGHTS - scores mean nothing"


def is_random(fingerprint: str | None) -> bool:
    return fingerprint is not None and ":random-" in fingerprint


def legend_stops(n: int = 5) -> list[str]:
    """CSS colours of the JET scale from low to high (for the dashboard's legend)."""
    ramp = cv2.applyColorMap(np.linspace(0, 255, n).astype(np.uint8).reshape(-1, 1), cv2.COLORMAP_JET)
    return [f"rgb({int(r)},{int(g)},{int(b)})" for b, g, r in ramp[:, 0, :]]


def _scale(h: int) -> float:
    return max(0.35, h / 700)


def stamp_random(image: np.ndarray) -> np.ndarray:
    """A red banner across the top saying the picture came from random weights."""
    out = image.copy()
    h, w = out.shape[:2]
    s = _scale(h)
    bar = max(14, int(26 * s))
    cv2.rectangle(out, (0, 0), (w, bar), (200, 0, 0), -1)
    cv2.putText(out, RANDOM_BANNER, (4, bar - max(3, int(7 * s))), cv2.FONT_HERSHEY_SIMPLEX, 0.6 * s,
                (255, 255, 255), max(1, int(1.5 * s)), cv2.LINE_AA)
    return out


def _legend(out: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    h, w = out.shape[:2]
    s = _scale(h)
    bw = max(8, int(16 * s))
    top, bottom = int(h * 0.1), int(h * 0.9)
    ramp = np.linspace(255, 0, max(2, bottom - top)).astype(np.uint8).reshape(-1, 1)
    colors = cv2.cvtColor(cv2.applyColorMap(ramp, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    x0 = w - bw - max(4, int(40 * s))
    out[top:bottom, x0:x0 + bw] = np.repeat(colors, bw, axis=1)
    cv2.rectangle(out, (x0, top), (x0 + bw, bottom), (255, 255, 255), 1)
    for value, y in ((vmax, top + int(10 * s)), (vmin, bottom)):
        cv2.putText(out, f"{value:.2f}", (x0 + bw + 2, y), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * s, (255, 255, 255),
                    1, cv2.LINE_AA)
    return out


def heat_view(frame: np.ndarray, anomaly_map: np.ndarray, vmin: float = 0.0, vmax: float = 1.0,
              legend: bool = True, random_weights: bool = False) -> np.ndarray:
    out = imaging.heat_overlay(frame, anomaly_map, vmin=vmin, vmax=vmax, alpha=HEAT_ALPHA)
    if legend:
        out = _legend(out, vmin, vmax)
    return stamp_random(out) if random_weights else out


def outline_view(frame: np.ndarray, mask: np.ndarray, regions: Sequence[Region] = (), mask_size: tuple[int, int]
                 | None = None, random_weights: bool = False) -> np.ndarray:
    """The mask's outline (mask resized to the frame) and region boxes (in ``mask_size`` = (w, h) units)."""
    h, w = frame.shape[:2]
    if mask.shape[:2] != (h, w):
        mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
    out = frame.copy()
    contours, _ = cv2.findContours((mask > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, OUTLINE_RGB, max(1, round(min(h, w) / 250)))
    sw, sh = mask_size or (w, h)
    for r in regions:
        cv2.rectangle(out, (int(r.x * w / sw), int(r.y * h / sh)),
                      (int((r.x + r.width) * w / sw), int((r.y + r.height) * h / sh)), BOX_RGB, 1)
    return stamp_random(out) if random_weights else out
