"""The status page server: uvicorn running the app in a background thread."""

from __future__ import annotations

import logging
import threading
import time

import uvicorn

from appliance.config import ApplianceSettings
from appliance.health import ClockSource, PipelineSource, StoreSource, SyncStatusFn
from appliance.web.app import create_app

_LOGGER = logging.getLogger(__name__)

_START_TIMEOUT_S = 15.0


class WebServer:
    """``start()`` returns once the socket is bound; if it cannot bind (port taken), it logs
    an error and returns with ``running`` false: the appliance keeps recording attendance.
    ``stop()`` ends open SSE/MJPEG streams and joins the thread."""

    def __init__(self, settings: ApplianceSettings, pipeline: PipelineSource, store: StoreSource,
                 sync_status: SyncStatusFn | None = None,
                 clock: ClockSource | None = None) -> None:
        self._settings = settings
        self.app = create_app(settings, pipeline, store, sync_status, clock=clock)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port: int = settings.web.port

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def url(self) -> str:
        host = self._settings.web.host
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104 (display only)
        if ":" in shown:
            shown = f"[{shown}]"
        return f"http://{shown}:{self.port}"

    def start(self) -> None:
        if self._thread is not None:
            return
        proxies = self._settings.web.trusted_proxy_list()
        config = uvicorn.Config(
            self.app,
            host=self._settings.web.host,
            port=self._settings.web.port,
            # uvicorn believes X-Forwarded-For from 127.0.0.1 by default: anyone on the device
            # could then pick the address the login limit counts. Only configured proxies.
            proxy_headers=bool(proxies),
            forwarded_allow_ips=proxies or None,
            log_level="warning",
            access_log=False,  # logs would carry client addresses for every poll
            timeout_graceful_shutdown=3,
            lifespan="off",
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(target=self._serve, args=(server,), name="web",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                # Attendance must go on without its status page: log, do not raise.
                _LOGGER.error("status page could not start on %s:%d (port in use or bad "
                              "address?); the appliance runs without it",
                              self._settings.web.host, self._settings.web.port)
                server.should_exit = True
                self._thread.join(timeout=5)
                self._thread = None
                self._server = None
                return
            time.sleep(0.02)
        sockets = [s for srv in server.servers for s in srv.sockets]
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        _LOGGER.info("status page on %s", self.url)

    @staticmethod
    def _serve(server: uvicorn.Server) -> None:
        try:
            server.run()
        except SystemExit:  # uvicorn exits this way when it cannot bind; start() reports it
            _LOGGER.debug("uvicorn exited at start-up")

    def stop(self) -> None:
        self.app.state.web.stopping.set()  # ends SSE and MJPEG streams
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            if self._thread.is_alive():
                _LOGGER.warning("status page thread did not stop in time")
            self._thread = None
        self._server = None
