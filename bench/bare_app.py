"""The floor a request costs on this server stack: a bare Starlette endpoint, under the same
uvicorn settings as ``aggregator serve``, that reads and parses the same JSON bodies as the
aggregator's device endpoints and answers a small JSON document. ``bench cost`` divides the
aggregator's CPU per request by this endpoint's, measured in the same run.

    python -m bench.bare_app --port 8765
"""

from __future__ import annotations

import argparse
import json

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def parse(request: Request) -> JSONResponse:
    document = json.loads(await request.body())
    return JSONResponse({"stored": isinstance(document, dict), "duplicate": False})


app = Starlette(routes=[Route(path, parse, methods=["POST"]) for path in (
    "/api/v1/heartbeat", "/api/v1/events", "/api/v1/attendance")])


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m bench.bare_app")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # as cloud_sync.aggregator.cli.serve runs the aggregator (one process)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
