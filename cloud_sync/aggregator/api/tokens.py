"""Admin tokens over the API (admin token): list with last-used times, create, revoke."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from pydantic import BaseModel, Field

from cloud_sync.aggregator.api.deps import DB, Admin, context
from cloud_sync.aggregator.services import devices as device_svc

router = APIRouter(prefix="/api/v1/admin/tokens", tags=["admin tokens"])
TokenId = Annotated[int, Path(ge=1, le=2**31 - 1, description="Token id (from the list).")]


class TokenOut(BaseModel):
    id: int
    name: str
    created_at: datetime
    last_used_at: datetime | None = Field(
        description="Last request it authenticated (to the minute; null: never used).")


class TokenIn(BaseModel):
    name: str = Field(default="admin", min_length=1, max_length=100,
                      description="Who or what the token is for.")


class TokenCreated(TokenOut):
    token: str = Field(description="Shown once; only its hash is stored.")


def _out(row: object) -> TokenOut:
    return TokenOut.model_validate(row, from_attributes=True)


@router.get("", response_model=list[TokenOut], summary="Every admin token (never the secret).")
def list_tokens(_who: Admin, session: DB) -> list[TokenOut]:
    return [_out(r) for r in device_svc.list_admin_tokens(session)]


@router.post("", response_model=TokenCreated, status_code=201,
             summary="Create an admin token; the secret is in this answer only.")
def create_token(_who: Admin, session: DB, body: TokenIn) -> TokenCreated:
    row, token = device_svc.create_admin_token(session, body.name)
    return TokenCreated(**_out(row).model_dump(), token=token)


@router.delete("/{token_id}", status_code=204,
               summary="Revoke an admin token: it stops working at once.")
def revoke_token(request: Request, _who: Admin, session: DB, token_id: TokenId) -> Response:
    device_svc.revoke_admin_token(session, token_id)
    context(request).invalidate()
    return Response(status_code=204)
