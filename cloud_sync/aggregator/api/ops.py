"""GET /health and GET /metrics (no credentials: nothing secret in either)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client import REGISTRY as DEFAULT_REGISTRY
from pydantic import BaseModel, Field
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from cloud_sync.aggregator import metrics
from cloud_sync.aggregator.api.deps import context
from cloud_sync.aggregator.db.migrate import current_revision, head_revision

_LOGGER = logging.getLogger(__name__)
router = APIRouter(tags=["operations"])


class Health(BaseModel):
    status: str = Field(description="ok | degraded (MQTT down) | error (database)")
    database: str = Field(description="ok, or the error")
    backend: str = Field(description="sqlite | postgresql")
    migrations: str = Field(description="current | behind | unknown")
    revision: str | None
    head: str | None
    mqtt: str = Field(description="disabled | connected | disconnected | unavailable")


def mqtt_state(ctx: Any) -> str:
    bridge = ctx.mqtt_bridge
    if bridge is None:
        return ctx.mqtt_state
    state = str(getattr(bridge, "state", "unknown"))
    metrics.MQTT_CONNECTED.set(1 if state == "connected" else 0)
    return state


@router.get("/health", response_model=Health, responses={503: {"model": Health}},
            summary="Database reachable, migrations current, MQTT bridge state.")
def health(request: Request) -> JSONResponse:
    ctx = context(request)
    head = head_revision()
    revision: str | None = None
    database = "ok"
    try:
        with ctx.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        revision = current_revision(ctx.engine)
    except SQLAlchemyError as err:
        database = f"unreachable: {type(err).__name__}"
    migrations = "unknown" if database != "ok" else ("current" if revision == head else "behind")
    mqtt = mqtt_state(ctx)
    if database != "ok" or migrations != "current":
        status = "error"
    elif ctx.settings.mqtt_url is not None and mqtt != "connected":
        status = "degraded"
    else:
        status = "ok"
    body = Health(status=status, database=database, backend=ctx.engine.dialect.name,
                  migrations=migrations, revision=revision, head=head, mqtt=mqtt)
    return JSONResponse(body.model_dump(), status_code=503 if status == "error" else 200)


@router.get("/metrics", summary="Prometheus metrics.", response_class=Response)
def prometheus(request: Request) -> Response:
    mqtt_state(context(request))
    # Ours, plus the default registry (process metrics, the MQTT bridge's counters).
    body = generate_latest(metrics.REGISTRY) + generate_latest(DEFAULT_REGISTRY)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
