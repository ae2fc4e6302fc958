"""Frame capture: sources (folders, video files, live cameras) and the stage that publishes them."""

from pipeline.capture.sources import (
    FpsLimiter,
    Frame,
    FrameSource,
    ImageFolderSource,
    LiveSource,
    SourceError,
    VideoFileSource,
    open_source,
)
from pipeline.capture.stage import CaptureStage, CaptureStats, FramePublisher

__all__ = [
    "CaptureStage",
    "CaptureStats",
    "FpsLimiter",
    "Frame",
    "FramePublisher",
    "FrameSource",
    "ImageFolderSource",
    "LiveSource",
    "SourceError",
    "VideoFileSource",
    "open_source",
]
