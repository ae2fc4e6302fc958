"""What a replay or re-score leaves behind: report.json, scores.csv and one overlay image per event."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline import imaging
from pipeline.overlay import is_random, outline_view
from schemas.events import DefectEvent
from schemas.scores import ScoreMessage

SCORE_COLUMNS = ("camera_id", "seq", "capture_ts", "image_score", "map_max", "method", "model_fingerprint",
                 "latency_ms")

RANDOM_NOTE = "RANDOM WEIGHTS: scored by a randomly initialised model; scores and events mean nothing"

# (camera id, seq) -> the frame's JPEG bytes when the input can still provide it.
FrameLookup = Callable[[str, int], bytes | None]


@dataclass
class RunSummary:
    kind: str  # "replay" or "rescore"
    session: str
    source: str
    frames_published: int = 0
    frames_scored: int = 0
    frames_rejected: int = 0
    events: int = 0
    span_s: float = 0.0  # capture-time span of the frames
    publish_s: float = 0.0  # wall time publishing took (the pacing)
    wall_s: float = 0.0
    speed: float | None = None
    complete: bool = True
    notes: list[str] = field(default_factory=list)
    # With alerts: outcome -> count of the session's deliveries (delivered, dead_lettered, coalesced, pending).
    deliveries: dict[str, int] | None = None
    dead_letter_subscriptions: list[str] = field(default_factory=list)


def event_line(ev: DefectEvent) -> str:
    """One line per event transition, as `linewatch run` and `linewatch replay` print them."""
    regions = ", ".join(f"{r.width}x{r.height}@({r.x},{r.y})" for r in ev.regions[:3])
    return (f"[event {ev.status:>6}] {ev.event_id} camera={ev.camera_id} line={ev.line_id} "
            f"class={ev.product_class} frames {ev.first_seq}..{ev.last_seq} ({ev.n_frames} anomalous) "
            f"peak={ev.peak_score:.3f}@{ev.peak_seq} threshold={ev.threshold:.3f} regions=[{regions}]")


def write_report(out_dir: Path, summary: RunSummary, scores: list[ScoreMessage], events: list[DefectEvent],
                 frame_lookup: FrameLookup | None = None) -> Path:
    """Write the report folder; returns the path of report.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(is_random(s.model_fingerprint) for s in scores) and RANDOM_NOTE not in summary.notes:
        summary.notes.insert(0, RANDOM_NOTE)
    ordered = sorted(scores, key=lambda s: (s.frame.capture_ts, s.frame.camera_id, s.frame.seq))
    with (out_dir / "scores.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(SCORE_COLUMNS)
        for s in ordered:
            writer.writerow([s.frame.camera_id, s.frame.seq, f"{s.frame.capture_ts:.3f}", f"{s.image_score:.6f}",
                             f"{s.map_max:.6f}", s.method, s.model_fingerprint, f"{s.latency_ms:.1f}"])
    events_dir = out_dir / "events"
    events_dir.mkdir(exist_ok=True)
    rows: list[dict[str, Any]] = []
    for ev in sorted(events, key=lambda e: (e.first_ts, e.camera_id)):
        image_path = events_dir / f"{ev.event_id}.jpg"
        image_path.write_bytes(_overlay_jpeg(ev, frame_lookup))
        rows.append({**ev.model_dump(mode="json", exclude={"mask_png", "thumbnail_jpeg", "peak_map_png"}),
                     "overlay": str(image_path.relative_to(out_dir))})
    report = {**asdict(summary), "events": rows}
    path = out_dir / "report.json"
    path.write_text(json.dumps(report, indent=2))
    return path


def _overlay_jpeg(event: DefectEvent, frame_lookup: FrameLookup | None) -> bytes:
    """The peak frame at full resolution when available, else the event's thumbnail, with the mask."""
    data = frame_lookup(event.camera_id, event.peak_seq) if frame_lookup else None
    frame = imaging.decode_image(data) if data else imaging.decode_image(event.thumbnail_jpeg)
    rnd = is_random(event.provenance.model_fingerprint if event.provenance else None)
    # The dashboard's mask view, so a report and the dashboard show an event alike.
    picture = outline_view(frame, imaging.decode_png(event.mask_png), event.regions, (event.width, event.height),
                           random_weights=rnd)
    return imaging.encode_jpeg(picture, quality=88)
