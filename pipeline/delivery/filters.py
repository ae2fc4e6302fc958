"""Which events a subscription wants, and the time a message counts at for rate limiting."""

from __future__ import annotations

from fnmatch import fnmatchcase

from schemas.events import DefectEvent
from schemas.subscriptions import SubscriptionFilter


def defect_area(event: DefectEvent) -> int:
    """Total pixels of the event's regions."""
    return sum(region.area for region in event.regions)


def matches(flt: SubscriptionFilter, event: DefectEvent) -> bool:
    """True when every non-empty criterion of ``flt`` holds for ``event``."""
    if event.status not in flt.statuses:
        return False
    if flt.lines and event.line_id not in flt.lines:
        return False
    if flt.cameras and not any(fnmatchcase(event.camera_id, pattern) for pattern in flt.cameras):
        return False
    if flt.product_classes and event.product_class not in flt.product_classes:
        return False
    if flt.min_peak_score is not None and event.peak_score < flt.min_peak_score:
        return False
    return flt.min_area is None or defect_area(event) >= flt.min_area


def message_time(event: DefectEvent) -> float:
    """Event time of the message: an opening counts at its first frame, a closing at its last.

    Rate limits run on event time rather than the delivery worker's clock, so a backlog delivered
    late, or a redelivery after a restart, is limited exactly as it was when it happened.
    """
    return event.first_ts if event.status == "open" else event.last_ts


def delivery_id(event: DefectEvent) -> str:
    """Idempotency key of one message: the event id, with ':closed' for the closing message."""
    return event.event_id if event.status == "open" else f"{event.event_id}:closed"
