"""Message schemas shared by every linewatch component (pydantic v2)."""

from schemas.events import DefectEvent, Region
from schemas.frames import FRAME_HEADER_KEY, SCHEMA_VERSION, FrameHeader, FrameRef
from schemas.scores import DeadLetter, ScoreMessage
from schemas.subscriptions import DeadDelivery, Notification, Subscription, SubscriptionFilter

__all__ = [
    "FRAME_HEADER_KEY",
    "SCHEMA_VERSION",
    "DeadDelivery",
    "DeadLetter",
    "DefectEvent",
    "FrameHeader",
    "FrameRef",
    "Notification",
    "Region",
    "ScoreMessage",
    "Subscription",
    "SubscriptionFilter",
]
