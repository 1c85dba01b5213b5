"""The OpenAPI description tells the whole truth about errors: every /api/v1 operation
declares the error answers it can give (400, 401, 403, 404, 409, 413, 422, 429, 503, as they
apply), with the body they carry; and query times are ISO 8601 strings only (a number such
as ``since=0.5`` is refused, not read as a Unix time)."""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Annotated, Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import AwareDatetime, BeforeValidator

from cloud_sync.aggregator.api.guard import flat_routes, route_role

_ISO_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?"
                           r"(Z|[+-]\d{2}:?\d{2})$", re.IGNORECASE)
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _iso(pattern: re.Pattern[str], what: str) -> Any:
    def check(value: Any) -> Any:
        if isinstance(value, datetime | date) or (
            isinstance(value, str) and pattern.match(value.strip())
        ):
            return value
        raise ValueError(f"expected {what}")

    return BeforeValidator(check)


IsoDateTime = Annotated[
    AwareDatetime, _iso(_ISO_DATETIME, "an ISO 8601 time with an offset, e.g. "
                        "2026-11-16T09:30:00Z")]
IsoDate = Annotated[date, _iso(_ISO_DATE, "a date YYYY-MM-DD")]

ERROR_BODY = {
    "title": "Error",
    "type": "object",
    "required": ["detail"],
    "properties": {
        "detail": {
            "anyOf": [
                {"type": "string", "description": "What is wrong."},
                {"type": "array", "description": "One entry per invalid field.",
                 "items": {"$ref": "#/components/schemas/ValidationError"}},
            ],
        },
    },
}
WHY = {
    "400": "Refused by the service, with the reason (e.g. a date range too long, a CSV "
           "without a required column).",
    "401": "No credentials, or unknown ones (`WWW-Authenticate: Bearer`).",
    "403": "Credentials of the wrong kind, or a device acting for another device or room.",
    "404": "The resource, or one the request names, does not exist.",
    "409": "Conflicts with existing data (duplicate id, still referenced).",
    "413": "Body larger than the route's limit.",
    "422": "Malformed body or parameter (one entry per field), or a value the service "
           "cannot use.",
    "429": "A device over its rate limit: retry after `Retry-After` seconds.",
    "503": "Database unavailable (retry after `Retry-After`), or server-side face models "
           "missing.",
}
HEADERS = {
    "401": {"WWW-Authenticate": {"schema": {"type": "string"}}},
    "429": {"Retry-After": {"schema": {"type": "string"}, "description": "Seconds."}},
    "503": {"Retry-After": {"schema": {"type": "string"}, "description": "Seconds."}},
}
WRITES = {"post", "put", "patch", "delete"}
READS_A_BODY = {"/api/v1/import/{kind}"}  # reads its body itself (CSV)


def _codes(path: str, method: str, operation: dict[str, Any], role: str | None) -> list[str]:
    codes = ["400", "422", "503"]
    if role is not None:
        codes += ["401", "403"]
    if role in ("device", "any"):
        codes.append("429")
    if "{" in path or method in WRITES or path in ("/api/v1/schedule", "/api/v1/schedule/days"):
        codes.append("404")
    if method in WRITES:
        codes.append("409")
    if "requestBody" in operation or path in READS_A_BODY:
        codes.append("413")
    return codes


def document_errors(app: FastAPI) -> None:
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components["Error"] = ERROR_BODY
        roles = {(route.path_format, method.lower()): route_role(route.dependant)
                 for route in flat_routes(app.router.routes) if isinstance(route, APIRoute)
                 for method in route.methods}
        for path, item in schema.get("paths", {}).items():
            if not path.startswith("/api/"):
                continue
            for method, operation in item.items():
                responses = operation.setdefault("responses", {})
                for code in _codes(path, method, operation, roles.get((path, method))):
                    entry: dict[str, Any] = {
                        "description": responses.get(code, {}).get("description") or WHY[code],
                        "content": {"application/json": {
                            "schema": {"$ref": "#/components/schemas/Error"}}},
                    }
                    if code in HEADERS:
                        entry["headers"] = HEADERS[code]
                    responses[code] = entry
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
