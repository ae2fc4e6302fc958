"""/api/v1/subscriptions: list, add, remove, test, dead letters and redrive.

The same operations as `linewatch subscriptions ...`, through ``pipeline.delivery.manage``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException, Response
from fastapi import Path as PathParam
from pydantic import BaseModel, ValidationError

from pipeline.api.context import Context
from pipeline.delivery.manage import (
    check_subscription,
    dead_letter_rows,
    redrive,
    send_test,
    subscription_rows,
    with_webhook_secret,
)
from pipeline.logging import get_logger
from schemas.subscriptions import SUBSCRIPTION_ID_PATTERN, Subscription

log = get_logger(__name__)

SubId = Annotated[str, PathParam(pattern=SUBSCRIPTION_ID_PATTERN)]


class RedriveRequest(BaseModel):
    delivery_ids: list[str] | None = None


def parse_subscription(body: dict[str, Any]) -> tuple[Subscription, str | None]:
    """Validate a subscription body; a webhook without a secret gets a generated one (returned once)."""
    body, generated = with_webhook_secret(body)
    try:
        return Subscription.model_validate(body), generated
    except ValidationError as exc:
        errors = [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]
        raise HTTPException(422, errors) from None


def subscriptions_router(ctx: Context) -> APIRouter:
    router = APIRouter(prefix="/subscriptions")
    settings = ctx.settings

    def get_sub(sub_id: str) -> Subscription:
        try:
            return ctx.subs.get(sub_id)
        except KeyError:
            raise HTTPException(404, f"no subscription {sub_id!r}") from None

    def sender_for(sub: Subscription) -> Any:
        try:
            return ctx.senders(sub)
        except ValueError as exc:  # its channel cannot be reached as configured (no Kafka)
            raise HTTPException(409, str(exc)) from None

    @router.get("")
    def subscriptions() -> list[dict[str, Any]]:
        return subscription_rows(ctx.subs, ctx.ledger)

    @router.post("", status_code=201)
    def add_subscription(body: Annotated[dict[str, Any], Body()]) -> dict[str, Any]:
        sub, generated = parse_subscription(body)
        try:
            check_subscription(sub, settings)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        try:
            ctx.subs.add(sub)
        except ValueError as exc:  # the id exists
            raise HTTPException(409, str(exc)) from None
        log.info("subscription_added", subscription=sub.id, channel=sub.channel.type, via="api")
        # A generated secret is shown once, like the CLI does; it is never returned again.
        return {"subscription": sub.public(), "secret": generated}

    @router.delete("/{sub_id}", status_code=204)
    def remove_subscription(sub_id: SubId) -> Response:
        if not ctx.subs.remove(sub_id):
            raise HTTPException(404, f"no subscription {sub_id!r}")
        ctx.ledger.forget(sub_id)
        log.info("subscription_removed", subscription=sub_id, via="api")
        return Response(status_code=204)

    @router.post("/{sub_id}/test")
    def test_subscription(sub_id: SubId) -> dict[str, Any]:
        sub = get_sub(sub_id)
        sender = sender_for(sub)
        try:
            error = send_test(sub, sender, settings)
        finally:
            sender.close()
        return {"ok": error is None, "error": error}

    @router.get("/{sub_id}/dead-letters")
    def dead_letters(sub_id: SubId) -> list[dict[str, Any]]:
        get_sub(sub_id)
        return dead_letter_rows(ctx.ledger, sub_id)

    @router.post("/{sub_id}/redrive")
    def redrive_subscription(sub_id: SubId, body: Annotated[RedriveRequest | None, Body()] = None) -> dict[str, Any]:
        sub = get_sub(sub_id)
        sender = sender_for(sub)
        try:
            result = redrive(sub, ctx.ledger, sender, settings, body.delivery_ids if body else None)
        except ValueError as exc:  # unknown delivery ids
            raise HTTPException(404, str(exc)) from None
        finally:
            sender.close()
        return {"delivered": result.delivered, "failed": result.failed}

    return router
